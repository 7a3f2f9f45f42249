"""Fused per-token log-prob + entropy from logits, as Triton kernels (forward and backward).

    from fastarcher.kernels.logprob_entropy import logprob_entropy
    logp, entropy = logprob_entropy(logits, targets, temperature=1.0)  # (N,), (N,)

Forward: one program per row streams the vocabulary in blocks of BLOCK_V with an online recurrence
over z = logits / temperature (m: running max, s: sum of exp(z - m), a: sum exp(z - m) (z - m)),
so neither the softmax nor any [N, V] float32 copy is ever written. At the end

    lse = m + log s,   logp = (z[target] - m) - log s,   H = lse - sum_v p z = log s - a / s.

Keeping `a` relative to the running max makes both terms of H non-negative (s >= 1, z - m <= 0): no
cancellation, so float32 entropy stays accurate even for nearly one-hot rows (the form lse - sum p z
subtracts two numbers of the size of the logits). When the max grows from m to m', the accumulators
are rescaled exactly: s' = s e^(m - m'), a' = e^(m - m') (a + (m - m') s).

The row max m and log s are saved (not their sum lse): log p = (z - m) - log s is then exact to
float32 rounding of small numbers even when the logits are large (z - lse would carry the rounding
error of lse, about |z| * 6e-8).

Backward: one program per (row, vocab block) recomputes p = exp((z - m) - log s) and writes

    dlogits = (dlogp (onehot - p) - dH p (log p + H)) / temperature

(d lse / dz = p and dH/dz = -p (log p + H); log p + H = z - sum p z) into a fresh buffer or, for the
fused LM head, in place over the logits it read.

Numerics: loads in the input dtype (fp32/bf16/fp16), accumulation and outputs in float32; z is
formed as logits * (1/T), a multiply (as in the chunked torch path). Entries equal to -inf (a
vocabulary mask) get p = 0: z - m is clamped to the lowest float32, so p (z - m) is 0 * finite = 0
rather than 0 * -inf = NaN, and their gradient is exactly 0. Lanes past V load -inf and are handled
the same way; the running max starts at -inf (not 0), so all-negative rows are exact. Rows whose
target equals `ignore_index` give logp = 0, H = 0 and a zero gradient row. Targets must otherwise
lie in [0, V) (not checked: that would cost a device sync). Row offsets are computed in int64 so
N * V may exceed 2^31.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Under TRITON_INTERPRET=1 every program runs serially in numpy: few, wide programs are fastest.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK_V = 32768 if INTERPRET else 4096
NUM_WARPS = 8
FLOAT32_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _logprob_entropy_fwd_kernel(logits_ptr, logits_row_stride, targets_ptr, logp_ptr, entropy_ptr,
                                row_max_ptr, log_sum_ptr, V, inv_temperature, ignore_index,
                                BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((), tl.float32)  # sum exp(z - m)
    a = tl.zeros((), tl.float32)  # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        z = z * inv_temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        # Reference point: the new max, or 0 while the row has only seen -inf (then s = a = 0).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # <= 0
        scale = tl.exp(shift)
        # z - m_ref <= 0; -inf (masked entries and lanes) is clamped to the most negative float so
        # that e * d = 0 * -3.4e38 = 0 instead of 0 * -inf = NaN.
        d = tl.maximum(z - m_ref, FLOAT32_LOWEST)  # (BLOCK_V,)
        e = tl.exp(d)
        ed = e * d
        a = scale * (a + shift * s) + tl.sum(ed, 0)
        s = scale * s + tl.sum(e, 0)
        m = m_new

    log_s = tl.log(s)
    entropy = log_s - a / s
    safe_target = tl.where(valid, target, 0)
    z_target = tl.load(row_ptr + safe_target).to(tl.float32) * inv_temperature
    logp = (z_target - m) - log_s
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)


@triton.jit
def _logprob_entropy_bwd_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride,
                                targets_ptr, row_max_ptr, log_sum_ptr, entropy_ptr, dlogp_ptr,
                                dentropy_ptr,
                                V, inv_temperature, ignore_index, HAS_DLOGP: tl.constexpr,
                                HAS_DENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    row_max = tl.load(row_max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    coef_logp = 0.0
    if HAS_DLOGP:
        coef_logp = tl.load(dlogp_ptr + row).to(tl.float32) * inv_temperature
    coef_entropy = 0.0
    if HAS_DENTROPY:
        coef_entropy = tl.load(dentropy_ptr + row).to(tl.float32) * inv_temperature

    offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = offs < V
    z = tl.load(logits_ptr + row * logits_row_stride + offs, mask=in_row,
                other=float("-inf")).to(tl.float32) * inv_temperature
    # log p, with -inf (masked entries) clamped so that p (log p + H) = 0 * finite = 0, not NaN.
    logp = tl.maximum((z - row_max) - log_sum, FLOAT32_LOWEST)  # (BLOCK_V,)
    p = tl.exp(logp)
    p_logp_h = p * (logp + entropy)
    grad = -coef_logp * p - coef_entropy * p_logp_h
    grad += tl.where(offs == target, coef_logp, 0.0)
    grad = tl.where(valid, grad, 0.0)  # ignored rows: zero, even if their logits are all -inf
    tl.store(grad_ptr + row * grad_row_stride + offs, grad.to(grad_ptr.dtype.element_ty),
             mask=in_row)


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def logprob_entropy_forward(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                            ignore_index: int = -100,
                            block_v: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel: `(logp, entropy, row_max, log_sum)`, each (N,) float32."""
    N, V = logits.shape
    assert logits.stride(-1) == 1, f"logits must be contiguous in V, got strides {logits.stride()}"
    targets = targets.contiguous()
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    entropy, row_max, log_sum = (torch.empty_like(logp) for _ in range(3))
    if N == 0:
        return logp, entropy, row_max, log_sum
    _logprob_entropy_fwd_kernel[(N,)](
        logits, logits.stride(0), targets, logp, entropy, row_max, log_sum, V, 1.0 / temperature,
        ignore_index, BLOCK_V=_block_v(V, block_v), num_warps=NUM_WARPS)
    return logp, entropy, row_max, log_sum


