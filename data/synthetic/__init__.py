"""Deterministic synthetic mini CT-RATE (spec §1 layout) for tests, benchmarks and the demo.

Every scan is a chest phantom drawn in physical (LPS) millimetres: body (fat + muscle), lungs split into
the five lobes, trachea and main bronchi, heart with left atrial appendage, aorta (ascending, arch,
descending), esophagus, vertebrae with spinal cord, ribs, sternum, liver and stomach. Abnormalities are
drawn per scan, painted into the image and written consistently into the report, the anatomy-wise
decomposition (desc_info.json / conc_info.json) and the labels CSV.

Files are stored the way CT-RATE stores them. v1 (the original upload, the default): `{split}/...` holds
the raw NIfTI written by SimpleITK from the (z, y, x) array of stored integers, so its header says spacing
(1, 1, 1), origin 0 and identity direction; the real geometry and the HU rescale live only in the metadata
CSV. v2 (`--ctrate-version 2`, today's download): `{split}_fixed/...` holds int16 HU with the true geometry
instead, and the metadata CSV is unchanged (it still lists the rescale). `totalseg_gt/` holds TotalSegmentator `total`
label maps with the true geometry, for `generate_mask --masks-from`.

Determinism: every random choice comes from a generator seeded by (seed, a stream tag, split, patient,
scan, reconstruction), so the bytes written do not depend on `workers`. `synthetic_manifest.json` records
what `load_truth` needs to re-render a volume (and an md5 of the truth HU to check the re-render).

Axes: arrays are (D, H, W) = (z, y, x); voxel (k, j, i) sits at origin + (i*sx, j*sy, k*sz) mm, +x = patient
left, +y = posterior, +z = superior (identity direction, as CT-RATE's ImageOrientationPatient).

Modules: `phantom` (the typed phantom description and its rendering), `scanner` (reconstruction grids,
noise and stored integers), `reports` (label/report columns, phrase tables, texts of a phantom),
`writer` (the CT-RATE files and the manifest), `vocab` (the demo BERT vocabulary), `cli`
(`python -m data.synthetic`).
"""
from data.synthetic.cli import get_args_parser, main
from data.synthetic.phantom import (LUNG_LOBES, Grid, Lesions, Patient, Phantom, Stream, render, rngs,
                                    scan_phantom, total_ids_by_name)
from data.synthetic.reports import (ABSENT_DESC, CONC, DESC, LABEL_COLUMNS, LOBES, NORMAL_DESC, REPORT_COLUMNS,
                                    SIMULATED, ScanText, load_anatomies, scan_texts)
from data.synthetic.scanner import RESCALES, Acquisition, recon_grid, truth_volume
from data.synthetic.vocab import DEMO_BERT_DIR, ZEROSHOT_ITEMS, build_demo_vocab, write_demo_bert
from data.synthetic.writer import METADATA_COLUMNS, MANIFEST, generate_dataset, load_truth, plan_abnormalities

__all__ = [
    "ABSENT_DESC", "CONC", "DEMO_BERT_DIR", "DESC", "LABEL_COLUMNS", "LOBES", "LUNG_LOBES", "MANIFEST",
    "METADATA_COLUMNS", "NORMAL_DESC", "REPORT_COLUMNS", "RESCALES", "SIMULATED", "ZEROSHOT_ITEMS",
    "Acquisition", "Grid", "Lesions", "Patient", "Phantom", "ScanText", "Stream",
    "build_demo_vocab", "generate_dataset", "get_args_parser", "load_anatomies", "load_truth", "main",
    "plan_abnormalities",
    "recon_grid", "render", "rngs", "scan_phantom", "scan_texts", "total_ids_by_name", "truth_volume",
    "write_demo_bert",
]
