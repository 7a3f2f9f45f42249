"""Trace artifacts: atomic writes, manifest/summary layout, documented step schema, token text spans."""
import json
import os

import numpy as np
import pytest
import torch

from fastarcher.traces import EntropyTraceConfig, EntropyTracer, InfluenceTraceConfig, InfluenceTracer
from fastarcher.traces import artifacts
from fastarcher.traces.artifacts import (
    ENTROPY_STEP_ARRAYS,
    INFLUENCE_STEP_ARRAYS,
    TraceWriter,
    atomic_write_bytes,
    load_step,
    read_manifest,
    read_summary,
    save_npz_atomic,
)
from fastarcher.traces.selection import token_text_spans
from fastarcher.traces.testing import policy_gradient_loss, tiny_causal_lm, token_logprobs

VOCAB = ["a", "b", " c", "é", "\n", "dd", " ", "x"] * 8  # 64 display pieces, one per token id


def _decode(ids):
    return "".join(VOCAB[i] for i in ids)


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind


def test_npz_refuses_object_arrays_and_loads_without_pickle(tmp_path):
    with pytest.raises(TypeError, match="dtype object"):
        save_npz_atomic(tmp_path / "a.npz", {"x": np.array([{"a": 1}], dtype=object)})
    save_npz_atomic(tmp_path / "a.npz", {"x": np.arange(3), "s": np.asarray(["hé", "b"], dtype=str)})
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        assert data["s"].tolist() == ["hé", "b"] and data["x"].tolist() == [0, 1, 2]


def test_manifest_replaces_a_rewritten_step_and_survives_reopen(tmp_path):
    writer = TraceWriter(tmp_path, "entropy_trace", {"a": 1}, {"extra": [1, 2]})
    writer.write_step(2, {"x": np.zeros(1)}, {"value": 1.0})
    writer.write_step(1, {"x": np.zeros(1)}, {"value": float("nan")})
    writer.write_step(2, {"x": np.ones(1)}, {"value": 3.0})
    records = read_manifest(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["value"] is None and records[1]["value"] == 3.0  # NaN is written as null
    assert records[1]["file"] == "steps/step_000002.npz"
    summary = read_summary(tmp_path)
    assert summary["steps"] == [1, 2] and summary["last_step"] == 2 and summary["extra"] == [1, 2]
    assert summary["schema_version"] == artifacts.SCHEMA_VERSION and summary["kind"] == "entropy_trace"
    reopened = TraceWriter(tmp_path, "entropy_trace", {"a": 1})
    reopened.write_step(3, {"x": np.zeros(1)}, {})
    assert [r["step"] for r in read_manifest(tmp_path)] == [1, 2, 3]
    assert load_step(tmp_path, 2)["x"].tolist() == [1.0]


def test_token_text_spans_from_prefix_decoding():
    text, offsets, pieces = token_text_spans([0, 2, 3, 4, 5], _decode, "a cé\nddEXTRA")
    assert text == "a cé\nddEXTRA"  # decoded tokens are a prefix: offsets index the given text
    assert pieces == ["a", " c", "é", "\n", "dd"]
    assert [text[a:b] for a, b in offsets] == pieces
    text, offsets, pieces = token_text_spans([1, 7], None, None)
    assert pieces == ["<1>", "<7>"] and (offsets == -1).all()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 8), generator=g)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, 3:] = True
    return ids, mask, torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)


def test_influence_step_file_has_the_documented_schema(tmp_path):
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    cfg = InfluenceTraceConfig(enabled=True, module_name_filter=("down_proj", "lm_head"), max_modules=2,
                               hessian_mode="inverse", profile_timing=True)
    tracer = InfluenceTracer(cfg, model, tmp_path)
    with tracer.capture(4, response_mask=mask, token_ids=ids, advantages=adv, rewards=torch.tensor([1.0, 0.0, 0.5])):
        policy_gradient_loss(token_logprobs(model, ids), mask, adv).backward()
    texts = [_decode(ids[r, 3:].tolist()) for r in range(3)]
    metrics = tracer.finish_step(4, texts=texts, decode=_decode)
    root = tmp_path / "influence_trace"
    data = load_step(root, 4)
    assert set(data) == set(INFLUENCE_STEP_ARRAYS)
    n, r = len(data["token_ids"]), 3
    assert data["response_offsets"].tolist() == [0, 5, 10, 15] and n == 15
    for key in ("token_positions", "token_scores", "token_grad_norm", "token_text"):
        assert data[key].shape == (n,), key
    for key in ("response_text", "response_scores", "rewards", "advantages", "accepted", "group_ids", "rank", "row"):
        assert data[key].shape == (r,), key
    assert data["text_offsets"].shape == (n, 2)
    assert data["response_text"].tolist() == texts
    assert "".join(data["token_text"][:5]) == texts[0]
    assert data["rewards"].tolist() == [1.0, 0.0, 0.5] and data["accepted"].tolist() == [1, -1, 1]
    assert data["module_names"].tolist() == ["model.layers.1.mlp.down_proj", "lm_head"]
    assert np.isfinite(data["damping"]) and data["damping"] > 0
    summary = read_summary(root)
    assert summary["kind"] == "influence_trace" and summary["steps"] == [4]
    assert [m["name"] for m in summary["modules"]] == data["module_names"].tolist()
    assert summary["projected_dim"] == sum(m["k_in"] * m["k_out"] for m in summary["modules"])
    (record,) = read_manifest(root)
    assert record["n_tokens"] == n and record["n_accepted"] == 2 and record["n_rejected"] == 1
    assert set(record["timing_s"]) >= {"forward_hook_s", "backward_hook_s", "gather_s", "score_s"}
    assert metrics["trace/influence_tokens"] == n and "time/trace_influence_score_s" in metrics
    assert not [p for p in root.rglob("*.tmp")]
    json.loads((root / "summary.json").read_text())  # valid JSON


def test_entropy_step_file_has_the_documented_schema(tmp_path):
    ids, mask, _ = _batch()
    entropy = torch.rand(3, 8, dtype=torch.float64) * 3
    tracer = EntropyTracer(EntropyTraceConfig(enabled=True, max_responses_per_step=2), tmp_path)
    metrics = tracer.record(0, entropy, mask, ids, decode=_decode)
    data = load_step(tmp_path / "entropy_trace", 0)
    assert set(data) == set(ENTROPY_STEP_ARRAYS)
    assert data["row"].tolist() == [0, 1] and data["response_offsets"].tolist() == [0, 5, 10]
    np.testing.assert_allclose(data["token_entropy"], entropy[:2, 3:].flatten().numpy(), rtol=1e-6)
    assert metrics["trace/entropy_tokens"] == 15.0  # statistics use every response, stored or not