def logprob_entropy_backward(logits: Tensor, targets: Tensor, row_max: Tensor, log_sum: Tensor,
                             entropy: Tensor,
                             dlogp: Tensor | None, dentropy: Tensor | None, *,
                             temperature: float = 1.0, ignore_index: int = -100,
                             out: Tensor | None = None, block_v: int | None = None) -> Tensor:
    """Launch the backward kernel: d(loss)/d(logits) (N, V) in `out` (may alias `logits`)."""
    N, V = logits.shape
    assert logits.stride(-1) == 1, f"logits must be contiguous in V, got strides {logits.stride()}"
    grad = torch.empty_like(logits) if out is None else out
    assert grad.shape == logits.shape and grad.stride(-1) == 1, (grad.shape, grad.stride())
    if N == 0:
        return grad
    BLOCK_V = _block_v(V, block_v)
    # Unused pointers still need a tensor argument; the constexpr flags skip their loads.
    _logprob_entropy_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
        logits, logits.stride(0), grad, grad.stride(0), targets.contiguous(), row_max, log_sum,
        entropy, dlogp.contiguous() if dlogp is not None else entropy,
        dentropy.contiguous() if dentropy is not None else entropy,
        V, 1.0 / temperature, ignore_index, HAS_DLOGP=dlogp is not None,
        HAS_DENTROPY=dentropy is not None, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return grad


class LogprobEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels.

    Saves the logits (no copy), the targets and three float32 numbers per row (max, log-sum,
    entropy); the
    backward recomputes p block by block and returns a gradient in the logits' dtype (computed in
    float32, rounded once on store). Either output may be unused: its gradient is then skipped.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float,
                ignore_index: int) -> tuple[Tensor, Tensor]:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        logp, entropy, row_max, log_sum = logprob_entropy_forward(
            logits, targets, temperature=temperature, ignore_index=ignore_index)
        ctx.save_for_backward(logits, targets, row_max, log_sum, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dentropy: Tensor | None):
        logits, targets, row_max, log_sum, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (dlogp is None and dentropy is None):
            return None, None, None, None
        grad = logprob_entropy_backward(logits, targets, row_max, log_sum, entropy, dlogp, dentropy,
                                        temperature=ctx.temperature,
                                        ignore_index=ctx.ignore_index)
        return grad, None, None, None


def logprob_entropy(logits: Tensor, targets: Tensor, *, temperature: float = 1.0,
                    ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Triton `(logp (N,), entropy (N,))` of `targets (N,)` under softmax(logits (N, V) / T)."""
    return LogprobEntropyFunction.apply(logits, targets, temperature, ignore_index)
