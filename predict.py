"""Zero-shot abnormality probabilities for one CT scan (spec §2 preprocessing + §7 scoring).

    python predict.py --image scan.nii.gz --checkpoint CKPT [--mask seg.nii.gz] [--config configs/ctrate.yaml]
                      [--items ITEMS.yaml] [--text-encoder DIR] [--json]

Input: any 3D image SimpleITK reads (NIfTI, NRRD, MHA, ...) or a folder holding one DICOM series (read
as ``data.import_ct`` reads it), holding HU, with any spacing and orientation; its header geometry is trusted (unlike CT-RATE's raw files, whose geometry
comes from the metadata CSV -- fix such a file with data/fix_data.py first).

Steps, the same functions as the data pipeline and eval.py:
1. reorient image (and mask) to LPS with ``SimpleITK.DICOMOrient(image, "LPS")``: the array
   axes become ``(D, H, W) = (z, y, x)`` with +x = patient left, +y = posterior,
   +z = superior, identity direction -- the layout ``data/fix_data.py`` gives CT-RATE's axial
   scans (ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``). Axis flips/permutations only, no
   interpolation; an oblique scan gets the closest axis order;
2. labels: ``--mask`` (a TotalSegmentator ``total`` label map on the image's grid), or
   TotalSegmentator ``total`` run through ``data.generate_mask.segment_case`` (weights must be
   installed; nothing is downloaded);
3. ``data.resize``: resample onto the release's grid for the pipeline spacing (image
   trilinear, labels PyTorch's legacy nearest) and merge the classes into anatomy ids;
4. ``data.preprocess.crop_pad_case``: crop to the anatomies + margin, pad to the minimum size;
5. ``zeroshot.ZeroShotScorer`` (shared with eval.py): one window per anatomy, HU
   window scaling, probabilities of the items of ``--items``.

Prints a table (or ``--json``); an anatomy absent from the mask gives no probability. An image
that cannot be a chest CT in HU (values, or under 100 mm along z: ``data.fix_data.implausible_ct``)
is scored with a warning on stderr (and under ``warnings`` in the JSON).
Exit status 0, or 2 with a one-line message when the input, weights or checkpoint are unusable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

# only light imports here: the heavy ones come after parsing, where they are used (fast --help)
from utils.cli import DEFAULT_PRESET, MissingInputError, preset_defaults, run_main

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from data.common import PipelineConfig
    from zeroshot import ZeroShotItem

logger = logging.getLogger("predict")

ORIENTATION = "LPS"
# command-line flag -> preset key (the flag wins over the preset; key=value overrides win over both)
FLAG_KEYS = {"text_encoder": "paths.text_encoder", "items": "zeroshot_items"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fVLM zero-shot prediction for one CT", add_help=False)
    p.add_argument("--image", type=Path, required=True,
                   help="CT volume in HU (any spacing/orientation): a NIfTI/NRRD/MHA file or a DICOM series folder")
    p.add_argument("--checkpoint", type=Path, required=True, help="our checkpoint or the released fVLM weights")
    p.add_argument("--mask", type=Path, help="TotalSegmentator `total` label map of --image (default: run it)")
    p.add_argument("--config", default=DEFAULT_PRESET,
                   help=f"training preset of the checkpoint (default: {DEFAULT_PRESET})")
    p.add_argument("--items", help="test items, prompts and roi (default: the preset's zeroshot_items)")
    p.add_argument("--text-encoder", dest="text_encoder", help="text encoder directory (default: the preset's)")
    p.add_argument("--device", help="torch device for the model (default: cuda when available, else cpu)")
    p.add_argument("--fast", action="store_true", help="TotalSegmentator's 3 mm model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="preset overrides")
    return p


def segment(image: sitk.Image, *, fast: bool, device: torch.device) -> sitk.Image:
    """TotalSegmentator ``total`` labels of ``image`` (the full task, as the release) via data.generate_mask;
    its weights were checked by ``predict`` before the model was loaded."""
    import SimpleITK as sitk

    from data.fix_data import read_sitk
    from data.generate_mask import disable_usage_stats, segment_case

    disable_usage_stats()
    with tempfile.TemporaryDirectory(prefix="fvlm_predict_") as tmp:
        src, dst = Path(tmp) / "image.nii.gz", Path(tmp) / "labels.nii.gz"
        sitk.WriteImage(image, str(src))
        segment_case((src,), dst, roi_subset=None, fast=fast, device="gpu" if device.type == "cuda" else "cpu")
        return read_sitk(dst, "TotalSegmentator output")


def prepare_case(image: sitk.Image, labels: sitk.Image, pipe: PipelineConfig) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU, uint8 anatomy ids), both (D, H, W), as the processed cache stores them.

    ``image`` and ``labels`` (TotalSegmentator ``total`` ids) share a grid; both are reoriented
    to LPS, resampled, merged and cropped/padded by the pipeline's own functions.
    """
    import SimpleITK as sitk

    from data.generate_mask import check_labels, check_same_geometry, total_class_ids
    from data.preprocess import crop_pad_case
    from data.resize import build_label_lut, merge_labels, resample_case

    image = sitk.DICOMOrient(image, ORIENTATION)
    labels = sitk.DICOMOrient(labels, ORIENTATION)
    check_same_geometry(image, labels)
    check_labels(sitk.GetArrayViewFromImage(labels), total_class_ids())  # CaseError for non-`total` ids
    image_r, labels_r = resample_case(image, labels, pipe.target_spacing_xyz,
                                      mask_interpolation=pipe.mask_interpolation)
    anatomy = merge_labels(sitk.GetArrayViewFromImage(labels_r), build_label_lut(pipe))
    return crop_pad_case(sitk.GetArrayViewFromImage(image_r), anatomy, pipe)


