"""Anatomy-wise texts from radiology reports: ``desc_info.json`` and ``conc_info.json`` (spec §1, §3).

``python -m data.decompose --reports CSV [CSV ...] --data-root DIR [--anatomy configs/anatomy/X.yaml]``

Each report row (CT-RATE's ``VolumeName``, ``Findings_EN``, ``Impressions_EN`` by default; other
names with ``--id-column``, ``--findings-column``, ``--impression-column``) is split into sentences;
``desc_info[scan][anatomy]`` joins the findings sentences about the anatomy, ``conc_info[scan][anatomy]``
the impression sentences, as the release's files do. An anatomy without an impression sentence gets no
``conc`` entry, so that data/texts.py composes it as normal (the release's rule); ``--abnormal-from
findings`` instead also writes, for such an anatomy, the findings sentences that state an abnormality
as its conclusion (configs/decompose.yaml ``normal_cues`` tell normal statements).

Backends:

- ``rules`` (default): deterministic. Sentences end at a run of ".", "!" or "?" followed by a space,
  a capital (CT-RATE often omits the space: "lungs.Linear"), a line break or the end; not inside numbers
  ("5.5x3.5 mm"), not after abbreviations ("approx. 5", configs/decompose.yaml). A sentence goes to every anatomy
  whose ``terms`` (the anatomy file) it names; a sentence naming none is dropped.
- ``hf`` (a local Hugging Face causal LM directory) and ``openai`` (an OpenAI-compatible server such
  as vLLM or SGLang): data.decompose_llm. Answers are cached by prompt hash (resumable); an answer that
  is not valid JSON or holds a sentence not in the report falls back to ``rules`` for that report.

Scan ids: a report's id is a volume name (``train_1_a_1.nii.gz``: its scan ``train_1_a``, the key the
dataset uses), a scan id, or an id given to ``data.import_ct`` (the scan of ``{split}_{id}_a_1.nii.gz``);
it must name a scan of the data root (its metadata CSVs or volumes). Reconstructions of one scan share
its report; scans of the data root without a report are counted in a warning (their anatomies would
train as normal).

Bad input (a missing column, a report with neither findings nor impression, an id that names no scan
of the data root, an anatomy without terms) is one line and exit 2, before anything is written; both
files are written atomically. Existing files (e.g. the release's) are replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

if __package__ in (None, ""):  # run as `python decompose.py` from inside data/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from data.common import METADATA_FILES, SPLITS, load_anatomy_terms, scan_id_of
from data.io import atomic_output, check_writable, run_lock
from utils.cli import UsageError, run_main
from utils.config import ConfigError, read_yaml, resolve_path

logger = logging.getLogger(__name__)

DEFAULT_ANATOMY = Path("configs/anatomy/ctrate.yaml")
DEFAULT_SETTINGS = Path("configs/decompose.yaml")
CTRATE_COLUMNS = {"id": "VolumeName", "findings": "Findings_EN", "impression": "Impressions_EN"}
MISSING_TEXT = "Not given."  # CT-RATE's empty report cell
DESC_FILE, CONC_FILE = "desc_info.json", "conc_info.json"
ABNORMAL_FROM = ("impression", "findings")


class DecomposeError(UsageError, ValueError):
    """Bad input or settings: the run does not start (one line, exit 2)."""


@dataclass(frozen=True)
class Report:
    scan_id: str
    findings: str
    impression: str


@dataclass
class Decomposition:
    """Sentences per anatomy of one report: ``desc`` from its findings, ``conc`` from its impression."""

    desc: dict[str, list[str]]
    conc: dict[str, list[str]]
    dropped: int = 0  # sentences about no listed anatomy


@dataclass(frozen=True)
class Settings:
    """configs/decompose.yaml."""

    abbreviations: frozenset[str]
    before_numbers: frozenset[str]
    normal_cue: re.Pattern
    other_organs: tuple[str, ...]
    llm: dict

    @classmethod
    def load(cls, path: str | Path = DEFAULT_SETTINGS) -> Settings:
        cfg = read_yaml(path, flag="--settings")
        try:
            settings = cls(frozenset(w.lower() for w in cfg["abbreviations"]),
                           frozenset(w.lower() for w in cfg["before_numbers"]),
                           re.compile("|".join(f"(?:{c})" for c in cfg["normal_cues"]), re.IGNORECASE),
                           tuple(str(w) for w in cfg["other_organs"]), dict(cfg["llm"]))
        except (KeyError, TypeError, AttributeError, re.error) as e:
            raise ConfigError(f"{resolve_path(path)}: needs abbreviations, before_numbers, normal_cues (regular "
                              f"expressions), other_organs and llm ({type(e).__name__}: {e})") from None
        llm = settings.llm
        if not (isinstance(llm.get("system"), str) and isinstance(llm.get("user"), str)
                and isinstance(llm.get("max_new_tokens"), int) and llm["max_new_tokens"] >= 1):
            raise ConfigError(f"{resolve_path(path)}: llm needs system and user (texts) and max_new_tokens (>= 1)")
        return settings


# ---------------------------------------------------------------------------- sentences

_TERMINATOR_RUN = re.compile(r"[.!?]+")
_WORD_BEFORE = re.compile(r"([A-Za-z](?:[A-Za-z]|\.(?=[A-Za-z]))*)$")  # "approx", "e.g"


def _ends_sentence(text: str, start: int, end: int, settings: Settings) -> bool:
    """Whether the terminator run ``text[start:end]`` ends a sentence (``end < len(text)``)."""
    nxt = text[end]
    if nxt.isupper():  # "lungs.Linear": CT-RATE's missing space
        return True
    if not nxt.isspace():  # "5.5x3.5", "e.g.,", ".)"
        return False
    rest = text[end:].lstrip()
    if not rest:
        return True
    word = _WORD_BEFORE.search(text[max(0, start - 16):start])
    word = word.group(1).lower() if word else ""
    if word in settings.abbreviations:
        return False
    return not (rest[0].isdigit() and word in settings.before_numbers)


def split_sentences(text: str, settings: Settings) -> list[str]:
    """Sentences of ``text`` (each stripped, terminators kept); line breaks end sentences too."""
    out: list[str] = []
    for line in text.splitlines():
        begin = 0
        for m in _TERMINATOR_RUN.finditer(line):
            if m.end() < len(line) and not _ends_sentence(line, m.start(), m.end(), settings):
                continue
            sentence = line[begin:m.end()].strip()
            if sentence:
                out.append(sentence)
            begin = m.end()
        tail = line[begin:].strip()
        if tail:
            out.append(tail)
    return out


def _word_starts(terms: Iterable[str]) -> re.Pattern:
    """Matches words that begin with one of ``terms``, case-insensitively; a space in a term matches spaces
    or hyphens ("ground glass" matches "ground-glass")."""
    return re.compile(r"\b(?:" + "|".join(r"[\s-]+".join(re.escape(w) for w in t.split()) for t in terms) + ")",
                      re.IGNORECASE)


class AnatomyMatcher:
    """The anatomies a sentence names (their ``terms``); none when it names one of ``other_organs`` that no
    anatomy's terms cover."""

    def __init__(self, terms: dict[str, list[str]], other_organs: Sequence[str] = ()) -> None:
        self.anatomies = list(terms)
        self._patterns = {a: _word_starts(ts) for a, ts in terms.items()}
        others = [w for w in other_organs if not any(p.search(w) for p in self._patterns.values())]
        self._other = _word_starts(others) if others else None

    def __call__(self, sentence: str) -> list[str]:
        if self._other is not None and self._other.search(sentence):
            return []
        return [a for a, p in self._patterns.items() if p.search(sentence)]


