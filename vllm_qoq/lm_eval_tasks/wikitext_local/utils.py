"""Data and scoring for the `wikitext_local` lm-eval task.

Documents: the raw WikiText-2 test file split into articles, each starting at a
top-level heading line " = Title = " (one '=' each side; " = = Section = = "
lines stay inside their article).  Windows line endings are normalised.

Scoring follows the built-in `wikitext` task: the rolling log-likelihood of the
*detokenized* article, while words (whitespace split) and UTF-8 bytes are counted
on the original article text, so that word_perplexity / byte_perplexity /
bits_per_byte are comparable with numbers from that task (on the same text).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
_TITLE = re.compile(r" = [^=].* = ")


def split_articles(text: str) -> list[str]:
    """Articles of a raw WikiText file (each one begins with its top-level title line)."""
    lines = text.replace("\r\n", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if _TITLE.fullmatch(line)]
    if not starts:
        raise ValueError("no top-level ' = Title = ' heading found: not a raw WikiText file")
    bounds = starts + [len(lines)]
    docs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        body = "\n".join(lines[a:b]).rstrip("\n") + "\n"
        docs.append(body)
    return docs


def load_documents(path: str | None = None, **_ignored):
    """custom_dataset hook: {"test": Dataset of {"page": article}}.  `path` via --metadata."""
    import datasets

    p = Path(path or os.environ.get("VLLM_QOQ_WIKITEXT", "") or _DEFAULT)
    if not p.is_file():
        raise FileNotFoundError(
            f"WikiText-2 raw test file not found at {p}; pass --metadata '{{\"path\": \"/abs/wiki.test.raw\"}}'"
        )
    docs = split_articles(p.read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})


# Detokenization of WikiText's tokenized text, in the order the built-in task applies it.
_LITERAL_BEFORE = (
    ("s '", "s'"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
)
_PAIRS = tuple(
    (re.compile(rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}"), rf"{o}\1{c}")
    for o, c in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))
)
_LITERAL_AFTER = (
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "), (" 's", "'s"),
)


def detokenize(doc: dict) -> str:
    s = doc["page"]
    for a, b in _LITERAL_BEFORE:
        s = s.replace(a, b)
    for rx, rep in _PAIRS:
        s = rx.sub(lambda m, o=rep[0], c=rep[-1]: f"{o}{m.group(1)}{c}", s)
    for a, b in _LITERAL_AFTER:
        s = s.replace(a, b)
    return s


def process_results(doc: dict, results):
    (ll,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (ll, words), "byte_perplexity": (ll, nbytes), "bits_per_byte": (ll, nbytes)}
