"""Small TotalSegmentator ``total`` weights trained on the synthetic phantoms, in TotalSegmentator's own layout.

``python -m data.synthetic.totalseg_weights --home DIR`` writes, for the five part models of the
``total`` task (291-295) and the 6 mm model its ``roi_subset`` crops with (298)::

    DIR/nnunet/results/Dataset29x_.../{trainer}__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  fold_0/checkpoint_final.pth

which is where TotalSegmentator looks before it downloads (``TOTALSEG_HOME_DIR=DIR``) and what
nnU-Net v2's predictor loads, unmodified. Folder names, trainers and each part's label space come
from the installed TotalSegmentator (``TASK_CONFIGS``, ``TASK_ID_WEIGHTS_CONFIGS``,
``class_map_5_parts``). The networks are ``dynamic_network_architectures`` U-Nets built by nnU-Net's
``build_network_architecture`` from our plans: 4 mm voxels, 48^3 patches, 8-32 features, so that
the networks take seconds on a CPU. They are trained here (a short loop, not nnU-Net's trainer; one
shared trunk with each model's own output layer, so one training instead of six) on phantoms
rendered by ``data.synthetic`` with their ``total`` labels mapped to each part's ids, the images
reoriented and resampled as TotalSegmentator hands them to nnU-Net (closest canonical, RAS).

A finished folder records the hash of everything that determines the weights (this file, the
phantom code, the library versions) in ``fvlm_weights.json``; a second run with the same inputs
returns at once (``weights_home`` gives a cache folder keyed by that hash).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.io import atomic_output, nifti_image, write_json

logger = logging.getLogger(__name__)

PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
SPACING_MM = 4.0
PATCH = (48, 48, 48)
FEATURES = (8, 16, 32, 32, 32)
# CT normalisation (nnU-Net's CTNormalization): clip, then (x - mean) / std
INTENSITY = {"mean": 0.0, "std": 500.0, "median": 0.0, "min": -1024.0, "max": 3071.0,
             "percentile_00_5": -1024.0, "percentile_99_5": 1500.0}
N_VOLUMES = 12
ITERATIONS = 400
BATCH = 2
LR = 1e-2
SEED = 0
RECORD = "fvlm_weights.json"
# phantom inputs of the weights: the abnormalities cycle so that lungs, heart and esophagus vary
ABNORMALITIES = ([], ["Cardiomegaly"], ["Pleural effusion"], ["Hiatal hernia"], ["Pericardial effusion"],
                 ["Emphysema", "Lung opacity"])
INPUT_FILES = ("data/synthetic/totalseg_weights.py", "data/synthetic/phantom.py", "data/synthetic/scanner.py")


def part_models() -> list[dict]:
    """The models of the ``total`` task: task id, weight folder, trainer and label map (part id -> class)."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    modes = TASK_CONFIGS["total"]["sub_modes"]
    models = [{"task_id": tid, "trainer": modes["default"]["trainer"],
               "labels": class_map_5_parts[map_taskid_to_partname_ct[tid]]} for tid in modes["default"]["task_id"]]
    # the 6 mm model `roi_subset` crops with predicts the full `total` label map
    models.append({"task_id": modes["fastest"]["task_id"], "trainer": modes["fastest"]["trainer"],
                   "labels": class_map["total"]})
    for m in models:
        m["folder"] = TASK_ID_WEIGHTS_CONFIGS[m["task_id"]]["foldername"]
    return models


def model_dir(results: Path, model: dict) -> Path:
    """nnU-Net's output folder ``{results}/{dataset}/{trainer}__{plans}__{configuration}``."""
    return results / model["folder"] / f"{model['trainer']}__{PLANS_NAME}__{CONFIGURATION}"


