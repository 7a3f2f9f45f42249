"""The `search` tool (fastarcher/tools/retrieval.py): BM25 scores against hand-computed values, ranking,
corpus file errors, and a search-then-answer episode of the `qa` env over the corpus shipped with the tests."""
import json
import math
from pathlib import Path

import pytest

from fastarcher.envs import EnvConfig, QAConfig, make_env
from fastarcher.tools import Search, ToolCall, run_tool
from fastarcher.tools.retrieval import BM25, Passage, load_corpus, terms

DATA = Path(__file__).parent / "data"


def test_bm25_matches_hand_computed_scores():
    docs = [terms("Lima is the capital of Peru"), terms("Paris is the capital of France"), terms("Peru borders Chile")]
    index = BM25(docs)  # N = 3, avgdl = 5, k1 = 1.5, b = 0.75
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # 'peru' and 'capital' are in 2 of 3 documents
    norm6, norm3 = 1.5 * (0.25 + 0.75 * 6 / 5), 1.5 * (0.25 + 0.75 * 3 / 5)
    assert index.scores(["peru"]) == pytest.approx([idf * 2.5 / (1 + norm6), 0.0, idf * 2.5 / (1 + norm3)])
    assert index.scores(["capital", "peru"]) == pytest.approx(
        [2 * idf * 2.5 / (1 + norm6), idf * 2.5 / (1 + norm6), idf * 2.5 / (1 + norm3)])
    assert index.scores(["tokyo"]) == [0.0, 0.0, 0.0]


def test_search_returns_the_best_passages_in_order():
    search = Search.from_files([str(DATA / "corpus.jsonl")], k=2)
    out = run_tool({"search": search}, ToolCall("search", {"query": "What is the capital of Peru?"}))
    assert out.startswith("[1] Peru: Lima is the capital of Peru.") and "[2]" in out
    assert run_tool({"search": search}, ToolCall("search", {"query": "highest mountain Japan"})).startswith("[1] Japan:")
    assert run_tool({"search": search}, ToolCall("search", {"query": "zzz qqq"})) == "no passage matches"
    assert run_tool({"search": search}, ToolCall("search", {"query": "?!"})) == "error: the query has no words"
    assert run_tool({"search": search}, ToolCall("search", {"query": 3})).startswith("error: search argument 'query'")
    assert len(run_tool({"search": search}, ToolCall("search", {"query": "capital"}), max_chars=50)) == 50


@pytest.mark.parametrize("content, message", [
    ('{"title": "x"}\n', r"c.jsonl:1: a passage needs 'text'"),
    ('{"text": "a"}\n{"text": \n', r"c.jsonl:2: invalid JSON"),
    ("\n", r"no passages"),
])
def test_bad_corpus_files_are_refused_naming_the_line(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_corpus([str(path)])
    with pytest.raises(ValueError, match=message):
        make_env(EnvConfig(name="qa", qa=QAConfig(train_files=(str(DATA / "capitals.jsonl"),), tools=("search",),
                                                  corpus_files=(str(path),))))


def test_search_without_a_corpus_is_refused():
    with pytest.raises(ValueError, match="no corpus"):
        make_env(EnvConfig(name="qa", qa=QAConfig(train_files=(str(DATA / "capitals.jsonl"),), tools=("search",))))


@pytest.mark.parametrize("action_format", ["json", "react"])
def test_search_then_answer_episodes(action_format):
    cfg = QAConfig(train_files=(str(DATA / "capitals.jsonl"),), tools=("search",), corpus_files=(str(DATA / "corpus.jsonl"),),
                   reward="qa_em", action_format=action_format, shuffle=False)
    env = make_env(EnvConfig(name="qa", qa=cfg))
    records = [json.loads(line) for line in (DATA / "capitals.jsonl").read_text().splitlines()]
    for seed, record in enumerate(records):
        assert "search (query)" in env.reset(seed=seed)
        obs, reward, done, _ = env.step(env.oracle_action())  # the record's search call
        assert obs.startswith(f"Observation: [1] ") and record["answer"] in obs and (reward, done) == (0.0, False)
        answer = (json.dumps({"name": "answer", "arguments": {"answer": record["answer"].lower()}})
                  if action_format == "json" else f"Action: answer Action Input: the {record['answer']}")
        assert env.step(answer)[1:3] == (1.0, True)  # qa_em: case and articles do not matter


def test_passages_show_their_title():
    assert Search._show(Passage("T", "body")) == "T: body" and Search._show(Passage("", "body")) == "body"
