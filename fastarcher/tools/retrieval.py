"""Local retrieval: a `search` tool ranking the passages of a small corpus with BM25 (no network, no index
service). Corpus files are JSONL or a JSON list of objects with `text` (and optional `title`), read as
plain JSON. Paired with the `answer` tool of the action formats (fastarcher/tools/parse.py), it makes the
search-then-answer agent of retrieval QA recipes.

BM25 (Robertson & Zaragoza): score(q, d) = Σ_{t ∈ q} idf(t) · f(t, d)·(k1 + 1) / (f(t, d) + k1·(1 − b + b·|d|/avgdl)),
idf(t) = ln(1 + (N − n(t) + 0.5) / (n(t) + 0.5)); terms are lower-case runs of letters and digits.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastarcher.tools.base import ToolError

_TERM = re.compile(r"[a-z0-9]+")


def terms(text: str) -> list[str]:
    return _TERM.findall(text.lower())


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


class BM25:
    """BM25 scores of a fixed list of documents (their term lists)."""

    def __init__(self, documents: list[list[str]], k1: float = 1.5, b: float = 0.75):
        if not documents:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.counts = [Counter(d) for d in documents]
        self.lengths = [len(d) for d in documents]
        self.avgdl = max(sum(self.lengths) / len(documents), 1e-9)
        df = Counter(t for c in self.counts for t in c)
        n = len(documents)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for counts, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            out.append(sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm)
                           for t in query if counts.get(t)))
        return out


def load_corpus(files: list[str] | tuple[str, ...]) -> list[Passage]:
    """The passages of `files` (read by `fastarcher.data.read_json_items`); a bad file raises ValueError naming
    file, line and field."""
    from fastarcher.data import read_json_items

    passages: list[Passage] = []
    for name in files:
        items = read_json_items(name)
        for line, item in items:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
                raise ValueError(f"{name}:{line}: a passage needs 'text', a non-empty string")
            title = item.get("title", "")
            passages.append(Passage(str(title) if title is not None else "", item["text"]))
    if not passages:
        raise ValueError(f"corpus {', '.join(files)}: no passages")
    return passages


class Search:
    """`search(query)`: the `k` best BM25 passages, numbered, one per line."""

    name = "search"
    description = "Search the documents; returns the best matching passages."
    parameters = {"query": "string"}

    def __init__(self, passages: list[Passage], k: int = 2):
        if k <= 0:
            raise ValueError(f"search: k ({k}) must be positive")
        self.passages, self.k = passages, k
        self.index = BM25([terms(f"{p.title} {p.text}") for p in passages])

    @classmethod
    def from_files(cls, files: list[str] | tuple[str, ...], k: int = 2) -> "Search":
        return cls(load_corpus(files), k)

    def call(self, arguments: dict[str, Any]) -> str:
        query = terms(arguments["query"])
        if not query:
            raise ToolError("the query has no words")
        scores = self.index.scores(query)
        best = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], i))[: self.k]
        if not best:
            return "no passage matches"
        return " ".join(f"[{n}] {self._show(self.passages[i])}" for n, i in enumerate(best, 1))

    @staticmethod
    def _show(p: Passage) -> str:
        return f"{p.title}: {p.text}" if p.title else p.text
