"""Push the trained policy into a rollout engine: FSDP2 shards → full tensors → engine, in buckets.

Every rank calls this in the same order (`DTensor.full_tensor()` is an all-gather), and each rank's
engine receives the complete weights. Buckets cap the extra memory held at once at `bucket_bytes`.
"""

from __future__ import annotations

import time
from typing import Iterator

from torch import Tensor, nn

from fastarcher.lora import merged_tensors


def full_parameter_buckets(model: nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Full tensors of `model` under their plain-architecture names (LoRA adapters merged into their base
    weights, `fastarcher.lora.merged_tensors`), grouped into buckets of at most `bucket_bytes`."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, nbytes, gather in merged_tensors(model):
        # Close the bucket before gathering a tensor that would overflow it (a DTensor reports its
        # global numel), so at most `bucket_bytes` of full tensors are held at once; a single tensor
        # larger than the cap travels alone.
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, gather()))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(model: nn.Module, engine, bucket_bytes: int) -> dict[str, float]:
    """Copy all parameters of `model` into `engine`; returns bytes, bucket count and seconds."""
    start = time.perf_counter()
    total, buckets = 0, 0
    for bucket in full_parameter_buckets(model, bucket_bytes):
        engine.update_weights(bucket)
        total += sum(t.numel() * t.element_size() for _, t in bucket)
        buckets += 1
    return {"bytes": float(total), "buckets": float(buckets), "seconds": time.perf_counter() - start}
