"""Entropy trace: hand-computed statistics, per-token storage, caps and micro-batch accumulation."""
import math

import numpy as np
import pytest
import torch

from fastarcher.traces import EntropyTraceConfig, EntropyTracer
from fastarcher.traces.artifacts import load_step, read_manifest
from fastarcher.traces.entropy import entropy_statistics


def test_statistics_hand_computed():
    # values 0.1, 0.5, 2.0, 3.0: mean 1.4; linear quantiles: q0.5 = (0.5 + 2.0) / 2 = 1.25,
    # q0.25 at index 0.75 -> 0.1 + 0.75 * 0.4 = 0.4; share above 1.0 nats = 2 / 4
    stats = entropy_statistics(np.array([2.0, 0.1, 3.0, 0.5]), (0.25, 0.5), 1.0)
    assert stats == pytest.approx({"entropy_mean": 1.4, "entropy_q25": 0.4, "entropy_q50": 1.25,
                                   "high_entropy_share": 0.5})
    empty = entropy_statistics(np.zeros(0), (0.5,), 1.0)
    assert all(math.isnan(v) for v in empty.values())


def _inputs(batch=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 2:] = True
    mask[1, :] = False  # a row with no response tokens is skipped
    entropy = torch.rand(batch, length, generator=g, dtype=torch.float64) * 2
    return entropy, mask, ids


def test_record_stores_entropies_at_response_tokens_and_reports_statistics(tmp_path):
    entropy, mask, ids = _inputs()
    cfg = EntropyTraceConfig(enabled=True, quantiles=(0.5, 0.9), high_entropy_threshold=0.8, max_tokens_per_response=3)
    tracer = EntropyTracer(cfg, tmp_path)
    metrics = tracer.record(5, entropy, mask, ids, rewards=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    values = entropy[mask].numpy()
    assert metrics["trace/entropy_mean"] == pytest.approx(values.mean())
    assert metrics["trace/entropy_q50"] == pytest.approx(np.quantile(values, 0.5))
    assert metrics["trace/entropy_q90"] == pytest.approx(np.quantile(values, 0.9))
    assert metrics["trace/high_entropy_share"] == pytest.approx((values > 0.8).mean())
    data = load_step(tmp_path / "entropy_trace", 5)
    assert data["row"].tolist() == [0, 2, 3]
    assert data["n_response_tokens"].tolist() == [4, 4, 4]
    assert data["response_offsets"].tolist() == [0, 3, 6, 9]  # first 3 tokens of each
    assert data["token_positions"].tolist() == [2, 3, 4] * 3
    expected = torch.cat([entropy[r, 2:5] for r in (0, 2, 3)]).numpy()
    np.testing.assert_allclose(data["token_entropy"], expected, rtol=1e-6)
    np.testing.assert_array_equal(data["token_ids"], torch.cat([ids[r, 2:5] for r in (0, 2, 3)]).numpy())
    assert data["rewards"].tolist() == [1.0, 3.0, 4.0]
    np.testing.assert_allclose(data["quantile_values"], [np.quantile(values, 0.5), np.quantile(values, 0.9)])
    (record,) = read_manifest(tmp_path / "entropy_trace")
    assert record["n_tokens"] == values.size and record["high_entropy_threshold"] == 0.8


def test_micro_batches_of_one_step_accumulate(tmp_path):
    e1, m1, i1 = _inputs(seed=1)
    e2, m2, i2 = _inputs(seed=2)
    tracer = EntropyTracer(EntropyTraceConfig(enabled=True, max_responses_per_step=4), tmp_path)
    tracer.record(0, e1, m1, i1)
    metrics = tracer.record(0, e2, m2, i2)
    both = np.concatenate([e1[m1].numpy(), e2[m2].numpy()])
    assert metrics["trace/entropy_mean"] == pytest.approx(both.mean())
    assert metrics["trace/entropy_tokens"] == both.size
    data = load_step(tmp_path / "entropy_trace", 0)
    assert data["row"].tolist() == [0, 2, 3, 4]  # 3 from the first call, 1 more (row 0 of the second) up to the cap
    tracer.record(1, e2, m2, i2)  # a new step starts afresh
    assert load_step(tmp_path / "entropy_trace", 1)["row"].tolist() == [0, 2, 3]


def test_disabled_and_off_steps_do_nothing(tmp_path):
    entropy, mask, ids = _inputs()
    assert EntropyTracer(EntropyTraceConfig(), tmp_path).record(0, entropy, mask, ids) == {}
    tracer = EntropyTracer(EntropyTraceConfig(enabled=True, every_n_steps=3), tmp_path)
    assert tracer.record(1, entropy, mask, ids) == {}
    assert tracer.record(3, entropy, mask, ids) != {}
    assert [r["step"] for r in read_manifest(tmp_path / "entropy_trace")] == [3]


def test_shape_mismatch_is_reported(tmp_path):
    entropy, mask, ids = _inputs()
    tracer = EntropyTracer(EntropyTraceConfig(enabled=True), tmp_path)
    with pytest.raises(ValueError, match="per-token values shape"):
        tracer.record(0, entropy[:, :-1], mask, ids)