def inputs_key() -> str:
    """Hash of what determines the weights: the builder and phantom code, the library versions."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in INPUT_FILES:
        h.update((root / rel).read_bytes())
    for package in ("TotalSegmentator", "nnunetv2", "dynamic_network_architectures", "torch"):
        h.update(f"{package}={version(package)}".encode())
    return h.hexdigest()[:16]


def weights_home(cache_dir: str | Path) -> Path:
    """Cache folder for the weights of the current inputs: ``{cache_dir}/totalseg-{key}``."""
    return Path(cache_dir) / f"totalseg-{inputs_key()}"


def plans(model: dict) -> dict:
    """nnU-Net v2 plans of a small 3D U-Net on 4 mm voxels (the fields its predictor reads)."""
    n = len(FEATURES)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(FEATURES), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    # torch (trilinear) resampling: nnU-Net's other choice to its per-channel scipy default, which on CPU
    # dominated a prediction (the probabilities of every class back to the 1.5 mm grid)
    torch_resampling = {"is_seg": False, "num_threads": 1, "force_separate_z": None}
    resample = {f"resampling_fn_{what}": "resample_torch_fornnunet" for what in ("data", "seg", "probabilities")}
    resample.update({"resampling_fn_data_kwargs": torch_resampling,
                     "resampling_fn_seg_kwargs": {**torch_resampling, "is_seg": True},
                     "resampling_fn_probabilities_kwargs": torch_resampling})
    spacing = [SPACING_MM] * 3
    return {
        "dataset_name": model["folder"], "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": spacing, "original_median_shape_after_transp": [96, 88, 88],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": BATCH, "patch_size": list(PATCH), "median_image_size_in_voxels": [96, 88, 88],
            "spacing": spacing, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            **resample, "architecture": arch, "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": INTENSITY},
        "fvlm_note": "small weights trained on fvlm's synthetic phantoms, not TotalSegmentator's release",
    }


def dataset_json(model: dict) -> dict:
    labels = {"background": 0, **{name: int(i) for i, name in sorted(model["labels"].items())}}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": N_VOLUMES, "file_ending": ".nii.gz"}


def build_network(plans_dict: dict, dataset: dict) -> torch.nn.Module:
    """The network exactly as nnU-Net's predictor rebuilds it from the plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans_dict)
    heads = pm.get_label_manager(dataset).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(CONFIGURATION), 1, heads,
                                                   enable_deep_supervision=False)


def training_volumes(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(normalised image float32, ``total`` labels uint8) pairs, (z, y, x) of the RAS closest-canonical
    volume on the 4 mm grid: the array nnU-Net reads from the file TotalSegmentator writes for it."""
    import nibabel as nib

    from data.synthetic.scanner import truth_volume

    out = []
    for i in range(n):
        entry = {"split_id": 7, "patient_no": i, "scan_idx": 0, "recon": 1 + i % 2,
                 "abnormalities": ABNORMALITIES[i % len(ABNORMALITIES)]}
        hu, _, labels, grid, _ = truth_volume(SEED, entry, False)
        arrays = []
        for arr, mode in ((hu.astype(np.float32), "trilinear"), (labels, "nearest")):
            img = nib.as_closest_canonical(nifti_image(arr, grid.spacing_xyz, grid.origin_xyz))
            data = np.asanyarray(img.dataobj).T  # SimpleITK's (z, y, x) view of the canonical file
            zooms = np.array(img.header.get_zooms()[::-1], dtype=float)
            shape = [max(int(round(s * z / SPACING_MM)), 1) for s, z in zip(data.shape, zooms)]
            t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
            kw = {"align_corners": False} if mode == "trilinear" else {}
            arrays.append(F.interpolate(t, size=shape, mode=mode, **kw)[0, 0].numpy())
        image = (np.clip(arrays[0], INTENSITY["percentile_00_5"], INTENSITY["percentile_99_5"]) - INTENSITY["mean"]
                 ) / INTENSITY["std"]
        out.append((image.astype(np.float32), arrays[1].astype(np.uint8)))
    return out


def _patch(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``PATCH`` crop, padded with air / background where the volume is smaller; half of the crops are
    centred on a voxel of a random class present (as nnU-Net oversamples foreground), so small organs
    are seen as often as the lungs."""
    pad = [(0, max(p - s, 0)) for p, s in zip(PATCH, image.shape)]
    air = (INTENSITY["percentile_00_5"] - INTENSITY["mean"]) / INTENSITY["std"]
    image, labels = np.pad(image, pad, constant_values=air), np.pad(labels, pad)
    if rng.random() < 0.5:
        classes = np.unique(labels[::2, ::2, ::2])[1:]
        voxels = np.argwhere(labels == rng.choice(classes)) if classes.size else np.zeros((1, 3), int)
        centre = voxels[int(rng.integers(len(voxels)))]
        lo = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, image.shape)]
    else:
        lo = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, PATCH)]
    sl = tuple(slice(a, a + p) for a, p in zip(lo, PATCH))
    return image[sl], labels[sl]


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the classes present in the batch (nnU-Net's loss, without deep
    supervision)."""
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    dims = (0, 2, 3, 4)
    present = onehot.sum(dims) > 0
    dice = (2 * (prob * onehot).sum(dims) + 1e-5) / (prob.sum(dims) + onehot.sum(dims) + 1e-5)
    return F.cross_entropy(logits, target) + (1 - dice[present]).mean()


def train(trunk: torch.nn.Module, heads: list[torch.nn.Conv3d], luts: list[np.ndarray],
          volumes: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Train the trunk and one output layer per model together (``seg_loss`` on patches, each model's
    labels through its ``total`` -> part id table); returns the last loss per model. One trunk for the
    six models costs one training instead of six."""
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    last_layer = trunk.decoder.seg_layers[-1]
    features = {}
    last_layer.register_forward_hook(lambda module, args, out: features.__setitem__("x", args[0]))
    # the last head is the trunk's own output layer
    params = [*trunk.parameters(), *(p for h in heads[:-1] for p in h.parameters())]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=ITERATIONS, pct_start=0.1)
    trunk.train()
    loss = torch.zeros(())
    for it in range(ITERATIONS):
        if it % 100 == 0:
            logger.info("iteration %d/%d, loss %.3f", it, ITERATIONS, float(loss.detach()) / len(heads))
        batch = [_patch(*volumes[int(rng.integers(len(volumes)))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))[:, None]
        labels = np.stack([b[1] for b in batch])
        trunk(x)
        loss = sum(seg_loss(head(features["x"]), torch.from_numpy(lut[labels].astype(np.int64)))
                   for head, lut in zip(heads, luts))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach()) / len(heads)


