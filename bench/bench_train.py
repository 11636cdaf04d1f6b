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
    python bench/bench_train.py --only chunks        # CPU: --chunk-size against one pass (demo preset, batch 16)

The chunks report (train.py --chunk-size, engine.GradCache) runs each chunk size in a fresh process, between
two one-pass runs of the same batch (its baseline, in the same run): seconds per step, their ratio to the
baseline, peak RSS, and the activation memory of the step: the bytes autograd saves for backward in the
largest graph the step holds at once (the batch's, or one chunk's; parameters not counted), the part
chunking divides. With a GPU, ``--only gpu`` adds the release's global batch of 56 (``--global-batch``) as
1, 2 or 4 processes would hold it (56, 28 or 14 scans per process; measured as one process, without the
gather across processes): the largest chunk that fits and the seconds per step with it, per precision (with
``--device cpu`` there is no search: the chunk is the smaller of that batch and ``--batch``).

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
from engine import ChunkedTrainStep, GradCache, TrainStep  # noqa: E402
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
          grad_checkpointing: bool = False, detail: bool = False, chunk_size: int | None = None,
          activations: bool = False) -> dict:
    """One setting; ``detail`` adds the text tower's share of the step, model FLOPs and MFU; ``chunk_size`` runs
    the step as train.py --chunk-size does; ``activations`` adds the step's activation memory (module doc)."""
    cfg = load_preset(REPO_ROOT / "configs" / preset,
                      flags={"paths.text_encoder": str(_random_bert_dir(preset)), "paths.mae_weights": None,
                             "model.grad_checkpointing": grad_checkpointing})
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=len(ANATOMIES),
                                   text_encoder_dir=cfg.paths.text_encoder)
    model.to(device)
    step_module = (TrainStep if chunk_size is None else ChunkedTrainStep)(
        model, AnatomyContrastiveLoss(anatomy_names=ANATOMIES), tokenizer, cfg.model.text_max_length)
    grad_cache = None if chunk_size is None else GradCache(step_module, chunk_size)
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
            out = (step_module if grad_cache is None else grad_cache)(
                image, mask, data["texts"], data["text_hash"], data["abnormal"], data["usable"])
        out["loss"].backward()
        if grad_cache is not None:
            grad_cache.backward_chunks()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["out"] = out

    def text_tower_step() -> None:  # every pair is usable in this batch: these are the step's texts
        with ctx:
            feats = model.encode_texts([t for row in data["texts"] for t in row], tokenizer,
                                       cfg.model.text_max_length, device=device)
        feats.float().sum().backward()
        opt.zero_grad(set_to_none=True)

    cpu_times: list[float] = []
    times = _timed(train_step, steps, device, cpu_times)
    out = last["out"]
    n_tokens = tokenizer(data["texts"][0], padding="longest", truncation=True,
                         max_length=cfg.model.text_max_length)["input_ids"]
    res = {"preset": preset, "batch": batch, "chunk_size": chunk_size, "amp": amp,
           "grad_checkpointing": grad_checkpointing,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "sec_per_step": round(sum(times) / len(times), 4),
           "cpu_sec_per_step": round(sum(cpu_times) / len(cpu_times), 4),
           "samples_per_s": round(batch * len(times) / sum(times), 3),
           "steps_timed": len(times), "text_tokens_lung": len(n_tokens[0]), "loss": round(float(out["loss"].detach()), 4)}
    if device.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if activations:
        res["activation_mib"] = round(_activation_bytes(train_step, step_module, model) / 2**20, 1)
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