def decompose_by_rules(report: Report, matcher: AnatomyMatcher, settings: Settings) -> Decomposition:
    """The default backend: every sentence to the anatomies it names."""
    out = Decomposition({a: [] for a in matcher.anatomies}, {a: [] for a in matcher.anatomies})
    for section, by_anatomy in ((report.findings, out.desc), (report.impression, out.conc)):
        for sentence in split_sentences(section, settings):
            named = matcher(sentence)
            out.dropped += not named
            for a in named:
                by_anatomy[a].append(sentence)
    return out


def conclude_from_findings(d: Decomposition, settings: Settings) -> int:
    """``--abnormal-from findings``: an anatomy without a conclusion gets its findings sentences that state an
    abnormality (no ``normal_cues``) as one. Returns the number of anatomies changed (normal -> abnormal)."""
    changed = 0
    for a, sentences in d.desc.items():
        if not d.conc[a]:
            d.conc[a] = [s for s in sentences if not settings.normal_cue.search(s)]
            changed += bool(d.conc[a])
    return changed


# ---------------------------------------------------------------------------- input

def scan_aliases(data_root: Path) -> dict[str, str]:
    """Every id a report may carry -> its scan id: the volume names of the data root (metadata CSVs,
    ``{split}_fixed/`` and ``{split}/`` volumes), their scan ids, and the ids given to data.import_ct
    (an id imported into both splits is left out: its reports name the volume instead)."""
    from data.import_ct import volume_id, volume_name  # import_ct's naming, one place for it

    names: set[str] = set()
    for split in SPLITS:
        metadata = data_root / METADATA_FILES[split]
        if metadata.is_file():
            with open(metadata, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if "VolumeName" not in (reader.fieldnames or []):
                    raise DecomposeError(f"{metadata}: no VolumeName column: a CT-RATE metadata CSV has one")
                names.update(row["VolumeName"] for row in reader if row["VolumeName"])
        for folder in (data_root / f"{split}_fixed", data_root / split):
            names.update(p.name for p in folder.glob("*/*/*.nii.gz") if not p.name.startswith("."))
    if not names:
        raise DecomposeError(f"{data_root}: no scans found (metadata/*.csv or {{split}}_fixed/ volumes): set "
                             "--data-root to the data root, after data.import_ct for scans of your own")
    aliases = {n: scan_id_of(n) for n in names} | {scan_id_of(n): scan_id_of(n) for n in names}
    imported: dict[str, set[str]] = {}
    for n in names:
        split = n.split("_", 1)[0]
        if split in SPLITS and n.count("_") >= 3 and n == volume_name(split, volume_id(n)):
            imported.setdefault(volume_id(n), set()).add(scan_id_of(n))
    aliases |= {i: scans.pop() for i, scans in imported.items() if len(scans) == 1 and i not in aliases}
    return aliases


def _cell(row: dict, column: str) -> str:
    text = (row.get(column) or "").strip()
    return "" if text == MISSING_TEXT else text


def read_reports(paths: Sequence[Path], columns: dict[str, str], aliases: dict[str, str]) -> list[Report]:
    """One report per scan, from every row of the CSVs; ``DecomposeError`` on a missing column, an empty
    report or an id that names no scan. Rows of one scan with different texts keep the first (a warning)."""
    by_scan: dict[str, Report] = {}
    differing: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise DecomposeError(f"{path}: not found (set --reports)")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns.values() if c not in (reader.fieldnames or [])]
            if missing:
                raise DecomposeError(
                    f"{path}: no column {', '.join(map(repr, missing))} (it has {', '.join(reader.fieldnames or [])}):"
                    " name yours with --id-column, --findings-column, --impression-column")
            empty, unknown = [], []
            for line, row in enumerate(reader, start=2):
                rid = (row.get(columns["id"]) or "").strip()
                report = Report(aliases.get(rid, ""), _cell(row, columns["findings"]), _cell(row, columns["impression"]))
                if not report.findings and not report.impression:
                    empty.append(f"line {line} ({rid or 'no id'})")
                elif not report.scan_id:
                    unknown.append(rid or f"line {line} (no id)")
                elif by_scan.setdefault(report.scan_id, report) != report:
                    differing.append(report.scan_id)
        if empty:
            raise DecomposeError(f"{path}: {len(empty)} report(s) with neither findings nor impression, first "
                                 f"{empty[0]}: fill or remove them")
        if unknown:
            raise DecomposeError(f"{path}: {len(unknown)} id(s) name no scan of the data root, first {unknown[0]!r}: "
                                 "check --data-root and --id-column (an id imported into both splits: use its volume name)")
    if differing:
        logger.warning("%d scan(s) have rows with different report texts (first %s): kept each scan's first row",
                       len(set(differing)), differing[0])
    return list(by_scan.values())


