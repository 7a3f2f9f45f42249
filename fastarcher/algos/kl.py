"""KL regularisation toward a reference policy: per-token estimators, the exact KL, and coefficient controllers.

With p = π(·|s_t) the policy being trained, q = π_ref(·|s_t) the frozen reference and a token a ~ p,
write δ = log q(a) − log p(a) (so the ratio r = q(a)/p(a) = exp δ). Per token (Schulman 2020,
"Approximating KL divergence", http://joschu.net/blog/kl-approx.html):

    "kl"          k1 = log p − log q = −δ
    "abs"         |log p − log q|
    "mse"         k2 = ½ (log p − log q)²
    "low_var_kl"  k3 = r − 1 − log r = exp δ − δ − 1 ≥ 0
    "full"        Σ_v p_v (log p_v − log q_v), exact; needs whole distributions: `kl_full`

Value (what the mean over tokens sampled from p estimates): k1 and k3 are unbiased for
KL(p‖q) = KL(π‖π_ref); k2 is biased (an f-divergence that agrees with KL to second order near p = q);
"abs" estimates E|log p − log q|, not a KL.

Gradient, when the estimator is a differentiable loss term on tokens sampled on-policy (a ~ p_θ, the
samples held fixed, gradient through log p_θ(a) only):
    ∇k1 = ∇log p            E_p[·] = 0: k1 in the loss has zero expected gradient (it pulls on nothing);
    ∇k2 = (log p − log q) ∇log p     E_p[·] = ∇_θ KL(p_θ‖q): the gradient of the reverse KL, unbiased;
    ∇k3 = (1 − q/p) ∇log p   E_p[·] = −E_q[∇log p] = ∇_θ KL(q‖p_θ): the gradient of the *forward* KL
                             KL(π_ref‖π), not of KL(π‖π_ref), though k3's value is unbiased for the latter.
k3 is the KL loss of GRPO (Shao et al. 2024) and verl's default `kl_loss_type: low_var_kl`; verl also
takes "mse" (k2), the one whose loss gradient is that of KL(π‖π_ref), and "k3+" (k3's value with k2's
gradient, straight-through) for that reason (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient
estimation for RL", https://arxiv.org/abs/2506.09477; the three expectations above are checked exactly in
tests/test_algos_kl.py). All of this holds per token with the states s_t held fixed: summed over a
sequence, these losses give only part of the sequence-level KL gradient, the part through each token's
own log-prob, not through the later tokens it conditions (Tang & Munos, the second pitfall). Samples from
π_old ≠ π_θ (later PPO epochs) need an importance weight π_θ/π_old on the KL term for any of it to hold
(Zhang et al. 2025, https://arxiv.org/abs/2505.17508). To penalise the KL's value instead, subtract
β·k1 (detached) from the reward (Ziegler et al. 2019), where the policy gradient carries it.

Pure functions: tensors in, tensors out; no `.item()`, no collectives. The controllers hold host floats.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

KL_KINDS: tuple[str, ...] = ("kl", "abs", "mse", "low_var_kl", "full")
"""Names accepted as `kind`; "full" is computed by `kl_full`, the others by `kl_penalty`."""

# verl's guards for k3 (core_algos.kl_penalty_forward, "low_var_kl"): δ is clamped to ±20 before exp so
# the ratio cannot overflow, and the result is clamped to [−10, 10] (k3 ≥ 0, so in effect ≤ 10).
_K3_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate from the sampled tokens' log-probs; elementwise, (B, T) in, (B, T) out.

    logprob: log π(a_t|s_t), (B, T) (any shape works), differentiable. ref_logprob: log π_ref(a_t|s_t),
    same shape (normally computed under no_grad). kind, with δ = ref_logprob − logprob:
      "kl"          k1 = −δ
      "abs"         |δ|              (gradient sign(−δ); 0 at δ = 0)
      "mse"         k2 = ½ δ²
      "low_var_kl"  k3 = exp δ − δ − 1, as verl computes it: δ clamped to [−20, 20] and the result to
                    [−10, 10]; beyond the clamps the gradient is 0 (k3 > 10 once δ > 2.61 or δ < −11.0).
                    Written expm1(δ) − δ, which is exactly ≥ 0 in floating point where 1 + δ − 1 is not.
    See the module docstring for which estimators are unbiased for KL's value and which have the KL's
    gradient when used in the loss (k2 for KL(π‖π_ref); k3's is that of KL(π_ref‖π); k1's is 0).

    Raises ValueError for kind "full" (use `kl_full`, which needs whole distributions), for an unknown
    kind, and for mismatched shapes. Masking/averaging is the caller's (`masked_mean`).
    """
    if kind == "full":
        raise ValueError('kind "full" is the exact KL over the vocabulary and needs whole log-prob rows, not '
                         "the sampled tokens' log-probs: call kl_full(logprobs_full, ref_logprobs_full) with "
                         "(B, T, V) tensors")
    if kind not in KL_KINDS:
        raise ValueError(f"kind ({kind!r}) must be one of {KL_KINDS}")
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob shape {tuple(logprob.shape)} must equal ref_logprob shape "
                         f"{tuple(ref_logprob.shape)}")
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    # low_var_kl
    delta = (ref_logprob - logprob).clamp(-_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return (torch.expm1(delta) - delta).clamp(-_K3_CLAMP, _K3_CLAMP)


def kl_full(logprobs_full: Tensor, ref_logprobs_full: Tensor) -> Tensor:
    """Exact KL(π‖π_ref) per position over the vocabulary: Σ_v p_v (log p_v − log q_v); (B, T, V) → (B, T).

    logprobs_full: log π(v|s_t), normalised log-prob rows (log_softmax output), differentiable.
    ref_logprobs_full: log π_ref(v|s_t), same shape. The last dim is the vocabulary; leading dims are kept.
    Entries with p_v = 0 (log p = −inf, a vocabulary mask, or exp underflow) contribute 0 (0·log 0 = 0)
    and get zero gradient; a token the reference masks (log q = −inf) but π does not makes the row +inf,
    its true value. The gradient w.r.t. log p_v is p_v (log p_v − log q_v + 1); through log_softmax that
    is the exact ∇_θ KL(π‖π_ref) at s_t, no sampling involved. Materialises (B, T, V) temporaries: chunk
    over T for large vocabularies.
    """
    if logprobs_full.shape != ref_logprobs_full.shape:
        raise ValueError(f"logprobs_full shape {tuple(logprobs_full.shape)} must equal ref_logprobs_full shape "
                         f"{tuple(ref_logprobs_full.shape)}")
    if logprobs_full.dim() < 1:
        raise ValueError("kl_full needs at least a vocabulary dim (..., V)")
    prob = logprobs_full.exp()
    support = prob > 0
    # where, not multiply: −inf − (−inf) = nan off the support must not reach the sum or the gradient
    log_ratio = torch.where(support, logprobs_full - ref_logprobs_full, 0.0)
    return (prob * log_ratio).sum(dim=-1)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x·m / max(Σ m, 1) over `dim` (all dims when None); mask: bool or 0/1, broadcastable to x.

    Entries outside the mask are dropped with `where`, so a nan/inf there (padding) reaches neither the
    mean nor the gradient; an empty mask gives 0, not nan.
    """
    keep = (mask if mask.dtype == torch.bool else mask != 0).expand_as(x)
    total = torch.where(keep, x, 0.0).sum(dim=dim)
    count = keep.sum(dim=dim).to(total.dtype).clamp(min=1.0)
    return total / count


def _number(name: str, value: Any) -> float:
    """A finite real as a Python float; bools, strings and tensors are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} ({value}) must be finite")
    return value


