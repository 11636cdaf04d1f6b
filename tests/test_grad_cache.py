"""engine.GradCache (--chunk-size): a step with the batch encoded in chunks equals the batch in one pass.

Compared: the loss and every parameter's gradient before the optimiser step (AdamW's first update is
±lr·sign(g), so parameters would hide differences), each gradient to 1e-5 of its largest entry.

Dropout masks are drawn per forward call, so chunks of C < B scans draw other masks than one pass over B
(the default path is left as it is): with dropout on, chunks of 1, 2, 4 are compared with the same chunks
encoded in one autograd graph (the masks the chunked step draws in its first pass, which it must replay),
and one chunk of B with the default step (the same masks); with dropout off (eval mode) every chunking is
compared with the default step itself.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import train
from data.dataset import CTRateTrainDataset, collate, model_inputs
from engine import ChunkedTrainStep, GradCache, TrainStep
from models.builder import build_model
from models.loss import AnatomyContrastiveLoss
from tests.conftest import make_tiny_preset, make_train_bert, make_train_cache
from utils.checkpoint import load_checkpoint
from utils.preset import load_preset

REPO = Path(__file__).resolve().parents[1]
BATCH = 8
WORLD = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset with dropout on in both towers and the pooling (8 scans, batch 8)."""
    tmp = tmp_path_factory.mktemp("grad_cache")
    make_train_cache(tmp / "data", BATCH)
    make_train_bert(tmp / "bert")  # BERT's own dropout: 0.1
    return tmp, make_tiny_preset(tmp, model={"drop_rate": 0.1, "attn_drop_rate": 0.1}, batch_size=BATCH)


def _step(cfg, step_class, rank=0, world_size=1, dtype=torch.float32):
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, img_size=cfg.data.crop_size, n_anatomies=cfg.pipeline.n_anatomies,
                                   text_encoder_dir=cfg.paths.text_encoder)
    return step_class(model.to(dtype), AnatomyContrastiveLoss(rank, world_size, cfg.pipeline.anatomy_names),
                      tokenizer, cfg.model.text_max_length)


def _loader(cfg, rank=0, world_size=1):
    """train.py's data path: DistributedSampler + collate, epoch 0, flips at p = 0.5."""
    ds = CTRateTrainDataset(cfg.paths.data_root, anatomy_names=cfg.pipeline.anatomy_names,
                            crop_size=cfg.data.crop_size, hu_window=cfg.pipeline.hu_window, flip_prob=0.5,
                            seed=cfg.seed)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=True)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH // world_size, sampler=sampler, collate_fn=collate)


def _inputs(batch, hu_window, dtype=torch.float32):
    image, mask = model_inputs(batch["hu"], batch["mask"], batch["flip"], hu_window)
    return image.to(dtype), mask, batch["texts"], batch["text_hash"], batch["abnormal"], batch["usable"]


def _result(step, out):
    grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    for p in step.parameters():
        p.grad = None
    return {"loss": out["loss"].detach().clone(), "n_pairs": float(out["n_pairs"]), "grads": grads}


def _one_pass(step, inputs, amp=False):
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = step(*inputs)
    out["loss"].backward()
    return _result(step, out)


