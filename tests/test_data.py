"""Question/answer dataset files (fastarcher/data.py): loading, and one-line errors naming file, line and field."""
import json

import pytest

from fastarcher.data import DatasetError, load_dataset, load_records


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json_and_jsonl_load_with_extra_fields_and_sources(tmp_path):
    rows = [{"question": "2+2?", "answer": 4, "level": 1}, {"question": "Capital of France?", "answer": "Paris"}]
    a = write(tmp_path, "a.json", json.dumps(rows, indent=2))
    b = write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    for path in (a, b):
        records = load_records(path)
        assert [(r.question, r.answer, r.fields) for r in records] == [
            ("2+2?", "4", {"level": 1}), ("Capital of France?", "Paris", {})]
    assert [r.source for r in load_records(a)] == [f"{a}:2", f"{a}:7"]
    assert [r.source for r in load_records(b)] == [f"{b}:1", f"{b}:2"]
    assert len(load_dataset([str(a), str(b)])) == 4


@pytest.mark.parametrize("name, text, message", [
    ("x.json", "", r"x.json: the file is empty"),
    ("x.json", "[]", r"x.json: holds no records"),
    ("x.jsonl", "\n\n", r"x.jsonl: holds no records"),
    ("x.json", '{"question": "q", "answer": "a"}', r"x.json:1: a .json dataset must be a list of objects"),
    ("x.json", '[\n {"question": "q", "answer": "a"},\n {"question": "q" "answer": "a"}\n]',
     r"x.json:3: invalid JSON: Expecting ',' delimiter \(column 19\)"),
    ("x.json", '[\n {"question": "q", "answer": "a"}\n\n', r"x.json:4: invalid JSON: expected ',' or ']' after a record"),
    ("x.json", '[{"question": "q", "answer": "a"}]\n[1]', r"x.json:2: invalid JSON: extra data after the list"),
    ("x.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q", "answer": \n',
     r"x.jsonl:2: invalid JSON: Expecting value"),
    ("x.jsonl", '{"question": "q", "answer": "a"}\n\n["q", "a"]\n', r"x.jsonl:3: a record must be a JSON object, got list"),
    ("x.jsonl", '{"question": "q"}\n', r"x.jsonl:1: field 'answer' is missing \(fields: 'question'\)"),
    ("x.json", '[{"answer": "a"},\n {"q": 1}]', r"x.json:1: field 'question' is missing"),
    ("x.jsonl", '{"question": 3, "answer": "a"}\n', r"x.jsonl:1: field 'question' must be a non-empty string, got 3"),
    ("x.jsonl", '{"question": "  ", "answer": "a"}\n', r"x.jsonl:1: field 'question' must be a non-empty string"),
    ("x.jsonl", '{"question": "q", "answer": true}\n', r"x.jsonl:1: field 'answer' must be a string or a number, got bool"),
    ("x.jsonl", '{"question": "q", "answer": null}\n', r"x.jsonl:1: field 'answer' must be a string or a number, got NoneType"),
    ("x.jsonl", '{"question": "q", "answer": ["a"]}\n', r"x.jsonl:1: field 'answer' must be a string or a number, got list"),
    ("x.csv", "question,answer\n", r"x.csv: a dataset file must end in .json"),
])
def test_bad_files_are_refused_naming_file_line_and_field(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(DatasetError, match=message):
        load_records(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nope.jsonl: no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"question": "\xff"}')
    with pytest.raises(DatasetError, match=r"bin.jsonl: not UTF-8 text \(byte 14\)"):
        load_records(tmp_path / "bin.jsonl")
    with pytest.raises(DatasetError, match=r"no dataset files given"):
        load_dataset([])
