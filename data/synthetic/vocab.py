"""The demo text encoder's vocabulary and config (`configs/demo_bert/`): every word the generator can
write and every word of the zero-shot prompts, so that no demo text has an unknown token."""
from __future__ import annotations

import json
import re
from pathlib import Path

from data.io import write_text
from data.synthetic.reports import (ABSENT_DESC, AORTA_LOCATIONS, CLINICAL, CONC, DESC, EFFUSION_SIDES,
                                    FINDINGS_EXTRA, LABEL_COLUMNS, LOBES, NORMAL_DESC, NORMAL_IMPRESSION,
                                    TECHNIQUE, load_anatomies)
from data.texts import normal_template
from utils.config import REPO_ROOT

ZEROSHOT_ITEMS = REPO_ROOT / "configs" / "zeroshot_items.yaml"
DEMO_BERT_DIR = REPO_ROOT / "configs" / "demo_bert"

_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _words(text: str) -> list[str]:
    """Lowercase words as BERT's basic tokenizer splits them (punctuation handled separately)."""
    return re.findall(r"[a-z]+", re.sub(r"\{[a-z_]+\}", " ", text.lower()))


def build_demo_vocab() -> list[str]:
    """WordPiece vocabulary of the demo BERT: special tokens, every character (plain and ##), then every
    word the generator can write and every word of the zero-shot prompts, sorted. Deterministic."""
    import yaml

    with open(ZEROSHOT_ITEMS, encoding="utf-8") as f:
        items = yaml.safe_load(f)["items"]
    anatomies = [a for a, _ in load_anatomies()]
    texts: list[str] = [TECHNIQUE, FINDINGS_EXTRA, NORMAL_IMPRESSION, *CLINICAL, *AORTA_LOCATIONS]
    texts += [normal_template(a) for a in anatomies]
    texts += [s for group in (CONC, DESC, ABSENT_DESC, NORMAL_DESC) for options in group.values() for s in options]
    texts += [s for pair in list(LOBES.values()) + list(EFFUSION_SIDES.values()) for s in pair]
    texts += ["and another nodule in the", *LABEL_COLUMNS]
    texts += [str(x) for item in items for x in item]
    words = sorted({w for t in texts for w in _words(t)} - set("abcdefghijklmnopqrstuvwxyz"))
    chars = list(_PUNCT) + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz")
    cont = ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + cont + words


def write_demo_bert(config_dir: str | Path = DEMO_BERT_DIR) -> None:
    """Write vocab.txt, config.json (tiny random BERT) and tokenizer_config.json of the demo text encoder."""
    d = Path(config_dir)
    vocab = build_demo_vocab()
    # A random BERT at the usual init scale (std 0.02) gives almost the same [CLS] vector for
    # every text (cosine 0.9998), which parks contrastive training on its ln(N) plateau;
    # std 0.3 makes distinct texts distinct from the first step. No dropout: the demo is short.
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab),
              "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
              "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.3,
              "layer_norm_eps": 1e-12, "pad_token_id": 0}
    tok = {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}
    write_text(d / "vocab.txt", "\n".join(vocab) + "\n")
    write_text(d / "config.json", json.dumps(config, indent=2) + "\n")
    write_text(d / "tokenizer_config.json", json.dumps(tok, indent=2) + "\n")