def _real(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite, non-negative (or positive) Python float."""
    value = _number(name, value)
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} ({value}) must be {'positive' if positive else 'non-negative'}")
    return value


def _check_keys(owner: str, state: Any, keys: set[str]) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{owner} state must be a dict, got {type(state).__name__}")
    if set(state) != keys:
        raise ValueError(f"{owner} state keys {sorted(state)} must be exactly {sorted(keys)}")


class FixedKLController:
    """A constant KL coefficient β = coef; `update` does nothing.

    Checkpoint part (scope "run"): nothing evolves, so the state is {} and the coefficient stays the
    configured one on resume (a state saved by `AdaptiveKLController` is refused, not silently dropped).
    """

    checkpoint_scope = "run"  # a run-wide checkpoint part: the same on every rank

    def __init__(self, coef: float) -> None:
        self.value = _real("coef", coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; the signature matches `AdaptiveKLController.update`."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        _check_keys("FixedKLController", state, set())


class AdaptiveKLController:
    """Proportional controller of the KL coefficient β toward a target KL (Ziegler et al. 2019, §2.2,
    https://arxiv.org/abs/1909.08593; as in openai/lm-human-preferences and verl):

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n_steps / horizon)

    KL is the measured mean KL of the batch, n_steps the samples (or steps) it covers; β moves by at most
    ±20 % per `horizon` steps. n_steps is limited to 5·horizon so the multiplier stays ≥ 0.
    Checkpoint part (scope "run"): the state is {"value": β}; target and horizon are configuration.
    """

    checkpoint_scope = "run"  # a run-wide checkpoint part: the same on every rank

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        self.value = _real("init_coef", init_coef)
        self.target = _real("target", target, positive=True)
        self.horizon = _real("horizon", horizon, positive=True)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β ← β · (1 + clip(current_kl / target − 1, ±0.2) · n_steps / horizon); host floats, no tensors."""
        current_kl = _number("current_kl", current_kl)  # may be < 0: a k1 batch mean can be
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 0:
            raise ValueError(f"n_steps ({n_steps!r}) must be a non-negative int")
        if n_steps > 5 * self.horizon:
            raise ValueError(f"n_steps ({n_steps}) must be at most 5·horizon ({5 * self.horizon:g}): beyond it "
                             "1 + e·n_steps/horizon can be negative")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_keys("AdaptiveKLController", state, {"value"})
        self.value = _real("state['value']", state["value"])
