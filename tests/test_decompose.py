"""data.decompose: sentence splitting, the command on CT-RATE-like CSVs, bad input, agreement with the release's
decomposition (the reference sample), and the LLM backends' plumbing (a random tiny causal LM, a local server)."""
from __future__ import annotations

import csv
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from bench.decompose_quality import measure
from data import decompose
from data.decompose_llm import CACHE_FILE

REPO = Path(__file__).resolve().parents[1]
SETTINGS = decompose.Settings.load()

REPORTS = [  # (VolumeName, Findings_EN, Impressions_EN)
    ("train_1_a_1.nii.gz", "Heart contour, size are normal.A 5.5x3.5 mm nodule is observed in the upper lobe of the "
     "left lung. The liver is natural. Calcific plaques in the aortic arch, approx. 4 mm.",
     "Nodule in the left lung.  Thyroid nodule?."),
    ("train_1_a_2.nii.gz", "Heart contour, size are normal.A 5.5x3.5 mm nodule is observed in the upper lobe of the "
     "left lung. The liver is natural. Calcific plaques in the aortic arch, approx. 4 mm.",
     "Nodule in the left lung.  Thyroid nodule?."),
    ("train_2_a_1.nii.gz", "Minimal pericardial effusion is observed. No hiatal hernia.", "Not given."),
]


def write_reports(path: Path, rows, header=tuple(decompose.CTRATE_COLUMNS.values())) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root whose metadata lists the reports' volumes, and their reports CSV."""
    r = tmp_path / "root"
    (r / "metadata").mkdir(parents=True)
    write_reports(r / "metadata" / "train_metadata.csv", [[name] for name, *_ in REPORTS], header=["VolumeName"])
    write_reports(r / "reports.csv", REPORTS)
    return r


def run(root: Path, *extra: str, reports: Path | None = None) -> int:
    return decompose.main(["--reports", str(reports or root / "reports.csv"), "--data-root", str(root), "--no-pbar",
                           *extra])


def outputs(root: Path) -> tuple[dict, dict]:
    return tuple(json.loads((root / n).read_text()) for n in (decompose.DESC_FILE, decompose.CONC_FILE))


def test_sentences_survive_ctrate_punctuation():
    text = ("Atelectasis in both lungs.Linear atelectasis is present. A nodule of 5.5x3.5 mm, approx. 4 mm deep, "
            "e.g. in the lingula. infection process?. mediastinal vascular structures are normal...No. 7 node")
    assert decompose.split_sentences(text, SETTINGS) == [
        "Atelectasis in both lungs.", "Linear atelectasis is present.",
        "A nodule of 5.5x3.5 mm, approx. 4 mm deep, e.g. in the lingula.", "infection process?.",
        "mediastinal vascular structures are normal...", "No. 7 node"]


def test_ctrate_reports_to_release_format(root):
    assert run(root) == 0
    desc, conc = outputs(root)
    assert set(desc) == set(conc) == {"train_1_a", "train_2_a"}  # keyed by scan; reconstructions share the report
    assert desc["train_1_a"] == {
        "lung": "A 5.5x3.5 mm nodule is observed in the upper lobe of the left lung.",
        "heart": "Heart contour, size are normal.",
        "aorta": "Calcific plaques in the aortic arch, approx. 4 mm."}  # the liver sentence is dropped
    assert conc["train_1_a"] == {"lung": "Nodule in the left lung."}  # "Thyroid nodule?." is not about the lung
    assert desc["train_2_a"] == {"heart": "Minimal pericardial effusion is observed.", "esophagus": "No hiatal hernia."}
    assert conc["train_2_a"] == {}  # "Not given.": every anatomy normal (the release's rule)
    assert not list(root.glob(".tmp-*"))
    # written files are kept: a second run needs --overwrite
    assert run(root) == 2
    assert run(root, "--abnormal-from", "findings", "--overwrite") == 0
    desc2, conc2 = outputs(root)
    assert desc2 == desc and conc2["train_2_a"] == {"heart": "Minimal pericardial effusion is observed."}
    assert conc2["train_1_a"] == {"lung": "Nodule in the left lung.",
                                  "aorta": "Calcific plaques in the aortic arch, approx. 4 mm."}


