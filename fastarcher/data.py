"""Question/answer datasets from JSON files, checked record by record.

A file is a JSON list of objects (`.json`) or one object per line (`.jsonl`; blank lines are skipped).
Each object needs `question` (a non-empty string) and `answer` (a string or a number); every other field
is kept and reaches the reward function. Any problem stops loading with the file, the line and the
field: a missing file, invalid JSON, an empty file, a record that is not an object, a missing field or
one of the wrong type. Files are parsed as plain JSON data: nothing in them is ever executed.

The order of the records in training is the `qa` env's (fastarcher/envs/qa.py): a function of the seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names file, line and field."""


@dataclass(frozen=True)
class Record:
    question: str
    answer: str
    fields: dict[str, Any]
    """The record's other fields (for the reward)."""
    source: str
    """`file:line` where the record starts, for messages."""


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _json_list_items(text: str, path: str) -> list[tuple[int, Any]]:
    """(line, value) of each element of the JSON list in `text`, so errors can name the line."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if pos == len(text):
        raise DatasetError(f"{path}: the file is empty")
    if text[pos] != "[":
        raise DatasetError(f"{path}:{_line_of(text, pos)}: a .json dataset must be a list of objects "
                           f"(use .jsonl for one object per line)")
    pos += 1
    items: list[tuple[int, Any]] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]" and not items:
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
        items.append((_line_of(text, pos), value))
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            break
        raise DatasetError(f"{path}:{_line_of(text, pos)}: invalid JSON: expected ',' or ']' after a record")
    rest = text[pos + 1:]
    if rest.strip():
        offset = pos + 1 + (len(rest) - len(rest.lstrip()))
        raise DatasetError(f"{path}:{_line_of(text, offset)}: invalid JSON: extra data after the list")
    return items


def _jsonl_items(text: str, path: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: invalid JSON: {error.msg} (column {error.colno})") from None
    return items


def _record(value: Any, where: str) -> Record:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(value).__name__}")
    for name in ("question", "answer"):
        if name not in value:
            raise DatasetError(f"{where}: field '{name}' is missing (fields: {', '.join(map(repr, value)) or 'none'})")
    question, answer = value["question"], value["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DatasetError(f"{where}: field 'answer' must be a string or a number, got {type(answer).__name__}")
    fields = {k: v for k, v in value.items() if k not in ("question", "answer")}
    return Record(question=question, answer=str(answer), fields=fields, source=where)


def read_json_items(path: str | Path) -> list[tuple[int, Any]]:
    """(line, value) of every item of one .json file (a list) or .jsonl file (one per line), read as plain
    JSON; DatasetError names the file and line of a problem. Shared by datasets and retrieval corpora."""
    path = Path(path)
    shown = str(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DatasetError(f"{shown}: a dataset file must end in .json (a list of objects) or .jsonl (one per line)")
    if not path.is_file():
        raise DatasetError(f"{shown}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{shown}: not UTF-8 text (byte {error.start})") from None
    return _json_list_items(text, shown) if path.suffix == ".json" else _jsonl_items(text, shown)


def load_records(path: str | Path) -> list[Record]:
    """Every record of one .json or .jsonl file, checked (DatasetError names file, line and field)."""
    items = read_json_items(path)
    if not items:
        raise DatasetError(f"{path}: holds no records")
    return [_record(value, f"{path}:{line}") for line, value in items]


def load_dataset(paths: list[str]) -> list[Record]:
    """The records of several files, in the order given."""
    if not paths:
        raise DatasetError("no dataset files given")
    return [record for path in paths for record in load_records(path)]