def _chunked(step_module, inputs, chunk_size, amp=False):
    """What engine.train_one_epoch does with --chunk-size."""
    torch.manual_seed(1)
    grad_cache = GradCache(step_module, chunk_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = grad_cache(*inputs)
    out["loss"].backward()
    grad_cache.backward_chunks()
    return _result(getattr(step_module, "module", step_module), out)


def _same_chunks_one_graph(step, inputs, chunk_size, amp=False):
    """The batch's loss over its chunks encoded one after the other in one autograd graph: the dropout masks of
    the chunked step's first pass (same seed, same order of draws). With ``amp`` each chunk has its own autocast
    region, as in the chunked step (one region would sum the chunks' weight gradients in bf16)."""
    torch.manual_seed(1)
    feats = []
    for s in range(0, BATCH, chunk_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            feats.append(step.model.forward_train(
                *(x[s: s + chunk_size] for x in inputs[:4]), inputs[5][s: s + chunk_size],
                inputs[4][s: s + chunk_size], tokenizer=step.tokenizer, max_length=step.text_max_length))
    cat = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
    out = step.loss_fn(cat["image_feats"].float(), cat["text_feats"].float(), cat["anatomy_idx"], cat["abnormal"],
                       cat["text_hash"], step.model.temp, step.model.n_anatomies)
    out["loss"].backward()
    out["n_pairs"] = torch.tensor(float(cat["anatomy_idx"].numel()))
    return _result(step, out)


def assert_same_step(a, b, what, grad_scale=1.0, tol=1e-5):
    """Loss equal; every gradient within ``tol`` of its largest entry; ``b``'s gradients x ``grad_scale``.
    The attention key biases have a zero gradient in exact arithmetic (softmax is shift-invariant): a
    gradient's scale is at least 1e-6 of the largest gradient entry of the model, so their float noise passes."""
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6, msg=f"{what}: loss")
    assert a["n_pairs"] == b["n_pairs"] and a["grads"].keys() == b["grads"].keys(), what
    assert len(a["grads"]) > 50, what  # both towers, the pooling, the projections, temp
    floor = 1e-6 * max(g.abs().max() for g in a["grads"].values())
    for name, ga in a["grads"].items():
        scale = max(ga.abs().max(), floor)
        gb = b["grads"][name] * (1.0 if name == "model.temp" else grad_scale)
        err = (ga - gb).abs().max()
        assert err <= tol * scale, f"{what}: grad {name} differs by {err:.3g} (scale {scale:.3g})"


def test_chunks_equal_one_pass_without_dropout(tiny):
    """Eval mode (no dropout): chunks of 1, 2 and 4 give the default step's loss and gradients (what is at stake
    is the splitting: per-chunk padding and text deduplication, pair order, the cached gradients).
    In float64 (the towers; the loss casts to float32 as always): in float32 the rounding of the sums over other
    batch shapes moves the bias gradients of the projections, sums of cancelling terms, by up to 6e-5 of their
    largest entry; in float64 all agree to 1e-14, so what is left in float32 is rounding."""
    _, preset = tiny
    cfg = load_preset(preset)
    inputs = _inputs(next(iter(_loader(cfg))), cfg.pipeline.hu_window, torch.float64)
    ref = _one_pass(_step(cfg, TrainStep, dtype=torch.float64).eval(), inputs)
    chunked = _step(cfg, ChunkedTrainStep, dtype=torch.float64).eval()
    for c in (1, 2, 4):
        assert_same_step(ref, _chunked(chunked, inputs, c), f"eval, chunks of {c}")


def test_chunks_replay_dropout(tiny):
    """Dropout on: one chunk of 8 = the default step (same masks); chunks of 1, 2, 4 = the same chunks in one
    autograd graph. Both fail when the second pass does not replay the first pass's random state."""
    _, preset = tiny
    cfg = load_preset(preset)
    inputs = _inputs(next(iter(_loader(cfg))), cfg.pipeline.hu_window)
    chunked = _step(cfg, ChunkedTrainStep).train()
    assert_same_step(_one_pass(_step(cfg, TrainStep).train(), inputs), _chunked(chunked, inputs, BATCH),
                     "dropout, one chunk of 8")
    for c in (1, 2, 4):
        assert_same_step(_same_chunks_one_graph(chunked, inputs, c), _chunked(chunked, inputs, c),
                         f"dropout, chunks of {c}")


def test_chunks_with_bf16_and_grad_checkpointing(tiny):
    """--amp bf16 --grad-checkpointing, dropout on: the same comparisons under bf16 autocast (forward only, as
    train_one_epoch), the ViT blocks recomputed in backward (their own RNG stash inside the replayed chunk)."""
    _, preset = tiny
    cfg = load_preset(preset, flags={"model.grad_checkpointing": True, "optim.amp": "bf16"})
    inputs = _inputs(next(iter(_loader(cfg))), cfg.pipeline.hu_window)
    chunked = _step(cfg, ChunkedTrainStep).train()
    assert chunked.model.visual_encoder.grad_checkpointing
    ref_one = _one_pass(_step(cfg, TrainStep).train(), inputs, amp=True)
    one_chunk = _chunked(chunked, inputs, BATCH, amp=True)
    ref_two = _same_chunks_one_graph(chunked, inputs, 2, amp=True)
    two = _chunked(chunked, inputs, 2, amp=True)
    assert_same_step(ref_one, one_chunk, "bf16 + checkpointing, one chunk of 8")
    assert_same_step(ref_two, two, "bf16 + checkpointing, chunks of 2")


def _worker(rank, init_file, ref, preset):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = load_preset(preset)
        batch = next(iter(_loader(cfg, rank, WORLD)))
        step = nn.parallel.DistributedDataParallel(_step(cfg, ChunkedTrainStep, rank, WORLD, torch.float64).eval(),
                                                   find_unused_parameters=True)  # as train.py
        got = _chunked(step, _inputs(batch, cfg.pipeline.hu_window, torch.float64), 2)
        got["n_pairs"] = ref["n_pairs"]  # per rank here; the gathered count is the reference's
        # DDP averages: 1/WORLD of the one-process gradient, temp (in every rank's loss) in full
        assert_same_step(ref, got, f"rank {rank}", grad_scale=WORLD)
    finally:
        torch.distributed.destroy_process_group()
    os._exit(0)  # see tests/test_loss_distributed.py: skip the interpreter's shutdown in a spawned gloo worker


@pytest.mark.slow  # ~15 s: two spawned processes
def test_two_processes_in_chunks_equal_one_process(tiny, tmp_path):
    """1 process x batch 8 in one pass = 2 processes (gloo, DDP as train.py) x batch 4 in chunks of 2.
    Data order and augmentation are the same by construction (DistributedSampler splits one permutation; each
    item's crop and flips depend on (seed, epoch, index) only), dropout masks are not (each process draws
    from its own generator): eval mode. float64 as in test_chunks_equal_one_pass_without_dropout, and the
    one-process batch in the gathered order (rank 0's scans, then rank 1's): the loss, float32 by design, then
    sums in the same order (another order moves cancelling bias gradients by ~1e-5 of their scale)."""
    _, preset = tiny
    cfg = load_preset(preset)
    one = _loader(cfg)
    order = [i for r in range(WORLD) for i in list(_loader(cfg, r, WORLD).sampler)[:BATCH // WORLD]]
    assert sorted(order) == sorted(list(one.sampler)[:BATCH])  # the global batch is the one-process batch
    batch = collate([one.dataset[i] for i in order])
    ref = _one_pass(_step(cfg, TrainStep, dtype=torch.float64).eval(),
                    _inputs(batch, cfg.pipeline.hu_window, torch.float64))
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"), ref, preset), nprocs=WORLD, join=True)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_train_py_chunk_size(tiny):
    """train.py --chunk-size: a chunk of the whole batch trains as the default path (2 epochs x 4 steps, dropout
    on), with --accum-steps too; chunks of 1 resume exactly; a chunk larger than the batch is a one-line error
    (exit 2)."""
    tmp, preset = tiny
    run = ["--config", str(preset), "--batch-size", "2"]
    for one_pass, chunked, extra in (("a", "b", []), ("a2", "b2", ["--accum-steps", "2"])):
        assert train.main([*run, *extra, "--output-dir", str(tmp / one_pass)]) == 0
        assert train.main([*run, *extra, "--output-dir", str(tmp / chunked), "--chunk-size", "2"]) == 0
        a, b = _weights(tmp / one_pass / "checkpoint_1.pth"), _weights(tmp / chunked / "checkpoint_1.pth")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{extra}: {k}")
    a = _weights(tmp / "a" / "checkpoint_1.pth")
    assert train.main([*run, "--output-dir", str(tmp / "c"), "--chunk-size", "1"]) == 0
    shutil.copytree(tmp / "c", tmp / "d")
    (tmp / "d" / "checkpoint_1.pth").unlink()  # killed during epoch 1
    assert train.main([*run, "--output-dir", str(tmp / "d"), "--chunk-size", "1", "--resume"]) == 0
    c, d = _weights(tmp / "c" / "checkpoint_1.pth"), _weights(tmp / "d" / "checkpoint_1.pth")
    for k in c:
        torch.testing.assert_close(c[k], d[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any((a[k] - c[k]).abs().max() > 1e-4 for k in a)  # chunks of 1 draw other dropout masks
    assert train.main([*run, "--output-dir", str(tmp / "e"), "--chunk-size", "3"]) == 2
    assert not (tmp / "e").exists()


@pytest.mark.slow  # ~30 s: two torchrun runs of 2 processes
def test_torchrun_chunk_size(tiny):
    """torchrun, 2 processes: train.py --chunk-size (DDP-wrapped ChunkedTrainStep, gradients all-reduced on the
    last chunk) trains as the default path when the chunk is the whole batch (the same dropout masks)."""
    tmp, preset = tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for out, extra in (("ta", []), ("tb", ["--chunk-size", "2"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
               str(REPO / "train.py"), "--config", str(preset), "--epochs", "1", "--batch-size", "2",
               "--output-dir", str(tmp / out), *extra]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(tmp / "ta" / "checkpoint_0.pth"), _weights(tmp / "tb" / "checkpoint_0.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