def _activation_bytes(train_step, step_module: torch.nn.Module, model: torch.nn.Module) -> int:
    """Bytes autograd saves for backward in the largest graph one ``train_step()`` builds: the sum over the
    distinct storages saved during one forward of ``step_module`` (the batch's, or each chunk's: the chunked
    first pass saves nothing), parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            sizes[-1] += t.untyped_storage().nbytes()
        return t

    def new_graph(*_) -> None:
        seen.clear()
        sizes.append(0)

    hook = step_module.register_forward_pre_hook(new_graph)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train_step()
    finally:
        hook.remove()
    return max(sizes)


def _timed(fn, steps: int, device: torch.device, cpu_times: list[float] | None = None) -> list[float]:
    """Seconds of ``steps`` calls of ``fn`` after one warm-up call, synchronised on a GPU; the process's
    CPU seconds of each call go to ``cpu_times`` when given."""
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - c0)
    return times


def _subprocess(preset: str, batch: int, steps: int, chunk_size: int = 0) -> dict | None:
    """One CPU setting in a fresh process (its own peak RSS); prints and returns its JSON line.
    ``chunk_size``: 0 = one pass without the activation measurement, -1 = one pass with it."""
    cmd = [sys.executable, __file__, "--_one", preset, str(batch), str(steps), str(chunk_size)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(json.dumps({"preset": preset, "batch": batch, "error": r.stderr.strip().splitlines()[-1:]}))
        return None
    print(r.stdout.strip().splitlines()[-1], flush=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _chunk_report(preset: str, batch: int, chunk_sizes: list[int], steps: int) -> None:
    """Each chunk size between two one-pass runs of the same batch; then one summary line."""
    base = [_subprocess(preset, batch, steps, -1)]
    runs = {c: _subprocess(preset, batch, steps, c) for c in chunk_sizes}
    base.append(_subprocess(preset, batch, steps, -1))
    if None in base or None in runs.values():
        return
    sec, cpu = (sum(b[k] for b in base) / 2 for k in ("sec_per_step", "cpu_sec_per_step"))
    print(json.dumps({"preset": preset, "batch": batch, "one_pass_sec_per_step": round(sec, 4),
                      "one_pass_activation_mib": base[0]["activation_mib"],
                      "chunks": {c: {"time_ratio": round(r["sec_per_step"] / sec, 3),
                                     "cpu_time_ratio": round(r["cpu_sec_per_step"] / cpu, 3),
                                     "activation_mib": r["activation_mib"],
                                     "activation_mib_per_scan": round(r["activation_mib"] / c, 2)}
                                 for c, r in runs.items()}}), flush=True)


def _largest_chunk(device: torch.device, amp: str, batch: int, preset: str) -> int:
    """The largest chunk (<= ``batch``) with which a step of ``batch`` scans fits; 0 if none does."""
    def fits(c: int) -> bool:
        try:
            bench(preset, batch, amp=amp, steps=1, device=device, chunk_size=c)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    if fits(batch):
        return batch
    lo, hi = 0, batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


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
    p.add_argument("--only", choices=["demo", "paper", "gpu", "chunks"], action="append")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], help="paper-size CPU batches")
    p.add_argument("--device", default="cuda", help="gpu report: device (cpu to check the script)")
    p.add_argument("--preset", default="ctrate.yaml", help="gpu report: preset in configs/")
    p.add_argument("--batch", type=int, default=14, help="gpu report: batch per step (the paper's 14 per GPU)")
    p.add_argument("--no-largest-batch", dest="largest_batch", action="store_false",
                   help="gpu report: skip the search for the largest batch that fits")
    p.add_argument("--global-batch", dest="global_batch", type=int, default=56,
                   help="gpu report: the global batch held in chunks by 1, 2 or 4 processes (0: skip)")
    p.add_argument("--chunks-preset", dest="chunks_preset", default="demo.yaml", help="chunks report: preset")
    p.add_argument("--chunks-batch", dest="chunks_batch", type=int, default=16, help="chunks report: batch")
    p.add_argument("--chunk-sizes", dest="chunk_sizes", type=int, nargs="+", default=[8, 4, 2, 1],
                   help="chunks report: chunk sizes")
    p.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    if args._one:
        preset, batch, steps, chunk = args._one[0], *(int(x) for x in args._one[1:])
        print(json.dumps(bench(preset, batch, amp="none", steps=steps, device=cpu,
                               chunk_size=chunk if chunk > 0 else None, activations=chunk != 0)), flush=True)
        return 0
    only = args.only or (["gpu"] if torch.cuda.is_available() else ["demo", "paper"])
    if "demo" in only:
        _subprocess("demo.yaml", load_preset(REPO_ROOT / "configs" / "demo.yaml").optim.batch_size,
                    args.steps)
    if "paper" in only:
        for b in args.batch_sizes:
            _subprocess("ctrate.yaml", b, min(args.steps, 2))
    if "chunks" in only:
        _chunk_report(args.chunks_preset, args.chunks_batch, args.chunk_sizes, args.steps)
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
        for amp in ("none", "bf16") if args.global_batch else ():
            for n in (1, 2, 4):
                b = args.global_batch // n
                c = _largest_chunk(gpu, amp, b, args.preset) if gpu.type == "cuda" else min(b, args.batch)
                res = bench(args.preset, b, amp=amp, steps=args.steps, device=gpu, chunk_size=c) if c else {}
                print(json.dumps({"preset": args.preset, "amp": amp, "global_batch": args.global_batch, "processes": n,
                                  "batch_per_process": b, "largest_chunk": c, "sec_per_step": res.get("sec_per_step"),
                                  "peak_mem_gib": res.get("peak_mem_gib"), "device": res.get("device")}), flush=True)
                if gpu.type == "cuda":
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