def build(home: str | Path) -> Path:
    """Train and write the six models under ``{home}/nnunet/results`` unless ``home`` already holds the
    weights of the current inputs; returns ``home``."""
    home = Path(home)
    key = inputs_key()
    record = home / RECORD
    if record.is_file() and json.loads(record.read_text()).get("key") == key:
        logger.info("TotalSegmentator weights of inputs %s already in %s", key, home)
        return home
    t0 = time.perf_counter()
    models = part_models()
    total_ids = {name: i for i, name in models[-1]["labels"].items()}
    specs, luts, networks = [], [], []
    for model in models:
        lut = np.zeros(256, np.uint8)
        for part_id, name in model["labels"].items():
            lut[total_ids[name]] = part_id
        ds = dataset_json(model)
        pl = plans(model)
        specs.append((pl, ds))
        luts.append(lut)
        networks.append(build_network(pl, ds))
    trunk = networks[-1]
    heads = [net.decoder.seg_layers[-1] for net in networks[:-1]] + [trunk.decoder.seg_layers[-1]]
    last = train(trunk, heads, luts, training_volumes(N_VOLUMES))
    logger.info("trained %d iterations in %.0f s, last loss %.3f", ITERATIONS, time.perf_counter() - t0, last)
    shared = {k: v for k, v in trunk.state_dict().items() if not k.startswith("decoder.seg_layers.")}
    results = home / "nnunet" / "results"
    for model, (pl, ds), net in zip(models, specs, networks):
        # the trunk plus the model's own output layer; the deep-supervision layers nnU-Net keeps in
        # the network (decoder.seg_layers[:-1]) are not used at inference and stay as initialised
        net.load_state_dict({**net.state_dict(), **shared}, strict=True)
        with atomic_output(model_dir(results, model)) as tmp:
            (tmp / "fold_0").mkdir(parents=True)
            write_json(tmp / "plans.json", pl)
            write_json(tmp / "dataset.json", ds)
            torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": CONFIGURATION},
                        "trainer_name": model["trainer"], "inference_allowed_mirroring_axes": None,
                        "current_epoch": ITERATIONS}, tmp / "fold_0" / "checkpoint_final.pth")
    write_json(record, {"key": key, "seconds": round(time.perf_counter() - t0, 1)})
    return home


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True,
                        help="TotalSegmentator home folder to write (use it as TOTALSEG_HOME_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.home)
    print(f"export TOTALSEG_HOME_DIR={args.home.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
