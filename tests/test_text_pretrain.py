"""Text pre-training (pretrain_text.py) and a frozen pre-trained text encoder in training and evaluation."""
import itertools

import numpy as np
import pytest
import torch
import yaml

import pretrain_text
import train
from pretrain_text import pretrain_text_encoder, split_sentences
from data.synthetic import ABSENT_DESC, CONC
from models.text_encoder import build_text_encoder, load_text_encoder
from tests.conftest import REPO_ROOT as REPO
from tests.conftest import make_tiny_preset, make_train_bert, make_train_cache
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError

FINDINGS = ["Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification", "Hiatal hernia"]


def test_split_sentences_cuts_at_every_period():
    # conclusion and findings are joined without a space (spec §3)
    assert split_sentences("Hiatal hernia.A hernia of 54 mm is observed. No x") == [
        "Hiatal hernia.", "A hernia of 54 mm is observed.", "No x."]
    assert split_sentences("lung shows no significant abnormalities.") == ["lung shows no significant abnormalities."]
    assert split_sentences("") == [] and split_sentences(" . ") == []


def _report_corpus() -> list[str]:
    """Texts in the demo reports' words: each finding present (impression) or ruled out."""
    texts = []
    for present in itertools.product([False, True], repeat=len(FINDINGS)):
        for variant in range(3):
            parts = [CONC[f][0] if p else ABSENT_DESC[f][variant % 2] for f, p in zip(FINDINGS, present)]
            texts.append(" ".join(parts[variant:] + parts[:variant]))
    return texts


def _containment_gap(encoder, tokenizer, texts: list[str]) -> float:
    """Mean over sentences of cos(sentence, texts containing it) - cos(sentence, the other texts)."""
    def embed(batch):
        enc = tokenizer(batch, padding="longest", return_tensors="pt")
        with torch.no_grad():
            return torch.nn.functional.normalize(encoder(**enc).last_hidden_state[:, 0], dim=-1)
    sentences = sorted({s for t in texts for s in split_sentences(t)})
    sims = embed(sentences) @ embed(texts).T
    inside = torch.tensor([[s in t for t in texts] for s in sentences])
    return float(np.mean([(row[m].mean() - row[~m].mean()).item() for row, m in zip(sims, inside)]))


def test_pretraining_embeds_a_sentence_near_the_texts_that_contain_it():
    texts = _report_corpus()
    torch.manual_seed(0)
    encoder, tokenizer = build_text_encoder(REPO / "configs" / "demo_bert", pretrained=False)
    assert not any("[UNK]" in tokenizer.tokenize(t) for t in texts)  # the committed vocabulary covers them
    before = _containment_gap(encoder, tokenizer, texts)
    losses = pretrain_text_encoder(encoder, tokenizer, texts, epochs=12, lr=1e-3, batch_size=16, seed=0,
                                   progress=False)
    after = _containment_gap(encoder, tokenizer, texts)
    assert losses[-1] < losses[0] - 0.5  # measured 3.34 -> 2.35 (shared sentences keep a floor)
    assert after > before + 0.05, (before, after)  # measured 0.005 -> 0.10
    assert not encoder.training


def test_pretraining_needs_one_batch_of_texts():
    encoder, tokenizer = build_text_encoder(REPO / "configs" / "demo_bert", pretrained=False)
    with pytest.raises(ValueError, match="at least one batch"):
        pretrain_text_encoder(encoder, tokenizer, ["Cardiomegaly."] * 40, epochs=1, lr=1e-3, batch_size=4)


@pytest.fixture()
def pretrained_setup(tmp_path):
    """Fake processed cache, tiny BERT config + vocabulary, and a preset whose text_pretrain
    section starts from them and writes tmp/text_encoder."""
    make_train_cache(tmp_path / "data", 8)
    make_train_bert(tmp_path / "bert")
    cfg_path = make_tiny_preset(tmp_path, model={"text_pretrained": True, "freeze_text_encoder": True})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["paths"]["text_encoder"] = str(tmp_path / "text_encoder")
    cfg["text_pretrain"] = {"init": str(tmp_path / "bert"), "epochs": 2, "lr": 1e-3, "batch_size": 4,
                            "temperature": 0.05}
    cfg_path.write_text(yaml.safe_dump(cfg))
    return tmp_path, cfg_path


def test_pretrain_cli_writes_a_bert_directory_and_keeps_it(pretrained_setup):
    tmp, cfg = pretrained_setup
    out = tmp / "text_encoder"
    assert pretrain_text.main(["--config", str(cfg), "--no-pbar"]) == 0
    encoder, tokenizer = load_text_encoder(out)  # the loader CXR-BERT goes through
    assert tokenizer("Cardiomegaly.")["input_ids"][1] != tokenizer.unk_token_id
    assert not list(tmp.glob(".tmp-*"))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_text.main(["--config", str(cfg), "--no-pbar"]) == 0  # kept
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert pretrain_text.main(["--config", str(cfg), "--no-pbar", "--overwrite", "text_pretrain.epochs=1"]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp


def test_pretrain_cli_is_repeatable(pretrained_setup):
    """The preset's seed fixes the BERT's random init too, not only the training order."""
    from safetensors.torch import load_file

    tmp, cfg = pretrained_setup
    weights = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)  # whatever state the caller left the global generator in
        assert pretrain_text.main(["--config", str(cfg), "--no-pbar", "--overwrite"]) == 0
        weights.append(load_file(tmp / "text_encoder" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_pretrain_cli_errors_are_one_line(pretrained_setup, capsys):
    tmp, cfg = pretrained_setup
    assert pretrain_text.main(["--config", str(REPO / "configs" / "ctrate.yaml")]) == 2
    assert "no text_pretrain section" in capsys.readouterr().err
    assert pretrain_text.main(["--config", str(cfg), "--data-root", str(tmp / "nope")]) == 2
    assert "no processed volumes" in capsys.readouterr().err


def test_frozen_text_encoder_is_not_trained_nor_saved_and_eval_loads_it(pretrained_setup):
    from utils.preset import load_preset
    from zeroshot import load_eval_model

    tmp, cfg_path = pretrained_setup
    assert pretrain_text.main(["--config", str(cfg_path), "--no-pbar"]) == 0
    assert train.main(["--config", str(cfg_path), "--epochs", "1"]) == 0
    ckpt = load_checkpoint(tmp / "out" / "checkpoint_0.pth")
    assert not any(k.startswith("text_encoder.") for k in ckpt["model"])
    assert any(k.startswith("text_proj.") for k in ckpt["model"])

    model, tokenizer = load_eval_model(load_preset(cfg_path), tmp / "out" / "checkpoint_0.pth", torch.device("cpu"))
    pretrained, _ = load_text_encoder(tmp / "text_encoder")
    for (name, p), (_, q) in zip(model.text_encoder.state_dict().items(), pretrained.state_dict().items()):
        torch.testing.assert_close(p, q, msg=name)
    torch.testing.assert_close(model.text_proj.weight, ckpt["model"]["text_proj.weight"])


def test_freezing_a_random_text_encoder_is_refused(pretrained_setup):
    tmp, cfg = pretrained_setup
    with pytest.raises(ConfigError, match="text_pretrained"):
        train.train(train.get_args_parser().parse_args(
            ["--config", str(cfg), "--text-encoder", str(tmp / "bert"), "model.text_pretrained=false"]))
