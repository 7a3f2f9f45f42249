"""Question/answer dataset files (fastarcher/data.py): loading, one-line errors naming file, line and field,
and the per-epoch shuffled order restored exactly from a sampler's state."""
import json

import pytest

from fastarcher.data import DatasetError, EpochSampler, fingerprint, load_dataset, load_records


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


def test_sampler_covers_each_epoch_once_in_a_new_order():
    sampler = EpochSampler(10, seed=3)
    first, second = sampler.take(10), sampler.take(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert (sampler.epoch, sampler.cursor) == (1, 10)
    assert EpochSampler(10, seed=3).take(20) == first + second  # batches may cross epochs
    assert EpochSampler(10, seed=4).take(10) != first
    assert EpochSampler(5, seed=3, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]


def test_sampler_state_restores_the_order_exactly():
    sampler = EpochSampler(7, seed=11, data_fingerprint="abc")
    sampler.take(5)
    sampler.take(6)  # into the second epoch
    state = json.loads(json.dumps(sampler.state_dict()))  # plain data: it survives a JSON round trip
    expected = sampler.take(12)
    resumed = EpochSampler(7, seed=11, data_fingerprint="abc")
    resumed.load_state_dict(state)
    assert resumed.take(12) == expected


@pytest.mark.parametrize("change, message", [
    ({"size": 8}, r"made with size 8, this run has 7"),
    ({"fingerprint": "zzz"}, r"made with fingerprint 'zzz', this run has 'abc' \(the dataset files or seed changed"),
    ({"seed": 1}, r"made with seed 1"),
    ({"cursor": 9}, r"bad position in the checkpoint \(epoch 0, cursor 9\)"),
    ({"epoch": -1}, r"bad position"),
])
def test_sampler_refuses_a_state_from_other_data(change, message):
    sampler = EpochSampler(7, seed=11, data_fingerprint="abc")
    state = {**sampler.state_dict(), **change}
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)


def test_fingerprint_follows_questions_and_answers(tmp_path):
    a = load_records(write(tmp_path, "a.jsonl", '{"question": "q", "answer": "1", "x": 1}\n'))
    b = load_records(write(tmp_path, "b.jsonl", '{"question": "q", "answer": 1, "x": 2}\n'))
    c = load_records(write(tmp_path, "c.jsonl", '{"question": "q", "answer": 2}\n'))
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
