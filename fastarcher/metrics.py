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
