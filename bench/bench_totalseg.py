"""TotalSegmentator ``total`` on CPU with the small synthetic weights: time per volume and its parts,
Dice per anatomy, and ``--roi-subset`` against the full task.

    TOTALSEG_HOME_DIR=HOME python bench/bench_totalseg.py --data-root ROOT [--split valid]

``ROOT`` is a synthetic CT-RATE (v2 layout) on which ``generate_mask`` ran twice: into
``{split}_mask/`` (full task) and, with ``--roi-subset``, into a copy ``ROOT_roi`` (``--roi-root``).
Per volume, one JSON line:

- ``total_s``: ``totalsegmentator(...)`` as ``generate_mask.segment_case`` calls it (wall);
- ``loading_s``: nnU-Net's ``initialize_from_trained_model_folder`` of the five part models;
- ``network_s``: their sliding-window passes (``predict_logits_from_preprocessed_data``);
- ``resampling_s``: TotalSegmentator's ``change_spacing`` to 1.5 mm and back, and nnU-Net's
  resampling of the image to the plans' spacing and of each part's probabilities back;
- ``io_other_s``: the rest (NIfTI writes/reads of the 1.5 mm intermediates, nnU-Net's spawned
  pre-processing / export workers starting, combining the parts);
- ``dice``: per merged anatomy against the phantom's ground truth; ``roi_differ``: anatomy voxels
  whose anatomy differs between ``--roi-subset`` and the full task, and their share.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.common import load_pipeline_config, volume_relpath  # noqa: E402
from data.fix_data import fixed_sources, read_fixed  # noqa: E402
from data.io import nifti_image  # noqa: E402
from data.resize import build_label_lut  # noqa: E402


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def parts(image: sitk.Image) -> dict:
    """Loading, network and resampling seconds of one volume, each step called as TotalSegmentator does."""
    import nibabel as nib
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from totalsegmentator.alignment import as_closest_canonical
    from totalsegmentator.map_tasks_config import TASK_CONFIGS
    from totalsegmentator.resampling import change_spacing

    cfg = TASK_CONFIGS["total"]["sub_modes"]["default"]
    img = as_closest_canonical(nifti_image(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                                           image.GetDirection()))
    img = nib.Nifti1Image(img.get_fdata(), img.affine)
    rsp, t_resample = timed(change_spacing, img, [cfg["resample"]] * 3, order=1, dtype=np.int32, nr_cpus=1)
    _, t_back = timed(change_spacing, nib.Nifti1Image(np.zeros(rsp.shape, np.uint8), rsp.affine), cfg["resample"],
                      img.shape, order=0, dtype=np.uint8, nr_cpus=1, force_affine=img.affine)
    t = {"loading_s": 0.0, "network_s": 0.0, "resampling_s": t_resample + t_back}
    data = np.asanyarray(rsp.dataobj).T[None].astype(np.float32)  # SimpleITK's (z, y, x) view, one channel
    spacing = [float(z) for z in rsp.header.get_zooms()[::-1]]
    for tid in cfg["task_id"]:
        predictor = nnUNetPredictor(tile_step_size=0.8, use_mirroring=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        _, dt = timed(predictor.initialize_from_trained_model_folder,
                      get_output_folder(tid, cfg["trainer"], "nnUNetPlans", "3d_fullres"), use_folds=[0])
        t["loading_s"] += dt
        cm = predictor.configuration_manager
        pre = cm.preprocessor_class(verbose=False)
        shape = [int(round(s * sp / tsp)) for s, sp, tsp in zip(data.shape[1:], spacing, cm.spacing)]
        small, dt = timed(cm.resampling_fn_data, data, shape, spacing, cm.spacing)
        t["resampling_s"] += dt
        small = pre._normalize(small, np.zeros_like(small[:1], dtype=np.int8), cm,
                               predictor.plans_manager.foreground_intensity_properties_per_channel)
        logits, dt = timed(predictor.predict_logits_from_preprocessed_data, torch.from_numpy(small))
        t["network_s"] += dt
        _, dt = timed(cm.resampling_fn_probabilities, logits.float(), list(data.shape[1:]), cm.spacing, spacing)
        t["resampling_s"] += dt
    return t


def anatomy_arrays(path: Path, lut: np.ndarray) -> np.ndarray:
    return lut[sitk.GetArrayFromImage(sitk.ReadImage(str(path)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--roi-root", type=Path, default=None, help="the same data after generate_mask --roi-subset")
    p.add_argument("--split", default="valid")
    p.add_argument("--config", default="configs/pipeline_demo.yaml")
    args = p.parse_args()
    from totalsegmentator.config import setup_nnunet
    setup_nnunet()  # nnU-Net's result folder = TotalSegmentator's weights folder, before nnU-Net is imported
    from totalsegmentator.python_api import totalsegmentator

    pipe = load_pipeline_config(args.config)
    lut = build_label_lut(pipe)
    for name, fixed in fixed_sources(args.data_root, args.split).items():
        image = read_fixed(fixed)
        geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        _, total = timed(totalsegmentator, nifti_image(sitk.GetArrayFromImage(image), *geometry), None, ml=True,
                         task="total", device="cpu", quiet=True, nr_thr_saving=1)
        row = {"volume": name, "shape_dhw": sitk.GetArrayViewFromImage(image).shape,
               "spacing_xyz": [round(s, 3) for s in image.GetSpacing()], "total_s": round(total, 1)}
        t = parts(image)
        row.update({k: round(v, 1) for k, v in t.items()})
        row["io_other_s"] = round(total - sum(t.values()), 1)
        rel = volume_relpath(name)
        ours = anatomy_arrays(args.data_root / f"{args.split}_mask" / rel, lut)
        truth = anatomy_arrays(args.data_root / "totalseg_gt" / args.split / rel, lut)
        row["dice"] = {a: round(float(2 * ((ours == k) & (truth == k)).sum()
                                      / max((ours == k).sum() + (truth == k).sum(), 1)), 3)
                       for k, a in enumerate(pipe.anatomy_names, start=1)}
        if args.roi_root is not None:
            roi = anatomy_arrays(args.roi_root / f"{args.split}_mask" / rel, lut)
            anatomy = (ours > 0) | (roi > 0)
            differ = int((ours != roi)[anatomy].sum())
            row["roi_differ"] = {"voxels": differ, "of": int(anatomy.sum()),
                                 "share": round(differ / max(int(anatomy.sum()), 1), 4)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