# ---------------------------------------------------------------------------- run

@dataclass
class Stats:
    scans: int = 0
    sentences_kept: int = 0
    sentences_dropped: int = 0
    llm_answers: int = 0
    llm_fallbacks: int = 0  # answers not valid JSON, or with a sentence not in the report
    abnormal_from_findings: int = 0  # anatomies made abnormal by --abnormal-from findings
    fallback_scans: list[str] = field(default_factory=list)

    def line(self) -> str:
        llm = (f", LLM answers {self.llm_answers}, fallbacks to rules {self.llm_fallbacks}"
               if self.llm_answers or self.llm_fallbacks else "")
        return (f"decompose: {self.scans} scans, {self.sentences_kept} sentences kept, {self.sentences_dropped} "
                f"about no listed anatomy dropped{llm}, anatomies made abnormal from findings "
                f"{self.abnormal_from_findings}")


# A backend maps a batch of reports to their decompositions (None: fall back to the rules for that report).
Backend = Callable[[Sequence[Report]], list[Decomposition | None]]


def decompose_reports(reports: Sequence[Report], terms: dict[str, list[str]], settings: Settings, *,
                      backend: Backend | None = None, batch_size: int = 1, abnormal_from: str = "impression",
                      pbar: bool = True) -> tuple[dict, dict, Stats]:
    """``(desc_info, conc_info, stats)`` of ``reports``; ``backend`` None = the rules."""
    if abnormal_from not in ABNORMAL_FROM:
        raise ValueError(f"abnormal_from must be one of {ABNORMAL_FROM}, got {abnormal_from!r}")
    matcher = AnatomyMatcher(terms, settings.other_organs)
    stats = Stats(scans=len(reports))
    desc_info: dict[str, dict[str, str]] = {}
    conc_info: dict[str, dict[str, str]] = {}
    step = batch_size if backend is not None else 1
    with tqdm(total=len(reports), desc="decompose", disable=not pbar) as bar:
        for i in range(0, len(reports), step):
            batch = reports[i:i + step]
            answers = backend(batch) if backend is not None else [None] * len(batch)
            for report, d in zip(batch, answers, strict=True):
                if backend is not None:
                    stats.llm_answers += d is not None
                    if d is None:
                        stats.llm_fallbacks += 1
                        stats.fallback_scans.append(report.scan_id)
                if d is None:
                    d = decompose_by_rules(report, matcher, settings)
                if abnormal_from == "findings":
                    stats.abnormal_from_findings += conclude_from_findings(d, settings)
                stats.sentences_dropped += d.dropped
                stats.sentences_kept += sum(map(len, d.desc.values())) + sum(map(len, d.conc.values()))
                desc_info[report.scan_id] = {a: " ".join(s) for a, s in d.desc.items() if s}
                conc_info[report.scan_id] = {a: " ".join(s) for a, s in d.conc.items() if s}
            bar.update(len(batch))
    return desc_info, conc_info, stats


