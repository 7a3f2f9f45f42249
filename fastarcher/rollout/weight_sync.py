"""Push the trained policy into a rollout engine: FSDP2 shards → full tensors → engine, in buckets.

Every rank calls this in the same order (`DTensor.full_tensor()` is an all-gather), and each rank's
engine receives the complete weights. Buckets cap the extra memory held at once at about `bucket_bytes`
(per dtype, `fastarcher.rollout.buckets`). An engine may declare `weight_dtype` (cast before bucketing),
`skip_names` (never sent) and `begin_weight_update` / `end_weight_update` (called around the buckets).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor, nn

from fastarcher.rollout.buckets import dtype_buckets, engine_tensors, tensor_bytes


def full_parameter_buckets(
    model: nn.Module, bucket_bytes: int, dtype: torch.dtype | None = None, skip: frozenset[str] = frozenset()
) -> Iterator[list[tuple[str, Tensor]]]:
    """Full tensors of `model` under their plain-architecture names (LoRA adapters merged into their base
    weights, `fastarcher.lora.merged_tensors`), cast to `dtype`, grouped into one-dtype buckets of at most
    `bucket_bytes` (a larger tensor travels alone)."""
    return dtype_buckets(engine_tensors(model, dtype, skip), bucket_bytes)


def sync_weights(model: nn.Module, engine, bucket_bytes: int) -> dict[str, float]:
    """Copy all parameters of `model` into `engine`; returns bytes, bucket count and seconds."""
    start = time.perf_counter()
    total, buckets = 0, 0
    begin, end = getattr(engine, "begin_weight_update", None), getattr(engine, "end_weight_update", None)
    if begin is not None:
        begin()
    for bucket in full_parameter_buckets(model, bucket_bytes, getattr(engine, "weight_dtype", None),
                                         frozenset(getattr(engine, "skip_names", ()))):
        engine.update_weights(bucket)
        total += tensor_bytes(t for _, t in bucket)
        buckets += 1
    if end is not None:
        end()
    return {"bytes": float(total), "buckets": float(buckets), "seconds": time.perf_counter() - start}
