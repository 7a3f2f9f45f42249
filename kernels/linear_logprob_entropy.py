"""Per-token log-prob + entropy fused with the LM head: the [N, V] logits never exist at once.

    from fastarcher.kernels.linear_logprob_entropy import linear_logprob_entropy
    logp, entropy = linear_logprob_entropy(hidden, weight, targets, use_triton=True)  # (N,), (N,)

Tokens are processed `chunk_size` rows at a time (the approach of Liger-Kernel's fused linear cross
entropy and verl's linear_cross_entropy): logits_c = hidden_c @ weight.T in the input dtype (what an
unfused LM head produces), then the row op (Triton kernels, or the chunked torch math on the CPU)
gives logp, entropy, row max and log-sum-exp; only these four float32 numbers per token are kept.

Unlike a scalar loss, logp and entropy are per-token outputs whose upstream gradients are unknown
during the forward, so the backward recomputes each chunk's logits (one extra matmul) and turns them
in place into dlogits (C, V), then dhidden_c = dlogits @ weight and dweight += dlogits.T @ hidden_c.
dweight of a bf16/fp16 weight is accumulated across chunks in float32 (then rounded once), as
Liger does; it costs V * H * 4 bytes, usually far less than the logits it replaces.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import chunked
from .reference import compute_dtype

# Rows of V-wide float32 work per slab when a low-precision weight gradient is accumulated in fp32
# without an fp32-output GEMM (bounds the temporary to about this many elements).
WEIGHT_GRAD_SLAB_ELEMENTS = 1 << 24
_fp32_output_gemm_works = True  # torch.addmm(..., out_dtype=float32) on CUDA; cleared if it fails


def default_chunk_size(N: int, H: int, V: int) -> int:
    """Tokens per chunk: chunk logits about the size of `hidden` (Liger's rule), and at least
    CHUNK_ELEMENTS of them (fewer, larger matmuls), never more than N."""
    by_hidden = 1 << max(0, (-(-N * H // V) - 1).bit_length())  # next power of 2 of ceil(N H / V)
    return max(1, min(N, max(chunked.CHUNK_ELEMENTS // V, by_hidden)))


def _row_forward(logits: Tensor, targets: Tensor, temperature: float, ignore_index: int,
                 use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_triton:
        from .logprob_entropy import logprob_entropy_forward

        return logprob_entropy_forward(logits, targets, temperature=temperature,
                                       ignore_index=ignore_index)
    return chunked.chunk_forward(logits, targets, temperature=temperature,
                                 ignore_index=ignore_index)


def _row_backward(logits: Tensor, targets: Tensor, row_max: Tensor, log_sum: Tensor,
                  entropy: Tensor, dlogp: Tensor | None, dentropy: Tensor | None,
                  temperature: float, ignore_index: int, use_triton: bool) -> Tensor:
    """dlogits (C, V) in the logits' dtype, written over `logits` where the dtype allows."""
    if use_triton:
        from .logprob_entropy import logprob_entropy_backward

        return logprob_entropy_backward(logits, targets, row_max, log_sum, entropy, dlogp, dentropy,
                                        temperature=temperature, ignore_index=ignore_index,
                                        out=logits)
    in_place = logits.dtype == compute_dtype(logits.dtype)  # else a float32 buffer, rounded once
    grad = chunked.chunk_backward(logits, targets, row_max, log_sum, entropy, dlogp, dentropy,
                                  temperature=temperature, ignore_index=ignore_index,
                                  out=logits if in_place else None)
    return grad.to(logits.dtype)


def _accumulate_weight_grad(dweight: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
    """dweight (V, H) += dlogits (C, V).T @ hidden (C, H); dweight may be wider than the inputs."""
    if dweight.dtype == dlogits.dtype:
        dweight.addmm_(dlogits.t(), hidden)
        return
    global _fp32_output_gemm_works
    if dweight.is_cuda and _fp32_output_gemm_works:
        try:  # cuBLAS GEMM with bf16/fp16 inputs and an fp32 output: no temporary at all
            torch.addmm(dweight, dlogits.t(), hidden, out_dtype=dweight.dtype, out=dweight)
            return
        except (RuntimeError, TypeError):  # older torch: remember, and use the slabs below
            _fp32_output_gemm_works = False
    # Fallback: slabs of the vocabulary, so the low-precision temporary stays small.
    slab = max(1, WEIGHT_GRAD_SLAB_ELEMENTS // hidden.shape[1])
    for start in range(0, dweight.shape[0], slab):
        vocab = slice(start, start + slab)
        dweight[vocab] += (dlogits[:, vocab].t() @ hidden).to(dweight.dtype)


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of the fused LM head + log-prob/entropy.

    Saves hidden and weight (no copies), the targets and float32 max, log-sum and entropy per
    token. The
    forward holds one [chunk_size, V] logits chunk (plus the row op's working set); the backward
    holds one chunk of logits that becomes its gradient, dhidden (N, H) and dweight (V, H).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                ignore_index: int, chunk_size: int, use_triton: bool) -> tuple[Tensor, Tensor]:
        N = hidden.shape[0]
        out_dtype = compute_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=out_dtype, device=hidden.device)
        entropy, row_max, log_sum = (torch.empty_like(logp) for _ in range(3))
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.t()  # (C, V)
            logp[rows], entropy[rows], row_max[rows], log_sum[rows] = _row_forward(
                logits, targets[rows], temperature, ignore_index, use_triton)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.chunk_size, ctx.use_triton = chunk_size, use_triton
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp: Tensor | None, dentropy: Tensor | None):
        hidden, weight, targets, row_max, log_sum, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (dlogp is None and dentropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None, None
        dhidden = torch.empty_like(hidden) if need_hidden else None
        dweight = None
        if need_weight:
            low_precision = weight.dtype in (torch.bfloat16, torch.float16)
            acc_dtype = torch.float32 if low_precision else weight.dtype
            dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = hidden[rows] @ weight.t()  # (C, V), recomputed
            dlogits = _row_backward(
                logits, targets[rows], row_max[rows], log_sum[rows], entropy[rows],
                dlogp[rows] if dlogp is not None else None,
                dentropy[rows] if dentropy is not None else None,
                ctx.temperature, ctx.ignore_index, ctx.use_triton)  # (C, V)
            if dhidden is not None:
                torch.mm(dlogits, weight, out=dhidden[rows])  # (C, H)
            if dweight is not None:
                _accumulate_weight_grad(dweight, dlogits, hidden[rows])
        if dweight is not None:
            dweight = dweight.to(weight.dtype)
        return dhidden, dweight, None, None, None, None, None


def linear_logprob_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                           temperature: float = 1.0, ignore_index: int = -100,
                           chunk_size: int | None = None,
                           use_triton: bool = True) -> tuple[Tensor, Tensor]:
    """`(logp (N,), entropy (N,))` of `targets (N,)` under softmax(hidden (N, H) @ weight (V, H).T
    / T), `chunk_size` tokens at a time; `use_triton` picks the row op (else chunked torch)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(N, H, V)
    return LinearLogprobEntropyFunction.apply(hidden, weight, targets, temperature, ignore_index,
                                              chunk_size, use_triton)