def write_outputs(out_dir: Path, desc_info: dict, conc_info: dict) -> None:
    """Both files, each written to a temporary and renamed (one after the other, at the very end)."""
    with atomic_output(out_dir / DESC_FILE) as desc_tmp, atomic_output(out_dir / CONC_FILE) as conc_tmp:
        desc_tmp.write_text(json.dumps(desc_info, ensure_ascii=False), encoding="utf-8")
        conc_tmp.write_text(json.dumps(conc_info, ensure_ascii=False), encoding="utf-8")


def get_args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data.decompose", description=__doc__.split("\n")[0])
    ap.add_argument("--reports", type=Path, nargs="+", required=True,
                    help="report CSV(s), e.g. radiology_text_reports/{train,validation}_reports.csv")
    ap.add_argument("--data-root", type=Path, required=True,
                    help="data root: its scans key the output, which is written there")
    ap.add_argument("--anatomy", type=Path, default=DEFAULT_ANATOMY,
                    help=f"anatomy file with terms per anatomy (default {DEFAULT_ANATOMY})")
    ap.add_argument("--settings", type=Path, default=DEFAULT_SETTINGS,
                    help=f"sentence splitting, normal cues, LLM prompt (default {DEFAULT_SETTINGS})")
    ap.add_argument("--id-column", default=CTRATE_COLUMNS["id"])
    ap.add_argument("--findings-column", default=CTRATE_COLUMNS["findings"])
    ap.add_argument("--impression-column", default=CTRATE_COLUMNS["impression"])
    ap.add_argument("--abnormal-from", choices=ABNORMAL_FROM, default="impression",
                    help="impression (the release's rule) or findings too (see the module docstring)")
    ap.add_argument("--backend", choices=("rules", "hf", "openai"), default="rules")
    ap.add_argument("--llm-model", help="hf: a local model directory; openai: the served model name")
    ap.add_argument("--llm-url", help="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--batch-size", type=int, default=8, help="reports per LLM batch (or requests in flight)")
    ap.add_argument("--device", default="cpu", help="hf: torch device")
    ap.add_argument("--overwrite", action="store_true", help="replace existing desc_info.json / conc_info.json")
    ap.add_argument("--no-pbar", action="store_true", help="no progress bar (cluster logs)")
    return ap


