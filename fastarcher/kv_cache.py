"""Small helpers around transformers' KV cache, shared by the rollout engine and the scoring forward."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def cache_of(result):
    """The cache a forward returned (newer transformers call it `cache`, older ones `past_key_values`)."""
    cache = getattr(result, "cache", None)
    return cache if cache is not None else getattr(result, "past_key_values", None)


def cache_arg(model: nn.Module) -> str:
    """The forward argument that takes a cache: `cache` in newer transformers, else `past_key_values`
    (read from the transformers model under a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def plain_layers(cache) -> bool:
    """Every layer keeps all positions (no sliding window, no quantisation): what reuse relies on."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    shapes = {(tuple(layer.keys.shape[1:]), tuple(layer.values.shape[1:])) for layer in layers}
    return len(shapes) == 1  # rows are gathered from every layer alike


def select_rows(cache, index: Tensor, first_column: int = 0):
    """A new cache holding rows `index` of a plain cache (repeats allowed; differentiable), from column
    `first_column` on."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, index)[:, :, first_column:],
                                         layer.values.index_select(0, index)[:, :, first_column:])
                                        for layer in cache.layers])


def repeated_rows(rows: list[list[int]] | list[tuple], device) -> tuple[Tensor, Tensor] | None:
    """(index of each distinct row's first occurrence, each row's distinct index) as tensors on `device`, or
    None when fewer than half the rows repeat one: too little to share a forward for."""
    seen: dict[tuple, int] = {}
    first, inverse = [], []
    for i, row in enumerate(rows):
        key = tuple(row)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    if 2 * len(first) > len(inverse):
        return None
    return torch.tensor(first, device=device), torch.tensor(inverse, device=device)
