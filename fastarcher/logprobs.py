"""Per-token log-prob and entropy of target tokens: the only way the trainer computes them.

    from fastarcher.logprobs import token_logprobs_and_entropy, linear_token_logprobs_and_entropy
    logp, entropy = token_logprobs_and_entropy(logits, targets)                # (N,), (N,)
    logp, entropy = linear_token_logprobs_and_entropy(hidden, lm_head.weight, targets)

    logp_n = log softmax(z_n)[target_n],   entropy_n = -sum_v p_nv log p_nv,   z_n = logits_n / T

Backends (`backend=`):
  "auto"          Triton kernels for CUDA tensors, the chunked torch path otherwise (the default)
  "triton"        fused Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  "torch_chunked" row-chunked torch, memory-lean, any device (the CPU fallback)
  "eager"         log_softmax + gather over the full [N, V] (the test oracle; memory-hungry)

Contract, the same for every backend (see docs/kernels.md):
- `logits` (..., V) in any float dtype, `targets` (...) int64; leading dims are flattened and
  restored. Outputs are float32 (float64 for float64 inputs) and differentiable with respect to
  logits (or hidden and weight).
- Entries of logits equal to -inf (a vocabulary mask, e.g. tokens outside an allowed action set)
  have p = 0: logp and entropy stay finite and these entries get exactly zero gradient. A target on
  a masked entry has logp = -inf (its true value).
- Rows whose target equals `ignore_index` give logp = 0, entropy = 0 and no gradient.
- Targets must otherwise lie in [0, V); this is not checked on the device paths (it would sync).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from fastarcher.kernels.chunked import chunked_logprob_entropy
from fastarcher.kernels.linear_logprob_entropy import linear_logprob_entropy
from fastarcher.kernels.reference import eager_linear_logprob_entropy, eager_logprob_entropy

BACKENDS = ("auto", "triton", "torch_chunked", "eager")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Concrete backend for `device`: "auto" is "triton" on CUDA, "torch_chunked" elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch_chunked"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpret:
            raise ValueError(f"backend 'triton' needs CUDA tensors (got device {device}) or "
                             "TRITON_INTERPRET=1 set before triton is imported; use 'auto' or "
                             "'torch_chunked' on the CPU")
        if not _triton_available():
            raise ValueError("backend 'triton' needs the triton package; use 'torch_chunked'")
    return backend


def _check_args(targets: Tensor, leading: torch.Size, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if targets.shape != leading:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the leading dims "
                         f"{tuple(leading)} of the input")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets dtype ({targets.dtype}) must be torch.int64")


def token_logprobs_and_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                               ignore_index: int = -100,
                               backend: str = "auto") -> tuple[Tensor, Tensor]:
    """`(logp, entropy)`, each shaped like `targets`, under softmax(logits (..., V) / T)."""
    _check_args(targets, logits.shape[:-1], temperature)
    backend = resolve_backend(backend, logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_targets = targets.reshape(-1).long()  # (N,)
    if backend == "eager":
        logp, entropy = eager_logprob_entropy(flat_logits, flat_targets, temperature=temperature,
                                              ignore_index=ignore_index)
    elif backend == "torch_chunked":
        logp, entropy = chunked_logprob_entropy(flat_logits, flat_targets, temperature=temperature,
                                                ignore_index=ignore_index)
    else:
        from fastarcher.kernels.logprob_entropy import logprob_entropy

        logp, entropy = logprob_entropy(flat_logits, flat_targets, temperature=temperature,
                                        ignore_index=ignore_index)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def linear_token_logprobs_and_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                      temperature: float = 1.0, ignore_index: int = -100,
                                      backend: str = "auto",
                                      chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Same as `token_logprobs_and_entropy(hidden (..., H) @ weight (V, H).T, targets)`, computed
    `chunk_size` tokens at a time (default: chunk logits about the size of `hidden`) so that the
    [N, V] logits never exist; gradients flow to hidden and weight."""
    _check_args(targets, hidden.shape[:-1], temperature)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be (V, {hidden.shape[-1]})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size ({chunk_size}) must be >= 1 or None")
    backend = resolve_backend(backend, hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_targets = targets.reshape(-1).long()  # (N,)
    if backend == "eager":
        logp, entropy = eager_linear_logprob_entropy(flat_hidden, weight, flat_targets,
                                                     temperature=temperature,
                                                     ignore_index=ignore_index)
    else:
        logp, entropy = linear_logprob_entropy(flat_hidden, weight, flat_targets,
                                               temperature=temperature, ignore_index=ignore_index,
                                               chunk_size=chunk_size,
                                               use_triton=backend == "triton")
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)
