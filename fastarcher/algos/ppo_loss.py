"""PPO clipped policy loss, clipped value loss, and masked loss aggregation.

All token tensors are (B, T); `mask` is bool or 0/1, 1 on the tokens that are scored (action tokens).

Policy (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347, eq. 7), per
token with r = exp(log π_θ − log π_old) and A the (constant) advantage:
    l = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))
the negated pessimistic (min) surrogate. ε_high ≠ ε_low is DAPO's "clip-higher" (Yu et al. 2025,
arXiv 2503.14476). Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
arXiv 1912.09729, eq. 5), c > 1: for A < 0 the loss is further capped, l ← min(l, −A·c), so a token whose
ratio has run far above 1 cannot produce an unbounded loss (nor a gradient: the cap is a constant).

Value (PPO2 value clipping, openai/baselines ppo2): ½(V − R)², or with ε
    V_clip = V_old + clip(V − V_old, −ε, ε),   l = ½ · max((V − R)², (V_clip − R)²).

Aggregation, `aggregate(loss_mat, mask, mode)` (the modes of verl's `agg_loss`), with m the mask:
    "token-mean"               Σ m·l / max(Σ m, 1)
    "seq-mean-token-sum"       mean over rows with ≥ 1 token of Σ_t m·l
    "seq-mean-token-mean"      mean over rows with ≥ 1 token of (Σ_t m·l / Σ_t m)
    "seq-mean-token-sum-norm"  Σ m·l / (B · norm), norm = T by default: a constant divisor (Dr. GRPO,
                               Liu et al. 2025, arXiv 2503.20783); pass a fixed norm (e.g. the max
                               generation length) so the divisor stays constant across batches. Early verl
                               divided by T only (no 1/B); here B counts every row, empty ones included.
Rows with no scored token are left out of the seq-means; an empty mask gives 0, still in the graph.

Pure functions: tensors in, tensors out; no `.item()`, no collectives. Metrics are detached scalar
tensors, always token means over the mask (whatever `agg`). Entries outside the mask are dropped with
`where` (never multiplied by 0), so nan/inf padding reaches neither the loss nor the gradient.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastarcher.algos.kl import masked_mean

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""Names accepted as `mode` / `agg`."""

# log r is clamped to ±20 before exp (as verl does) so r ≤ e^20 ≈ 4.9e8 cannot overflow, even in fp16/bf16
# reductions; beyond the clamp the token's gradient is 0 (it is far outside any clip range anyway).
_LOG_RATIO_CLAMP = 20.0


