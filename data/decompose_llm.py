"""LLM backends of data.decompose (opt-in): a local Hugging Face causal LM, or an OpenAI-compatible server.

The prompt is configs/decompose.yaml's ``llm`` (system + user template). Each report's answer must be one
JSON object ``{anatomy: {"findings": [...], "impression": [...]}}`` whose sentences all occur in the report's
section (whitespace aside); an answer that is not, or names an anatomy not in the file, is ``None``, and
data.decompose falls back to the rules for that report and counts it. Answers are appended to
``{data root}/.decompose_cache/answers.jsonl``, keyed by the hash of (model, prompt, report), so a killed run
resumes where it stopped; a torn last line (a kill mid-write) is skipped with a warning.

The quality of these backends is not measured (no LLM weights were reachable while building them); the
tests run their plumbing with a randomly initialised tiny model and a local HTTP server.
"""
from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from data.decompose import DecomposeError, Decomposition, Report, Settings

logger = logging.getLogger(__name__)

CACHE_FILE = "answers.jsonl"
SECTIONS = {"findings": "desc", "impression": "conc"}


def render_prompt(settings: Settings, report: Report, anatomies: Sequence[str]) -> tuple[str, str]:
    """(system, user) messages of one report."""
    user = (settings.llm["user"].replace("{anatomies}", ", ".join(anatomies))
            .replace("{findings}", report.findings or "(none)").replace("{impression}", report.impression or "(none)"))
    return settings.llm["system"], user


def _squash(text: str) -> str:
    return " ".join(text.split())


def parse_answer(answer: str, report: Report, anatomies: Sequence[str]) -> Decomposition | None:
    """The decomposition an answer gives, or None when it is not valid (see the module docstring)."""
    start, end = answer.find("{"), answer.rfind("}")
    try:
        obj = json.loads(answer[start:end + 1]) if start >= 0 else None
    except ValueError:
        return None
    if not isinstance(obj, dict) or not set(obj) <= set(anatomies):
        return None
    out = Decomposition({a: [] for a in anatomies}, {a: [] for a in anatomies})
    sections = {"findings": _squash(report.findings), "impression": _squash(report.impression)}
    for anatomy, parts in obj.items():
        if not isinstance(parts, dict) or not set(parts) <= set(SECTIONS):
            return None
        for section, sentences in parts.items():
            if not isinstance(sentences, list) or not all(
                    isinstance(s, str) and _squash(s) and _squash(s) in sections[section] for s in sentences):
                return None  # not a list of the report's own sentences: invented or rephrased text
            getattr(out, SECTIONS[section])[anatomy].extend(_squash(s) for s in sentences)
    return out


class AnswerCache:
    """Answers by prompt hash, appended one JSON line each (resumable)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CACHE_FILE
        self.answers: dict[str, str] = {}
        if self.path.is_file():
            torn = 0
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry["answer"]
                except (ValueError, KeyError, TypeError):
                    torn += 1
            if torn:
                logger.warning("%s: skipped %d unreadable line(s) (a killed run); their reports are asked again",
                               self.path, torn)

    def add(self, key: str, answer: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "answer": answer}) + "\n")
        self.answers[key] = answer


class LocalCausalLM:
    """A Hugging Face causal LM directory (e.g. Qwen2.5-7B-Instruct), greedy decoding, batched (left padding)."""

    def __init__(self, model_dir: str, *, max_new_tokens: int, device: str = "cpu") -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise DecomposeError(f"{path}: not a Hugging Face model directory (no config.json): set --llm-model")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.name = str(path.resolve())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype="auto")
            self.model.to(device)
        except (OSError, ValueError, RuntimeError) as e:  # missing files, unknown architecture, bad device
            raise DecomposeError(f"{path}: cannot load a causal LM and its tokenizer ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}): set --llm-model / --device") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def _text(self, system: str, user: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                tokenize=False, add_generation_prompt=True)
        return f"{system}\n\n{user}\n"

    def generate(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        enc = self.tokenizer([self._text(*p) for p in prompts], return_tensors="pt", padding=True).to(self.device)
        with self.torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class OpenAICompatible:
    """``POST {url}/chat/completions`` (vLLM, SGLang, ...), ``batch_size`` requests in flight, temperature 0."""

    def __init__(self, url: str, model: str, *, max_new_tokens: int, batch_size: int, timeout_s: float = 600) -> None:
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.name = f"{self.endpoint}#{model}"
        self.model, self.max_new_tokens, self.batch_size, self.timeout_s = model, max_new_tokens, batch_size, timeout_s

    def _ask(self, prompt: tuple[str, str]) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_new_tokens,
                           "messages": [{"role": "system", "content": prompt[0]},
                                        {"role": "user", "content": prompt[1]}]}).encode()
        request = urllib.request.Request(self.endpoint, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
            return reply["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise DecomposeError(f"{self.endpoint}: no usable reply ({type(e).__name__}: {e}); check --llm-url and "
                                 "--llm-model; answers so far are cached, a rerun resumes") from None

    def generate(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
            return list(pool.map(self._ask, prompts))


class LLMBackend:
    """data.decompose's backend: cached answers, else the model's, parsed (None = fall back to the rules)."""

    def __init__(self, client: LocalCausalLM | OpenAICompatible, anatomies: Sequence[str], settings: Settings,
                 cache: AnswerCache) -> None:
        self.client, self.anatomies, self.settings, self.cache = client, list(anatomies), settings, cache

    def __call__(self, reports: Sequence[Report]) -> list[Decomposition | None]:
        prompts = [render_prompt(self.settings, r, self.anatomies) for r in reports]
        keys = [hashlib.sha256(json.dumps([self.client.name, *p]).encode()).hexdigest() for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self.cache.answers]
        if todo:
            for i, answer in zip(todo, self.client.generate([prompts[i] for i in todo]), strict=True):
                self.cache.add(keys[i], answer)
        return [parse_answer(self.cache.answers[k], r, self.anatomies) for k, r in zip(keys, reports)]


def make_llm_backend(kind: str, *, model: str | None, url: str | None, anatomies: Sequence[str], settings: Settings,
                     cache_dir: Path, batch_size: int, device: str = "cpu") -> LLMBackend:
    """``kind`` "hf" (``model`` = a local directory) or "openai" (``url`` + served ``model`` name)."""
    max_new_tokens = settings.llm["max_new_tokens"]
    if not model:
        raise DecomposeError(f"--backend {kind} needs --llm-model (hf: a local model directory; openai: the served "
                             "model's name)")
    if kind == "hf":
        client: LocalCausalLM | OpenAICompatible = LocalCausalLM(model, max_new_tokens=max_new_tokens, device=device)
    elif kind == "openai":
        if not url:
            raise DecomposeError("--backend openai needs --llm-url (the server's base URL, e.g. http://127.0.0.1:8000/v1)")
        client = OpenAICompatible(url, model, max_new_tokens=max_new_tokens, batch_size=batch_size)
    else:
        raise ValueError(f"unknown LLM backend {kind!r}")
    return LLMBackend(client, anatomies, settings, AnswerCache(cache_dir))