def test_other_column_names_and_import_ct_ids(tmp_path, caplog):
    r = tmp_path / "root"
    for name in ("train_P001_a_1.nii.gz", "train_P002_a_1.nii.gz", "valid_P003_a_1.nii.gz"):  # data.import_ct's
        scan = decompose.scan_id_of(name)
        folder = r / f"{name.split('_')[0]}_fixed" / scan.rsplit("_", 1)[0] / scan
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"")
    csv_path = write_reports(tmp_path / "mine.csv", [("P001", "Emphysema in both lungs.", ""),
                                                     ("P002", "", "Cardiomegaly.")], header=["id", "text", "conclusion"])
    args = ["--id-column", "id", "--findings-column", "text", "--impression-column", "conclusion"]
    with caplog.at_level(logging.WARNING):
        assert run(r, *args, reports=csv_path) == 0
    assert any("1 scan(s)" in m and "valid_P003_a" in m for m in caplog.messages)  # no report: counted
    desc, conc = outputs(r)
    assert desc == {"train_P001_a": {"lung": "Emphysema in both lungs."}, "train_P002_a": {}}
    assert conc == {"train_P001_a": {}, "train_P002_a": {"heart": "Cardiomegaly."}}


@pytest.mark.parametrize("case, expected", [
    ("missing column", "no column 'Impressions_EN'"),
    ("empty report", "neither findings nor impression, first line 3 (train_1_a_2.nii.gz)"),
    ("unknown id", "1 id(s) name no scan of the data root, first 'train_9_a_1.nii.gz'"),
    ("anatomy without terms", "anatomy 'heart' needs 'terms'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(root, tmp_path, capsys, case, expected):
    extra: list[str] = []
    rows = [list(r) for r in REPORTS]
    header = list(decompose.CTRATE_COLUMNS.values())
    if case == "missing column":
        header[2], rows = "Impression", rows
    elif case == "empty report":
        rows[1][1:] = ["Not given.", "  "]
    elif case == "unknown id":
        rows.append(["train_9_a_1.nii.gz", "Emphysema.", ""])
    else:
        anatomy = yaml.safe_load((REPO / decompose.DEFAULT_ANATOMY).read_text())
        del anatomy["anatomies"][1]["terms"]
        (tmp_path / "anatomy.yaml").write_text(yaml.safe_dump(anatomy))
        extra = ["--anatomy", str(tmp_path / "anatomy.yaml")]
    write_reports(root / "reports.csv", rows, header=header)
    before = sorted(p.name for p in root.rglob("*"))
    assert run(root, *extra) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("decompose: error: ") and expected in errors[0], errors
    assert sorted(p.name for p in root.rglob("*")) == before


@pytest.mark.parametrize("flags, expected", [
    (["--llm-model", "x"], "--llm-model / --llm-url are for --backend hf or openai"),
    (["--backend", "hf"], "--backend hf needs --llm-model"),
    (["--backend", "hf", "--llm-model", "."], "not a Hugging Face model directory"),
    (["--backend", "openai", "--llm-model", "qwen"], "--backend openai needs --llm-url"),
    (["--settings", "configs/anatomy/ctrate.yaml"], "needs abbreviations"),
])
def test_bad_flags_are_one_line_exit_2_nothing_written(root, capsys, flags, expected):
    before = sorted(p.name for p in root.rglob("*"))
    assert run(root, *flags) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("decompose: error: ") and expected in errors[0], errors
    assert sorted(p.name for p in root.rglob("*")) == before


def test_agreement_with_the_release_decomposition(tmp_path):
    """The reference sample rebuilt into reports (docs/decomposition.md): targets of the default backend."""
    rows, stats = measure(tmp_dir=tmp_path / "a")
    for anatomy, r in rows.items():
        assert r["status_agreement"] >= 0.95, (anatomy, r)
        assert r["recall"] >= 0.90, (anatomy, r)
    assert stats.scans == 100 and stats.sentences_dropped > 0 and stats.abnormal_from_findings == 0
    rows_f, stats_f = measure(tmp_dir=tmp_path / "b", abnormal_from="findings")
    assert stats_f.abnormal_from_findings == 44  # docs/decomposition.md
    assert all(rows_f[a]["recall"] == rows[a]["recall"] for a in rows)  # only conclusions are added


# ---------------------------------------------------------------------------- LLM backends

def small_settings(tmp_path: Path, max_new_tokens: int) -> Path:
    cfg = yaml.safe_load((REPO / decompose.DEFAULT_SETTINGS).read_text())
    cfg["llm"]["max_new_tokens"] = max_new_tokens
    path = tmp_path / "decompose.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_causal_lm(folder: Path) -> Path:
    """A randomly initialised 1-layer GPT-2 with a word-level tokenizer built here (nothing downloaded)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "{", "}", ":", ",", '"', "lung", "heart", "findings", "impression", "[", "]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=2, pad_token_id=1)).save_pretrained(folder)
    return folder


def test_hf_backend_invalid_output_falls_back_and_resumes(root, tmp_path):
    model = tiny_causal_lm(tmp_path / "lm")
    args = ["--backend", "hf", "--llm-model", str(model), "--settings", str(small_settings(tmp_path, 6)),
            "--batch-size", "2"]
    stats = decompose.run(decompose.get_args_parser().parse_args(
        ["--reports", str(root / "reports.csv"), "--data-root", str(root), "--no-pbar", *args]))
    assert stats.llm_fallbacks == 2 and stats.llm_answers == 0  # random weights: never valid JSON
    by_llm = outputs(root)
    assert run(root, "--overwrite") == 0  # the rules alone
    assert outputs(root) == by_llm
    cache = root / ".decompose_cache" / CACHE_FILE
    assert len(cache.read_text().splitlines()) == 2
    with open(cache, "a") as f:
        f.write('{"key": "torn')  # a run killed mid-write
    assert run(root, "--overwrite", *args) == 0  # resumed: both answers come from the cache
    assert len(cache.read_text().splitlines()) == 3


class _ChatServer(BaseHTTPRequestHandler):
    """/v1/chat/completions: a valid answer for the report about emphysema, invented text for the one about
    the heart, no JSON for the others."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][1]["content"]
        if "Emphysema" in prompt:
            answer = 'Sure: {"heart": {"findings": ["Emphysema  in both lungs."], "impression": []}}'
        elif "Cardiomegaly" in prompt:
            answer = '{"heart": {"findings": [], "impression": ["Severe cardiomegaly."]}}'
        else:
            answer = "I cannot help with that."
        data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_backend_against_a_local_server(root):
    rows = [("train_1_a_1.nii.gz", "Emphysema in both lungs.", ""), ("train_2_a_1.nii.gz", "", "Cardiomegaly."),
            ("train_1_a_2.nii.gz", "Emphysema in both lungs.", "")]
    write_reports(root / "reports.csv", rows)
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        stats = decompose.run(decompose.get_args_parser().parse_args(
            ["--reports", str(root / "reports.csv"), "--data-root", str(root), "--no-pbar", "--backend", "openai",
             "--llm-url", url, "--llm-model", "qwen", "--batch-size", "2"]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert stats.llm_answers == 1 and stats.llm_fallbacks == 1 and stats.fallback_scans == ["train_2_a"]
    desc, conc = outputs(root)
    assert desc["train_1_a"] == {"heart": "Emphysema in both lungs."}  # the server's (odd) choice is used as given
    assert conc["train_2_a"] == {"heart": "Cardiomegaly."}  # invented sentence -> the rules
    # a server that is down: one line, exit 2, the outputs of the last run kept
    assert run(root, "--overwrite", "--backend", "openai", "--llm-url", "http://127.0.0.1:9/v1",
               "--llm-model", "qwen") == 2
    assert outputs(root) == (desc, conc)
