"""Shared test setup: offline Hugging Face, repo root importable; tiny-BERT and processed-cache builders."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOTALSEG_DISABLE_HTTP", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REPORT_WORDS = [".", ",", *("lung heart aorta esophagus shows no significant abnormalities nodule emphysema "
                            "opacity effusion pleural cardiomegaly calcification hernia hiatal wall arterial small "
                            "large left right upper lower lobe in the a of and is are there").split(), "##s", "##ed"]


def make_tiny_bert(path: Path, words=REPORT_WORDS, *, hidden: int = 32, layers: int = 2, vocab_size: int | None = None,
                   with_weights: bool = False, seed: int = 0) -> Path:
    """A tiny BERT directory (config.json, vocab.txt = special tokens + ``words``, tokenizer_config.json),
    with random weights (``seed``) when ``with_weights``; the loaders read it like CXR-BERT's."""
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=vocab_size or len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    cfg.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 64}')
    if with_weights:
        import torch

        torch.manual_seed(seed)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def write_cache_case(root: Path, split: str, name: str, image, mask, spacing=(4.0, 4.0, 8.0)) -> None:
    """One processed volume ``name`` (``train_1_a_2.nii.gz``) and its mask in the cache layout
    ``processed_{split}_{images,masks}/train_1/train_1_a/train_1_a_2.nii``."""
    from data.cache import write_volume

    stem = name[: -len(".nii.gz")]
    rel = Path(stem.rsplit("_", 2)[0], stem.rsplit("_", 1)[0], stem + ".nii")
    write_volume(root / f"processed_{split}_images" / rel, image, spacing)
    write_volume(root / f"processed_{split}_masks" / rel, mask, spacing)
