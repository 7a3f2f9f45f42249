"""The policy's weights as an inference engine wants them: engine dtype, plain HF names, dtype-pure buckets.

A bucket is flattened into one byte buffer on the engine side (sglang's `FlattenedTensorBucket`), and each
tensor is viewed back from its byte offset; a tensor whose offset is not a multiple of its element size
cannot be viewed (`storage_offset() must be divisible by 4`). Buckets therefore hold one dtype each. The
FSDP2 state holds fp32 master weights even under a bf16 compute policy, so tensors are cast to the engine's
dtype before they are bucketed (half the bytes on the wire, and what the engine stores anyway).
"""

from __future__ import annotations

from typing import Collection, Iterable, Iterator

import torch
from torch import Tensor, nn

from fastarcher.lora import merged_tensors


def tied_output_names(model: nn.Module) -> set[str]:
    """Names the engine must not receive: with tied embeddings the output projection is the input
    embedding, and engines load `lm_head.weight` as a separate tensor (or refuse it)."""
    config = getattr(model, "config", None)
    return {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()


def engine_tensors(
    model: nn.Module, dtype: torch.dtype | None = None, skip: Collection[str] = ()
) -> Iterator[tuple[str, Tensor]]:
    """(plain HF name, full tensor) for every weight of `model` (LoRA merged), floating tensors cast to
    `dtype` (None: as stored), names in `skip` left out without gathering. Lazy: every rank must iterate it
    to the end in the same order (a sharded tensor's gather is a collective)."""
    for name, _, gather in merged_tensors(model):
        if name in skip:
            continue
        tensor = gather().detach()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name, tensor.contiguous()


def dtype_buckets(named: Iterable[tuple[str, Tensor]], cap_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Group tensors into buckets of one dtype and at most `cap_bytes` each, in arrival order per dtype.

    A tensor larger than the cap travels alone; no bucket is empty; at most one open bucket per dtype is
    held, so the memory held at once is about `cap_bytes` per dtype plus one tensor."""
    if cap_bytes <= 0:
        raise ValueError(f"bucket cap ({cap_bytes} bytes) must be positive")
    open_buckets: dict[torch.dtype, tuple[list[tuple[str, Tensor]], int]] = {}
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        bucket, size = open_buckets.get(tensor.dtype, ([], 0))
        if bucket and size + nbytes > cap_bytes:  # close it first: a dtype's tensors keep their order
            yield bucket
            bucket, size = [], 0
        if nbytes >= cap_bytes:
            open_buckets[tensor.dtype] = ([], 0)
            yield [(name, tensor)]
            continue
        bucket.append((name, tensor))
        open_buckets[tensor.dtype] = (bucket, size + nbytes)
    for bucket, _ in open_buckets.values():
        if bucket:
            yield bucket


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes the tensors' elements take (parameters, a bucket's tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def bucket_bytes(bucket: list[tuple[str, Tensor]]) -> int:
    return tensor_bytes(t for _, t in bucket)
