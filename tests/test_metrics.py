"""Cross-rank metric reduction (fastarcher/metrics.py): sum for counts, max for times/memory, else mean."""
import pytest
import torch

from dist_helpers import dist_check_results
from fastarcher.metrics import reduce_metrics, reduction_of

torch.manual_seed(0)


@pytest.mark.parametrize("key, kind", [
    ("count/rollout_episodes", "sum"),
    ("count/fresh_generate_calls", "sum"),
    ("time/rollout_s", "max"),
    ("mem/peak_gib", "max"),
    ("rollout/success_rate", "mean"),
    ("critic/q_loss", "mean"),
    ("eval/return_mean", "mean"),
    ("perf/tokens_per_s", "mean"),
    ("counts_without_slash", "mean"),  # the prefix includes the slash
])
def test_reduction_kind_follows_the_key_prefix(key, kind):
    assert reduction_of(key) == kind


def test_single_process_reduction_is_an_identity_copy():
    local = {"count/x": 3.0, "time/y": 1.5, "rollout/z": -2.0}
    out = reduce_metrics(local, world_size=1)
    assert out == local and out is not local


def test_two_ranks_sum_max_and_mean_by_hand():
    # rank 0: count 1, time 10, mem 1, success 0;  rank 1: count 2, time 20, mem 2, success 2 (keys reordered)
    for rank in dist_check_results():
        assert rank["world_size"] == 2
        assert rank["metrics"]["reduced"] == {
            "count/episodes": 3.0,          # 1 + 2
            "time/rollout_s": 20.0,         # max(10, 20)
            "mem/peak_gib": 2.0,            # max(1, 2)
            "rollout/success_rate": 1.0,    # (0 + 2) / 2
        }


def test_metric_bag_sums_counts_and_averages_the_rest():
    from fastarcher.metrics import MetricBag

    bag = MetricBag()
    bag.add({"count/fresh_generate_calls": 1.0, "critic/q_loss": torch.tensor(2.0)})
    bag.add({"count/fresh_generate_calls": 1.0, "critic/q_loss": torch.tensor(4.0)})
    assert bag.means() == {"count/fresh_generate_calls": 2.0, "critic/q_loss": 3.0}
