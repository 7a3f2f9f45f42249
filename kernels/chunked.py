"""Chunked torch log-prob + entropy: the CPU fallback, memory-lean, same math as the Triton kernels.

    from fastarcher.kernels.chunked import chunked_logprob_entropy
    logp, entropy = chunked_logprob_entropy(logits, targets, temperature=1.0)  # (N,), (N,)

Rows are processed `chunk_rows` at a time, so the float32 working set is two [chunk_rows, V] buffers
instead of the several [N, V] float32 tensors that log_softmax + exp + p * log p + autograd keep.
Per chunk (z = logits / T, m = row max, d = z - m <= 0):

    s = sum e^d,  a = sum e^d d,  logp = (z[target] - m) - log s,  H = log s - a / s

which is the kernels' formula with the whole row as one block (H as a sum of two non-negative terms,
accurate for peaked rows). The backward recomputes log p = (z - m) - log s per chunk from the saved
m and log s (not lse = m + log s, whose rounding would be ~|z| * 6e-8 for large logits):
dlogits = (dlogp (onehot - p) - dH p (log p + H)) / T, written once into a gradient of the logits'
dtype. Accumulation is float32, or float64 for float64 inputs (so `torch.autograd.gradcheck` applies).
-inf entries give p = 0 and zero gradient; `ignore_index` rows give 0, 0 and a zero gradient row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import compute_dtype

# Elements per chunk of float32 work (2^22 = 16 MiB): large enough to amortise the per-op overhead.
CHUNK_ELEMENTS = 1 << 22


def default_chunk_rows(V: int) -> int:
    """Rows per chunk so that one [rows, V] float32 buffer holds about CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _scaled_copy(logits: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """z = logits / T in the compute dtype, a fresh buffer; ignored rows are set to 0 (no NaN)."""
    z = logits.to(compute_dtype(logits.dtype), copy=True)  # (C, V)
    if temperature != 1.0:
        z.div_(temperature)
    return z.masked_fill_(~valid[:, None], 0.0)


def chunk_forward(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                  ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(logp, entropy, row_max, log_sum)`, each (C,), of one chunk of rows, in the compute dtype."""
    valid = targets != ignore_index  # (C,)
    z = _scaled_copy(logits, valid, temperature)  # (C, V)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    z_target = z.gather(-1, safe_targets[:, None]).squeeze(-1)  # (C,)
    m = z.amax(-1, keepdim=True)  # (C, 1)
    d = z.sub_(m).clamp_(min=torch.finfo(z.dtype).min)  # (C, V) z - m <= 0; -inf -> lowest float
    e = torch.exp(d)  # (C, V)
    s = e.sum(-1)  # (C,) >= 1
    a = e.mul_(d).sum(-1)  # (C,) <= 0; e = 0 on masked entries, so 0 * lowest = 0
    m = m.squeeze(-1)
    log_s = torch.log(s)
    entropy = log_s - a / s
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = (z_target - m) - log_s
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), m, log_s


def chunk_backward(logits: Tensor, targets: Tensor, row_max: Tensor, log_sum: Tensor,
                   entropy: Tensor,
                   dlogp: Tensor | None, dentropy: Tensor | None, *, temperature: float = 1.0,
                   ignore_index: int = -100) -> Tensor:
    """d(loss)/d(logits) (C, V) of one chunk, in the compute dtype."""
    valid = targets != ignore_index  # (C,)
    logp = _scaled_copy(logits, valid, temperature)  # (C, V), becomes log p in place
    logp.sub_(row_max[:, None]).sub_(log_sum[:, None]).clamp_(min=torch.finfo(logp.dtype).min)
    p = torch.exp(logp)  # (C, V)
    grad = logp  # reuse the buffer: grad = -cH p (log p + H) - cL p + cL onehot
    grad.add_(entropy[:, None]).mul_(p)  # p (log p + H); 0 where p = 0
    zeros = torch.zeros_like(entropy)
    coef_entropy = (dentropy.to(grad.dtype) if dentropy is not None else zeros) / temperature
    coef_logp = (dlogp.to(grad.dtype) if dlogp is not None else zeros) / temperature
    coef_entropy = torch.where(valid, coef_entropy, zeros)
    coef_logp = torch.where(valid, coef_logp, zeros)
    grad.mul_(-coef_entropy[:, None]).sub_(p.mul_(coef_logp[:, None]))
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    grad.scatter_add_(-1, safe_targets[:, None], coef_logp[:, None])
    return grad


class ChunkedLogprobEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked torch path.

    Saves the logits (no copy), the targets, row max, log-sum and entropy (one number per row
    each). Forward and
    backward each hold at most two [chunk_rows, V] compute-dtype buffers besides the outputs; the
    gradient is allocated once in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                chunk_rows: int) -> tuple[Tensor, Tensor]:
        N = logits.shape[0]
        cdt = compute_dtype(logits.dtype)
        logp = torch.empty(N, dtype=cdt, device=logits.device)
        entropy, row_max, log_sum = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
        for start in range(0, N, chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp[rows], entropy[rows], row_max[rows], log_sum[rows] = chunk_forward(
                logits[rows], targets[rows], temperature=temperature, ignore_index=ignore_index)
        ctx.save_for_backward(logits, targets, row_max, log_sum, entropy)
        ctx.temperature, ctx.ignore_index, ctx.chunk_rows = temperature, ignore_index, chunk_rows
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dentropy: Tensor | None):
        logits, targets, row_max, log_sum, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (dlogp is None and dentropy is None):
            return None, None, None, None, None
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad[rows] = chunk_backward(
                logits[rows], targets[rows], row_max[rows], log_sum[rows], entropy[rows],
                dlogp[rows] if dlogp is not None else None,
                dentropy[rows] if dentropy is not None else None,
                temperature=ctx.temperature, ignore_index=ctx.ignore_index)
        return grad, None, None, None, None


def chunked_logprob_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                            ignore_index: int = -100,
                            chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunked torch `(logp (N,), entropy (N,))`; float32 outputs (float64 for float64 logits)."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(logits.shape[-1])
    return ChunkedLogprobEntropyFunction.apply(logits, targets, temperature, ignore_index,
                                               chunk_rows)
