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
dtype. Accumulation is float32, or float64 for float64 inputs (so `torch.autograd.gradcheck`
applies).
-inf entries give p = 0 and zero gradient; `ignore_index` rows give 0, 0 and a zero gradient row.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import compute_dtype

# Elements per chunk of float32 work (2^23 = 32 MiB): large enough to amortise the per-op overhead
# (thread start-up and barriers dominate on small ops), small next to the [N, V] gradient.
CHUNK_ELEMENTS = 1 << 23
# Floor for z - m and log p: -inf (masked entries) becomes a finite number whose exp is still
# exactly 0, so products with p are 0 rather than NaN, and multiplying it by a gradient coefficient
# up to 1e18 cannot overflow to -inf (which the lowest float would).
LOG_FLOOR = -1e20


def default_chunk_rows(V: int) -> int:
    """Rows per chunk so that one [rows, V] float32 buffer holds about CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _shifted(logits: Tensor, row_max: Tensor, temperature: float,
             out: Tensor | None = None) -> Tensor:
    """d = logits / T - row_max (C, V) in the compute dtype, in one pass (no copy of the logits)."""
    return torch.add(-row_max[:, None], logits, alpha=1.0 / temperature, out=out)


def chunk_forward(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                  ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(logp, entropy, row_max, log_sum)`, each (C,), of one chunk of rows, in the compute dtype.

    row_max is the max of z = logits / T (0 for a row that is all -inf) and log_sum = log sum
    exp(z - row_max) (0 for such a row), so that the backward of any row, ignored ones included,
    recomputes p without NaN.
    """
    valid = targets != ignore_index  # (C,)
    z_max = logits.amax(-1).to(compute_dtype(logits.dtype)) * (1.0 / temperature)  # (C,)
    row_max = torch.where(z_max == float("-inf"), torch.zeros_like(z_max), z_max)
    d = _shifted(logits, row_max, temperature)  # (C, V) z - m <= 0
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    d_target = d.gather(-1, safe_targets[:, None]).squeeze(-1)  # (C,) -inf if the target is masked
    d.clamp_(min=LOG_FLOOR)
    e = torch.exp(d)  # (C, V)
    s = e.sum(-1)  # (C,) >= 1 unless the row is all -inf
    a = e.mul_(d).sum(-1)  # (C,) sum e^d d <= 0; masked entries give 0 * LOG_FLOOR = 0
    log_s = torch.where(s > 0, torch.log(s), torch.zeros_like(s))
    entropy = log_s - a / s
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    return (torch.where(valid, d_target - log_s, zero), torch.where(valid, entropy, zero),
            row_max, log_s)


def chunk_backward(logits: Tensor, targets: Tensor, row_max: Tensor, log_sum: Tensor,
                   entropy: Tensor, dlogp: Tensor | None, dentropy: Tensor | None, *,
                   temperature: float = 1.0, ignore_index: int = -100,
                   out: Tensor | None = None) -> Tensor:
    """d(loss)/d(logits) (C, V) of one chunk in the compute dtype (into `out` if given).

    grad = -dH/T p (log p + H) - dlogp/T p + dlogp/T onehot
         = p (k log p + b) + dlogp/T onehot,   k = -dH/T,  b = -(dH H + dlogp)/T
    """
    valid = targets != ignore_index  # (C,)
    zeros = torch.zeros_like(entropy)
    coef_logp = torch.where(valid, dlogp.to(zeros.dtype), zeros) if dlogp is not None else zeros
    coef_entropy = (torch.where(valid, dentropy.to(zeros.dtype), zeros) if dentropy is not None
                    else zeros)
    k = -coef_entropy / temperature  # (C,)
    b = -(coef_entropy * entropy + coef_logp) / temperature  # (C,)
    b = torch.where(valid, b, zeros)  # entropy is 0 on ignored rows, but keep NaN out regardless
    logp = _shifted(logits, row_max, temperature, out=out)  # (C, V), becomes the gradient
    logp.sub_(log_sum[:, None]).clamp_(min=LOG_FLOOR)  # log p = (z - m) - log s
    p = torch.exp(logp)  # (C, V)
    grad = torch.addcmul(b[:, None], logp, k[:, None], out=logp).mul_(p)  # p (k log p + b)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    return grad.scatter_add_(-1, safe_targets[:, None], (coef_logp / temperature)[:, None])


class ChunkedLogprobEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked torch path.

    Saves the logits (no copy), the targets, row max, log-sum and entropy (one number per row
    each). Forward and backward each hold at most two [chunk_rows, V] compute-dtype buffers besides
    the outputs; the gradient is allocated once in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                chunk_rows: int) -> tuple[Tensor, Tensor]:
        N = logits.shape[0]
        cdt = compute_dtype(logits.dtype)
        logp = torch.empty(N, dtype=cdt, device=logits.device)
        entropy, row_max, log_sum = (torch.empty_like(logp) for _ in range(3))
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
        # When the logits are already in the compute dtype, each chunk is computed in place in
        # its slice of the gradient; otherwise in a float32 buffer, then rounded once.
        in_place = grad.dtype == compute_dtype(grad.dtype)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            chunk = chunk_backward(
                logits[rows], targets[rows], row_max[rows], log_sum[rows], entropy[rows],
                dlogp[rows] if dlogp is not None else None,
                dentropy[rows] if dentropy is not None else None,
                temperature=ctx.temperature, ignore_index=ctx.ignore_index,
                out=grad[rows] if in_place else None)
            if not in_place:
                grad[rows] = chunk
        return grad, None, None, None, None


def chunked_logprob_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                            ignore_index: int = -100,
                            chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunked torch `(logp (N,), entropy (N,))`; float32 outputs (float64 for float64 logits)."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(logits.shape[-1])
    return ChunkedLogprobEntropyFunction.apply(logits, targets, temperature, ignore_index,
                                               chunk_rows)
