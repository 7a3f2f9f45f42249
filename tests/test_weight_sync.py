"""Weight sync (fastarcher/rollout/weight_sync.py): FSDP2 shards → full tensors → engine, in capped buckets.

The 2-process test trains a `fully_shard`ed tiny Llama for a few AdamW steps under torchrun (gloo) and
checks every rank's engine against the gathered `full_tensor()` weights, bit for bit.
"""
import copy

import pytest
import torch
from torch import nn

from dist_helpers import SYNC_BUCKET_BYTES, _expected_bucket_count, dist_check_results, tiny_policy
from fastarcher.rollout.hf_engine import HFEngine
from fastarcher.rollout.weight_sync import full_parameter_buckets, sync_weights

torch.manual_seed(0)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Recorder:
    """An engine stand-in that records each bucket it receives."""

    def __init__(self):
        self.buckets: list[list[tuple[str, torch.Tensor]]] = []

    def update_weights(self, named):
        self.buckets.append([(n, t.clone()) for n, t in named])


def test_expected_bucket_count_helper_by_hand():
    # cap 10: [4, 4] | [8] | [20] | [1, 1]  -> 4 buckets
    assert _expected_bucket_count([4, 4, 8, 20, 1, 1], 10) == 4
    assert _expected_bucket_count([10, 10], 10) == 2
    assert _expected_bucket_count([], 10) == 0


@pytest.mark.parametrize("cap", [1, 300, 1000, 10**9])
def test_buckets_respect_the_cap_and_keep_parameter_order(cap):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 4), nn.LayerNorm(4))  # fp32
    engine = Recorder()
    stats = sync_weights(model, engine, bucket_bytes=cap)
    names = [n for n, _ in model.named_parameters()]
    sizes = [nbytes(p) for _, p in model.named_parameters()]
    assert [n for bucket in engine.buckets for n, _ in bucket] == names
    for bucket in engine.buckets:
        total = sum(nbytes(t) for _, t in bucket)
        assert total <= cap or len(bucket) == 1, (cap, [(n, nbytes(t)) for n, t in bucket])
    assert len(engine.buckets) == _expected_bucket_count(sizes, cap)
    assert stats["buckets"] == len(engine.buckets)
    assert stats["bytes"] == sum(sizes)
    if cap == 1:
        assert len(engine.buckets) == len(names)  # every tensor alone
    if cap == 10**9:
        assert len(engine.buckets) == 1


def test_full_parameter_buckets_yield_detached_copies_of_plain_parameters():
    model = nn.Linear(3, 2)
    (bucket,) = list(full_parameter_buckets(model, 10**6))
    assert [n for n, _ in bucket] == ["weight", "bias"]
    assert all(not t.requires_grad for _, t in bucket)
    assert torch.equal(bucket[0][1], model.weight)


def test_sync_into_hf_engine_single_process_makes_outputs_equal():
    policy, tok = tiny_policy(torch.float32, seed=0)
    engine = HFEngine(copy.deepcopy(policy), pad_id=tok.pad_token_id, device=torch.device("cpu"))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    probe = torch.randint(3, len(tok), (2, 6))
    with torch.no_grad():
        assert not torch.equal(engine.model(input_ids=probe).logits, policy(input_ids=probe).logits)
        sync_weights(policy, engine, bucket_bytes=4096)
        for (name, p), (name_e, q) in zip(policy.named_parameters(), engine.named_parameters()):
            assert name == name_e and torch.equal(p, q)
        assert torch.equal(engine.model(input_ids=probe).logits, policy(input_ids=probe).logits)
    # The engine's copy is its own: it never aliases the training parameters.
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(policy.parameters(), engine.model.parameters()))


def test_engine_rejects_unknown_parameter_names():
    policy, tok = tiny_policy(torch.float32)
    engine = HFEngine(policy, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    with pytest.raises(KeyError, match="no_such.weight"):
        engine.update_weights([("no_such.weight", torch.zeros(1))])


# ---------------------------------------------------------------- 2 processes, FSDP2, gloo


@pytest.fixture(scope="module")
def ranks():
    return [r["weight_sync"] for r in dist_check_results()]


def test_two_ranks_training_parameters_are_really_sharded(ranks):
    for r in ranks:
        assert r["sharded"] and all(r["sharded"].values()), r["sharded"]


def test_two_ranks_engine_equals_gathered_weights_exactly_after_sync(ranks):
    for r in ranks:
        assert r["names_engine"] == r["names_train"]
        assert len(r["equal_after_sync"]) == len(r["names_train"]) > 0
        assert all(r["equal_after_sync"].values()), {k: v for k, v in r["equal_after_sync"].items() if not v}
        assert r["logits_max_diff"] == 0.0  # the FSDP policy and the engine compute the same function
    # Both ranks' engines hold the same (complete) weights.
    assert ranks[0]["engine_checksum"] == ranks[1]["engine_checksum"]


def test_two_ranks_weights_moved_away_from_initial_values(ranks):
    for r in ranks:
        assert len(r["changed_from_init"]) == len(r["names_train"])
        assert all(r["changed_from_init"].values()), {k: v for k, v in r["changed_from_init"].items() if not v}


def test_two_ranks_buckets_respect_the_size_cap(ranks):
    for r in ranks:
        assert r["bucket_order"] == r["train_order"]
        for bucket in r["buckets"]:
            assert sum(size for _, size in bucket) <= SYNC_BUCKET_BYTES or len(bucket) == 1, bucket
        assert len(r["buckets"]) == r["expected_buckets"] == r["stats"]["buckets"]
        assert 1 < len(r["buckets"]) < len(r["train_order"])  # the cap actually groups and splits
        assert r["stats"]["bytes"] == r["total_bytes"]