def predict(args: argparse.Namespace) -> tuple[list[ZeroShotItem], dict[str, float], list[str]]:
    """Items, their probabilities, and the warnings about the input (``implausible_ct``: logged and returned)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from data.fix_data import implausible_ct, read_sitk
    from data.generate_mask import check_totalseg_weights
    from data.import_ct import read_source
    from data.io import scale_hu
    from utils.preset import given_flags, load_preset
    from zeroshot import ZeroShotScorer, load_eval_model, load_items, prompt_features

    cfg = load_preset(args.config, args.overrides, flags=given_flags(args, FLAG_KEYS))
    pipe = cfg.pipeline
    roi, items = load_items(cfg.zeroshot_items, pipe.anatomy_names)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # every input before the model, which takes long to load
    if not args.image.exists():
        raise MissingInputError(f"image not found: {args.image} (set --image: a CT file or a DICOM series folder)")
    image = read_source(args.image)
    mask = read_sitk(args.mask, "mask") if args.mask is not None else None
    if mask is None:
        check_totalseg_weights(fast=args.fast, roi_subset=False)
    model, tokenizer = load_eval_model(cfg, args.checkpoint, device)
    oriented = sitk.DICOMOrient(image, ORIENTATION)
    warnings = [f"{args.image}: {w}" for w in [implausible_ct(sitk.GetArrayViewFromImage(oriented),
                                                              oriented.GetSpacing())] if w]
    for warning in warnings:
        logger.warning("%s (the probabilities below are not meaningful for such a volume)", warning)
    labels = mask if mask is not None else segment(oriented, fast=args.fast, device=device)
    hu, anatomy = prepare_case(image, labels, pipe)
    logger.info("processed volume %s (D, H, W); anatomies present: %s", hu.shape,
                [pipe.anatomy_names[i - 1] for i in np.unique(anatomy) if i])
    text_feats = prompt_features(model, tokenizer, items, cfg.model.text_max_length, device)
    scorer = ZeroShotScorer(model, items, pipe.anatomy_names, text_feats, roi, device,
                            transform=lambda x: scale_hu(x, pipe.hu_window))
    return items, scorer(hu, anatomy), warnings


def format_table(items: list[ZeroShotItem], probs: dict[str, float]) -> str:
    rows = [(i.anatomy, i.abnormality, f"{probs[i.column]:.4f}" if i.column in probs else "absent") for i in items]
    header = ("Anatomy", "Abnormality", "Probability")
    widths = [max(len(r[k]) for r in (header, *rows)) for k in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def as_json(args: argparse.Namespace, items: list[ZeroShotItem], probs: dict[str, float],
            warnings: list[str]) -> dict[str, Any]:
    return {
        "image": str(args.image),
        "checkpoint": str(args.checkpoint),
        "warnings": warnings,
        "items": [{"anatomy": i.anatomy, "abnormality": i.abnormality, "negative": i.negative,
                   "positive": i.positive, "probability": probs.get(i.column)} for i in items],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("fVLM zero-shot prediction for one CT", parents=[get_args_parser()],
                                     description=__doc__.split("\n\n")[0], epilog=preset_defaults(FLAG_KEYS),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_main("predict", lambda: report(args))


def report(args: argparse.Namespace) -> None:
    import torch

    with torch.no_grad():
        items, probs, warnings = predict(args)
    if args.json:
        print(json.dumps(as_json(args, items, probs, warnings), indent=2))
    else:
        print(format_table(items, probs), end="")


if __name__ == "__main__":
    sys.exit(main())