def _keep(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _check_shapes(**tensors: Tensor) -> None:
    (first, ref), *rest = tensors.items()
    if ref.dim() != 2:
        raise ValueError(f"{first} must be (B, T), got shape {tuple(ref.shape)}")
    for name, x in rest:
        if x.shape != ref.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal {first} shape {tuple(ref.shape)}")


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str, norm: float | None = None) -> Tensor:
    """Reduce a per-token loss (B, T) over `mask` (B, T) to a scalar, differentiable; see module docstring.

    norm: the divisor per row for "seq-mean-token-sum-norm" (default T; must be > 0); refused for the
    other modes, where it would be silently ignored.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode ({mode!r}) must be one of {AGG_MODES}")
    _check_shapes(loss_mat=loss_mat, mask=mask)
    if norm is not None:
        if mode != "seq-mean-token-sum-norm":
            raise ValueError(f"norm is only used by mode 'seq-mean-token-sum-norm', not {mode!r}")
        if not _float("norm", norm) > 0:
            raise ValueError(f"norm ({norm}) must be positive")
    keep = _keep(mask)
    row_sum = torch.where(keep, loss_mat, 0.0).sum(dim=-1)  # (B,), 0 for an empty row
    if mode == "token-mean":
        return row_sum.sum() / keep.sum().to(row_sum.dtype).clamp(min=1.0)
    if mode == "seq-mean-token-sum-norm":
        B, T = loss_mat.shape
        return row_sum.sum() / (B * (float(T) if norm is None else float(norm)))
    row_count = keep.sum(dim=-1).to(row_sum.dtype)  # (B,)
    n_rows = (row_count > 0).sum().to(row_sum.dtype).clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / n_rows
    return (row_sum / row_count.clamp(min=1.0)).sum() / n_rows  # seq-mean-token-mean


def ppo_policy_loss(
    logprob: Tensor, old_logprob: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
    agg: str = "token-mean", agg_norm: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (to minimise) and its metrics; all inputs (B, T), the loss a scalar.

    logprob: log π_θ(a_t|s_t), differentiable. old_logprob: log π_old(a_t|s_t) of the sampling policy and
    advantages: A_t — both treated as constants (detached). mask: 1 on scored tokens.
    r = exp(clamp(logprob − old_logprob, ±20)); l = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))
    (clip_high None → clip_low); dual_clip = c > 1: l ← min(l, −A·c) where A < 0. Reduced by
    `aggregate(l, mask, agg, agg_norm)`. At r = 1 the gradient w.r.t. logprob is that of the aggregated
    −A·logprob (REINFORCE), e.g. −A·m / Σm for "token-mean".
    Metrics (detached, token means over the mask):
      "actor/pg_loss"            the loss value
      "actor/clip_fraction"      tokens where the clipped branch is strictly the larger (its gradient 0)
      "actor/approx_kl"          k3 = r − 1 − log r: unbiased for KL(π_old‖π_θ), the tokens being
                                 sampled from π_old (Schulman 2020, http://joschu.net/blog/kl-approx.html); ≥ 0
      "actor/ratio_mean"         mean r
      "actor/dual_clip_fraction" (only with dual_clip) tokens with A < 0 where the cap −A·c is active
    Raises ValueError for shape mismatches, clip_low ∉ (0, 1), clip_high ≤ 0, dual_clip ≤ 1, unknown agg.
    """
    _check_shapes(logprob=logprob, old_logprob=old_logprob, advantages=advantages, mask=mask)
    if agg not in AGG_MODES:
        raise ValueError(f"agg ({agg!r}) must be one of {AGG_MODES}")
    low = _float("clip_low", clip_low)
    if not 0.0 < low < 1.0:
        raise ValueError(f"clip_low ({clip_low}) must be in (0, 1)")
    high = low if clip_high is None else _float("clip_high", clip_high)
    if not high > 0.0:
        raise ValueError(f"clip_high ({clip_high}) must be positive")
    if dual_clip is not None and not _float("dual_clip", dual_clip) > 1.0:
        raise ValueError(f"dual_clip ({dual_clip}) must be > 1")
    keep = _keep(mask)
    adv = torch.where(keep, advantages.detach(), 0.0)
    log_ratio = torch.where(keep, logprob - old_logprob.detach(), 0.0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    loss_mat = torch.maximum(unclipped, clipped)
    metrics: dict[str, Tensor] = {}
    if dual_clip is not None:
        cap = -adv * float(dual_clip)
        capped = (adv < 0) & (cap < loss_mat)
        loss_mat = torch.where(capped, cap, loss_mat)
        metrics["actor/dual_clip_fraction"] = masked_mean(capped.to(ratio.dtype), keep).detach()
    loss = aggregate(loss_mat, keep, agg, agg_norm)
    with torch.no_grad():
        metrics["actor/pg_loss"] = loss.detach()
        metrics["actor/clip_fraction"] = masked_mean((clipped > unclipped).to(ratio.dtype), keep)
        metrics["actor/approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, keep)
        metrics["actor/ratio_mean"] = masked_mean(ratio, keep)
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
    clip: float | None = None, agg: str = "token-mean", agg_norm: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss ½(V − R)² (PPO2-clipped when `clip` = ε > 0) reduced by `aggregate`; inputs (B, T).

    values: V, differentiable. old_values: V_old from the rollout, returns: R — constants (detached).
    With ε: V_clip = V_old + clamp(V − V_old, −ε, ε), l = ½ · max((V − R)², (V_clip − R)²).
    Metrics (detached): "critic/value_loss"; "critic/value_clip_fraction" (only with clip: tokens where
    the clipped term is strictly the larger); "critic/explained_variance" = 1 − Var(R − V) / Var(R) over
    the masked tokens (population variances), 0 when Var(R) = 0 or the mask is empty (no signal to explain).
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    if agg not in AGG_MODES:
        raise ValueError(f"agg ({agg!r}) must be one of {AGG_MODES}")
    if clip is not None and not _float("clip", clip) > 0.0:
        raise ValueError(f"clip ({clip}) must be positive")
    keep = _keep(mask)
    v = torch.where(keep, values, 0.0)
    ret = torch.where(keep, returns.detach(), 0.0)
    err = (v - ret).square()
    metrics: dict[str, Tensor] = {}
    if clip is None:
        loss_mat = 0.5 * err
    else:
        old = torch.where(keep, old_values.detach(), 0.0)
        v_clip = old + (v - old).clamp(-float(clip), float(clip))
        err_clip = (v_clip - ret).square()
        loss_mat = 0.5 * torch.maximum(err, err_clip)
        metrics["critic/value_clip_fraction"] = masked_mean((err_clip > err).to(err.dtype), keep).detach()
    loss = aggregate(loss_mat, keep, agg, agg_norm)
    with torch.no_grad():
        metrics["critic/value_loss"] = loss.detach()
        resid = ret - v
        var_r = masked_mean((ret - masked_mean(ret, keep)).square(), keep)
        var_resid = masked_mean((resid - masked_mean(resid, keep)).square(), keep)
        ev = 1.0 - var_resid / torch.where(var_r > 0, var_r, 1.0)
        metrics["critic/explained_variance"] = torch.where(var_r > 0, ev, 0.0)
    return loss, metrics
