"""Seconds per training step and peak memory of fVLM pre-training.

Same code path as train.py (utils.preset.load_preset, models.builder.build_model,
data.dataset.model_inputs, engine.TrainStep, AnatomyContrastiveLoss, AdamW step); the batch is
synthetic (random int16 HU crop, four interior anatomies, report-like texts of CT-RATE lengths)
so no data is needed. Prints one JSON line per setting.

    python bench/bench_train.py                      # CPU: demo preset, then ViT-B at batch 1 and 2
    python bench/bench_train.py --only demo --steps 5
    python bench/bench_train.py --only paper --batch-sizes 1   # ViT-B, ~30+ s per step on 2 cores
    python bench/bench_train.py --only gpu           # GPU: ViT-B batch 14 fp32 + bf16, largest batch
    python bench/bench_train.py --only gpu --device cpu --preset demo.yaml --batch 4 --no-largest-batch
                                                     # the same report on the CPU, to check the script

The gpu report adds, per precision, the share of the step spent in the text tower (its
forward + backward timed alone on the step's texts, deduplicated and padded as in
training) and the model FLOPs per step (torch.utils.flop_counter: matmuls, convolutions,
attention; forward + backward) with the model FLOPs utilisation against the device's
dense peak (``PEAK_TFLOPS``; fp32 is measured without TF32 matmuls, PyTorch's default).

The text encoder is a directory of randomly initialised weights in the preset's BERT shape
(the demo's: ``text_pretrain.init``; the paper's: the size of CXR-BERT, hidden 768, 12
layers, vocab 30522, with a word-level vocabulary, so every word is one token where
CXR-BERT's WordPiece gives a few more), loaded as the preset says (frozen or trained). CPU peak memory is the process's maxrss
(each CPU setting runs in a fresh subprocess); GPU peak is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.dataset import model_inputs  # noqa: E402
from data.texts import text_hash  # noqa: E402
from engine import TrainStep  # noqa: E402
from models.builder import build_model  # noqa: E402
from models.loss import AnatomyContrastiveLoss  # noqa: E402
from utils.preset import load_preset  # noqa: E402

ANATOMIES = ["lung", "heart", "esophagus", "aorta"]
# dense peak TFLOP/s by device name (SXM parts, no sparsity): bf16 tensor cores, fp32 without TF32
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "none": 67.0}, "H200": {"bf16": 989.0, "none": 67.0},
               "A100": {"bf16": 312.0, "none": 19.5}}
# words per anatomy text, cycling over samples (CT-RATE sample: lung mean 70, p90 124, max 290)
WORDS = {"lung": [62, 124, 45, 80, 290, 70, 95], "heart": [19, 26, 17, 34], "esophagus": [20, 21, 17, 36],
         "aorta": [6, 36, 15, 91]}
SENTENCE = ("there are nodular densities and ground glass opacities in both lungs with minimal "
            "atelectasis and emphysematous changes calcific plaques in the aortic arch heart contour normal").split()


def _texts(batch: int) -> list[list[str]]:
    out = []
    for i in range(batch):
        row = []
        for a in ANATOMIES:
            n = WORDS[a][i % len(WORDS[a])]
            words = [SENTENCE[(i + j) % len(SENTENCE)] for j in range(n)]
            row.append(f"{a} {' '.join(words)} {i}.")  # distinct per sample: no text deduplication
        out.append(row)
    return out


@functools.cache
def _random_bert_dir(preset: str) -> Path:
    """Random BERT weights + vocabulary, made once per preset (a CXR-BERT-size model writes ~440 MB): the
    config and vocabulary of the preset's ``text_pretrain.init``, or without one (the paper's preset) a
    CXR-BERT-size config with a word-level vocab covering the bench texts."""
    from transformers import BertConfig, BertModel
    tmp = Path(tempfile.mkdtemp(prefix="bench_bert_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    settings = load_preset(REPO_ROOT / "configs" / preset).text_pretrain
    torch.manual_seed(0)
    if settings is None:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *ANATOMIES, *sorted(set(SENTENCE)),
                 *[str(i) for i in range(64)]]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=512)
    else:
        init_dir = REPO_ROOT / settings.init
        shutil.copytree(init_dir, tmp, dirs_exist_ok=True)  # vocabulary and tokenizer settings
        config = BertConfig.from_json_file(init_dir / "config.json")
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp)
    return tmp


def _batch(batch: int, crop: tuple[int, int, int], hu_window: tuple[float, float], device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    d, h, w = crop
    mask = torch.zeros(batch, d, h, w, dtype=torch.uint8)
    # four interior boxes (usable): lung large, the others small
    mask[:, d // 8: 7 * d // 8, h // 8: 7 * h // 16, w // 8: 7 * w // 8] = 1
    mask[:, d // 3: 2 * d // 3, 9 * h // 16: 3 * h // 4, w // 3: w // 2] = 2
    mask[:, d // 4: 3 * d // 4, 13 * h // 16: 7 * h // 8, w // 2: 9 * w // 16] = 3
    mask[:, d // 4: 3 * d // 4, 13 * h // 16: 7 * h // 8, 5 * w // 8: 3 * w // 4] = 4
    texts = _texts(batch)
    hu = torch.randint(int(hu_window[0]), int(hu_window[1]) + 1, (batch, 1, d, h, w), generator=g, dtype=torch.int16)
    return {"hu": hu.to(device), "mask": mask.to(device), "flip": torch.rand(batch, 3, generator=g) < 0.2,
            "texts": texts, "text_hash": torch.tensor([[text_hash(t) for t in row] for row in texts]),
            "abnormal": torch.rand(batch, 4, generator=g) < 0.5,
            "usable": torch.ones(batch, 4, dtype=torch.bool)}


def bench(preset: str, batch: int, *, amp: str, steps: int, device: torch.device,
          grad_checkpointing: bool = False, detail: bool = False) -> dict:
    """One setting; ``detail`` adds the text tower's share of the step, model FLOPs and MFU."""
    cfg = load_preset(REPO_ROOT / "configs" / preset,
                      flags={"paths.text_encoder": str(_random_bert_dir(preset)), "paths.mae_weights": None,
                             "model.grad_checkpointing": grad_checkpointing})
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=len(ANATOMIES),
                                   text_encoder_dir=cfg.paths.text_encoder)
    model.to(device)
    step_module = TrainStep(model, AnatomyContrastiveLoss(anatomy_names=ANATOMIES), tokenizer,
                            cfg.model.text_max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    data = _batch(batch, cfg.data.crop_size, cfg.pipeline.hu_window, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    step_module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    last: dict = {}

    def train_step() -> None:
        image, mask = model_inputs(data["hu"], data["mask"], data["flip"], cfg.pipeline.hu_window)  # as engine does
        with ctx:
            out = step_module(image, mask, data["texts"], data["text_hash"], data["abnormal"],
                              data["usable"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["out"] = out

    def text_tower_step() -> None:  # every pair is usable in this batch: these are the step's texts
        with ctx:
            feats = model.encode_texts([t for row in data["texts"] for t in row], tokenizer,
                                       cfg.model.text_max_length, device=device)
        feats.float().sum().backward()
        opt.zero_grad(set_to_none=True)

    times = _timed(train_step, steps, device)
    out = last["out"]
    n_tokens = tokenizer(data["texts"][0], padding="longest", truncation=True,
                         max_length=cfg.model.text_max_length)["input_ids"]
    res = {"preset": preset, "batch": batch, "amp": amp, "grad_checkpointing": grad_checkpointing,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "sec_per_step": round(sum(times) / len(times), 4), "samples_per_s": round(batch * len(times) / sum(times), 3),
           "steps_timed": len(times), "text_tokens_lung": len(n_tokens[0]), "loss": round(float(out["loss"].detach()), 4)}
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if detail:
        text_times = _timed(text_tower_step, steps, device)
        res["text_tower_sec"] = round(sum(text_times) / len(text_times), 4)
        res["text_tower_share"] = round(sum(text_times) / sum(times), 3)
        with FlopCounterMode(display=False) as flops:
            train_step()
        sec = sum(times) / len(times)
        res["model_gflop_per_step"] = round(flops.get_total_flops() / 1e9, 1)
        res["achieved_tflops"] = round(flops.get_total_flops() / sec / 1e12, 3)
        peak = next((v[amp] for k, v in PEAK_TFLOPS.items() if k in res["device"]), None)
        res["peak_tflops"] = peak
        res["mfu"] = round(res["achieved_tflops"] / peak, 4) if peak else None
    return res


def _timed(fn, steps: int, device: torch.device) -> list[float]:
    """Seconds of ``steps`` calls of ``fn`` after one warm-up call, synchronised on a GPU."""
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def _subprocess(preset: str, batch: int, steps: int) -> None:
    cmd = [sys.executable, __file__, "--_one", preset, str(batch), str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(json.dumps({"preset": preset, "batch": batch, "error": r.stderr.strip().splitlines()[-1:]}))
    else:
        print(r.stdout.strip().splitlines()[-1], flush=True)


def _largest_batch(device: torch.device, amp: str, start: int, preset: str) -> int:
    def fits(b: int) -> bool:
        try:
            bench(preset, b, amp=amp, steps=1, device=device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    lo, hi = 0, start
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["demo", "paper", "gpu"], action="append")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="paper-size CPU batches")
    p.add_argument("--device", default="cuda", help="gpu report: device (cpu to check the script)")
    p.add_argument("--preset", default="ctrate.yaml", help="gpu report: preset in configs/")
    p.add_argument("--batch", type=int, default=14, help="gpu report: batch per step (the paper's 14 per GPU)")
    p.add_argument("--no-largest-batch", dest="largest_batch", action="store_false",
                   help="gpu report: skip the search for the largest batch that fits")
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    if args._one:
        preset, batch, steps = args._one
        print(json.dumps(bench(preset, int(batch), amp="none", steps=int(steps), device=cpu)), flush=True)
        return 0
    only = args.only or (["gpu"] if torch.cuda.is_available() else ["demo", "paper"])
    if "demo" in only:
        _subprocess("demo.yaml", load_preset(REPO_ROOT / "configs" / "demo.yaml").optim.batch_size,
                    args.steps)
    if "paper" in only:
        for b in args.batch_sizes:
            _subprocess("ctrate.yaml", b, min(args.steps, 2))
    if "gpu" in only:
        gpu = torch.device(args.device)
        for amp in ("none", "bf16"):
            print(json.dumps(bench(args.preset, args.batch, amp=amp, steps=args.steps, device=gpu, detail=True)),
                  flush=True)
            if gpu.type == "cuda":
                torch.cuda.empty_cache()
        for amp in ("none", "bf16") if args.largest_batch else ():
            b = _largest_batch(gpu, amp, 16, args.preset)
            print(json.dumps({"preset": args.preset, "amp": amp, "largest_batch": b,
                              "device": torch.cuda.get_device_name(gpu)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