def run(args: argparse.Namespace) -> Stats:
    """The command; ``DecomposeError`` / ``ConfigError`` / ``PipelineError`` before anything is written."""
    root = Path(args.data_root)
    if not root.is_dir():
        raise DecomposeError(f"{root}: data root not found (set --data-root)")
    anatomy = resolve_path(args.anatomy)
    if not anatomy.is_file():
        raise DecomposeError(f"{anatomy}: anatomy file not found (set --anatomy)")
    terms = load_anatomy_terms(anatomy)
    settings = Settings.load(args.settings)
    if args.batch_size < 1:
        raise DecomposeError(f"--batch-size must be >= 1, got {args.batch_size}")
    existing = [str(root / n) for n in (DESC_FILE, CONC_FILE) if (root / n).exists()]
    if existing and not args.overwrite:
        raise DecomposeError(f"{', '.join(existing)} exist(s): --overwrite to replace")
    columns = {"id": args.id_column, "findings": args.findings_column, "impression": args.impression_column}
    if args.backend == "rules" and (args.llm_model or args.llm_url):
        raise DecomposeError("--llm-model / --llm-url are for --backend hf or openai (the default is rules)")
    aliases = scan_aliases(root)
    reports = read_reports(args.reports, columns, aliases)
    without = sorted(set(aliases.values()) - {r.scan_id for r in reports})
    if without:
        logger.warning("%d scan(s) of %s have no report in --reports (first %s): they get no texts, and would "
                       "train as normal", len(without), root, without[0])
    backend = None
    if args.backend != "rules":
        from data.decompose_llm import make_llm_backend
        backend = make_llm_backend(args.backend, model=args.llm_model, url=args.llm_url, anatomies=list(terms),
                                   settings=settings, cache_dir=root / ".decompose_cache", batch_size=args.batch_size,
                                   device=args.device)
    check_writable(root)
    with run_lock(root / ".decompose.lock", f"decompose in {root}"):
        desc_info, conc_info, stats = decompose_reports(
            reports, terms, settings, backend=backend, batch_size=args.batch_size,
            abnormal_from=args.abnormal_from, pbar=not args.no_pbar)
        write_outputs(root, desc_info, conc_info)
    logger.info("%s; wrote %s and %s", stats.line(), root / DESC_FILE, root / CONC_FILE)
    return stats


def main(argv: Iterable[str] | None = None) -> int:
    args = get_args_parser().parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main("decompose", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
