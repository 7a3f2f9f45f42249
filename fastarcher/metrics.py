"""Cross-rank reduction of per-iteration metrics, declared once per key prefix.

Each rank fills a flat dict of Python floats; `reduce_metrics` packs them into one tensor per
reduction kind and all-reduces it (the iteration's single logging sync point).
"""

from __future__ import annotations

import torch

from fastarcher.dist import all_reduce_max, all_reduce_sum

# Keys whose rank values are summed (counts) or maxed (wall times: the slowest rank sets the pace);
# every other key is averaged over ranks.
SUM_PREFIXES = ("count/",)
MAX_PREFIXES = ("time/", "mem/")


def reduction_of(key: str) -> str:
    if key.startswith(SUM_PREFIXES):
        return "sum"
    if key.startswith(MAX_PREFIXES):
        return "max"
    return "mean"


def reduce_metrics(local: dict[str, float], world_size: int) -> dict[str, float]:
    """All ranks must pass the same keys (in any order)."""
    if world_size == 1:
        return dict(local)
    keys = sorted(local)
    values = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)
    kinds = [reduction_of(k) for k in keys]
    summed = all_reduce_sum(values.clone())
    maxed = all_reduce_max(values.clone())
    out = {}
    for i, (key, kind) in enumerate(zip(keys, kinds)):
        if kind == "sum":
            out[key] = float(summed[i])
        elif kind == "max":
            out[key] = float(maxed[i])
        else:
            out[key] = float(summed[i]) / world_size
    return out


class MetricBag:
    """Collects 0-d tensors during an iteration; converted to floats once, at the logging point.

    `count/*` keys are summed over the iteration, all others averaged."""

    def __init__(self):
        self._values: dict[str, list[torch.Tensor | float]] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            self._values.setdefault(key, []).append(value)

    def means(self) -> dict[str, float]:
        out = {}
        for key, values in self._values.items():
            stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in values])
            # counts add up over the iteration; everything else is a mean over its steps (sync point)
            out[key] = float(stacked.sum() if key.startswith("count/") else stacked.mean())
        return out
