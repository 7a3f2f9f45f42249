"""Naive eager torch reference for per-token log-prob and entropy (the test oracle).

    logp_n = log softmax(z_n)[target_n],   H_n = -sum_v p_nv log p_nv,   z_n = logits_n / T

Everything is computed in float32 (float64 for float64 inputs) with plain autograd; the whole [N, V]
softmax is materialised, so this path is for tests and small inputs only. Entries equal to -inf (a
vocabulary mask) get p = 0 and contribute 0 to the entropy and receive zero gradient; rows whose
target equals `ignore_index` give logp = 0, entropy = 0 and no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def eager_logprob_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                          ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Oracle: `(logp (N,), entropy (N,))` via log_softmax + gather, differentiable by autograd."""
    valid = targets != ignore_index  # (N,)
    z = logits.to(compute_dtype(logits.dtype)) / temperature  # (N, V)
    # Ignored rows are replaced by zeros: a fully masked row cannot put NaN into the backward.
    z = torch.where(valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    p = logp_all.exp()  # (N, V)
    # p * log p with log p = -inf must be 0, and its gradient too: zero the -inf before the product
    # (a torch.where after the product would still send 0 * inf = NaN into the backward).
    safe_logp = logp_all.masked_fill(torch.isneginf(logp_all), 0.0)
    entropy = -(p * safe_logp).sum(-1)  # (N,)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe_targets[:, None]).squeeze(-1)  # (N,)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def eager_linear_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                 temperature: float = 1.0,
                                 ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Oracle for the fused LM head: logits = hidden @ weight.T in the input dtype, then eager."""
    logits = hidden @ weight.t()  # (N, V)
    return eager_logprob_entropy(logits, targets, temperature=temperature,
                                 ignore_index=ignore_index)


def plain_logprob_entropy(logits: Tensor, targets: Tensor, *,
                          temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The unfused baseline as it is usually written: float32 log_softmax, exp, gather.

    No -inf or ignore_index handling (NaN entropy on masked vocabularies): benchmarks use it as the
    "eager torch" baseline so that the oracle's extra safety passes do not inflate the ratios.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy
