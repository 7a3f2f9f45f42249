"""Configuration of the influence (gradient-projection) trace and the entropy trace.

One tyro group, `TraceConfig`, nested in the trainer config as `trace`, gives the flags
`--trace.influence.*` and `--trace.entropy.*`. Both traces are off by default. Every field carries a
one-line docstring (its `--help` text); `__post_init__` raises `ValueError` naming the dotted
field, the value and the rule. docs/traces.md has the knobs table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

OutputFunction = Literal["training_loss", "log_prob_advantage", "log_prob_reward"]
HessianMode = Literal["identity", "inverse"]
HessianSource = Literal["response", "token"]
AcceptSignal = Literal["advantage", "reward"]
Scope = Literal["per_prompt", "all_selected"]
ContrastiveAgg = Literal["sum", "mean"]

_PREFIX = "trace.influence"
_ENTROPY_PREFIX = "trace.entropy"


def _check_choice(prefix: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{prefix}.{name} ({value!r}) must be one of {choices}")


def _check_min(prefix: str, name: str, value: int | float, minimum: int | float) -> None:
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{prefix}.{name} ({value!r}) must be >= {minimum}")


@dataclass(kw_only=True)
class InfluenceTraceConfig:
    """Projected per-token gradient factors from the policy backward, and token influence scores."""

    enabled: bool = False
    """Record the influence trace (hooks on the selected nn.Linear modules of the policy)."""
    every_n_steps: int = 1
    """Trace actor steps whose index is a multiple of this (1 = every step)."""
    output_function: OutputFunction = "training_loss"
    """Traced scalar: the loss of the real backward, or an extra backward of sum(A*log pi) or sum(r*log pi)."""
    module_name_filter: tuple[str, ...] = ("mlp.down_proj",)
    """Trace nn.Linear modules whose qualified name contains any of these substrings (empty = every nn.Linear)."""
    max_modules: int = 4
    """Keep at most this many matching modules, the deepest (last in module order) first (0 = all)."""
    max_tokens_per_response: int = 128
    """Per-token factors for the first this-many response tokens; later ones join the context block (0 = all)."""
    max_prompts_per_step: int = 8
    """Trace the responses of at most this many distinct prompts (group ids) per rank and step (0 = all)."""
    projection_dim_factor: int = 16
    """Projected sizes start at k_in = ceil(d_in / factor) and k_out = ceil(d_out / factor) per module."""
    max_proj_vector_sum: int = 1024
    """Cap on the sum over modules of k_in + k_out (numbers stored per token); sizes shrink proportionally above it."""
    max_hessian_dim: int = 4096
    """Cap on D = sum over modules of k_in * k_out (projected gradient and Hessian dimension); sizes shrink above it."""
    hessian_mode: HessianMode = "identity"
    """Score metric: identity (gradient dot products) or inverse (damped projected Gauss-Newton/Fisher inverse)."""
    hessian_source: HessianSource = "response"
    """Samples whose outer products form H in inverse mode: per-response or per-token projected gradients."""
    damping: float | None = None
    """Damping lambda added to H in inverse mode (None = 0.1 * trace(H) / D)."""
    accept_signal: AcceptSignal = "advantage"
    """Accepted/rejected rule: advantage (A > 0 / A < 0) or reward (above / below its group's mean reward)."""
    accepted_rejected_scope: Scope = "all_selected"
    """Contrast accepted vs rejected within each prompt group (per_prompt) or over all traced responses of the step."""
    contrastive_agg: ContrastiveAgg = "mean"
    """Combine the response gradients of each side by their sum or their mean."""
    grad_offload_to_cpu: bool = False
    """Move captured factors to CPU memory right after each hook (frees accelerator memory; adds copies)."""
    force_gpu_compute: bool = False
    """Score on the CUDA device even when factors were offloaded to CPU (needs CUDA)."""
    profile_timing: bool = False
    """Time each trace phase (hooks, gather, scoring, writing), synchronising CUDA, and log the seconds."""
    save_factors: bool = False
    """Also store the raw projected factors (u, v per module, context blocks) in each step file."""
    seed: int = 0
    """Seed of the Rademacher projection matrices (same on every rank; one stream per module name)."""

    def __post_init__(self) -> None:
        p = _PREFIX
        _check_min(p, "every_n_steps", self.every_n_steps, 1)
        _check_choice(p, "output_function", self.output_function,
                      ("training_loss", "log_prob_advantage", "log_prob_reward"))
        if isinstance(self.module_name_filter, str):
            raise ValueError(f"{p}.module_name_filter ({self.module_name_filter!r}) must be a tuple of substrings, "
                             "not a single string")
        self.module_name_filter = tuple(self.module_name_filter)
        _check_min(p, "max_modules", self.max_modules, 0)
        _check_min(p, "max_tokens_per_response", self.max_tokens_per_response, 0)
        _check_min(p, "max_prompts_per_step", self.max_prompts_per_step, 0)
        _check_min(p, "projection_dim_factor", self.projection_dim_factor, 1)
        _check_min(p, "max_proj_vector_sum", self.max_proj_vector_sum, 2)
        _check_min(p, "max_hessian_dim", self.max_hessian_dim, 1)
        _check_choice(p, "hessian_mode", self.hessian_mode, ("identity", "inverse"))
        _check_choice(p, "hessian_source", self.hessian_source, ("response", "token"))
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"{p}.damping ({self.damping!r}) must be a finite number > 0, or None for automatic "
                             "damping")
        _check_choice(p, "accept_signal", self.accept_signal, ("advantage", "reward"))
        _check_choice(p, "accepted_rejected_scope", self.accepted_rejected_scope, ("per_prompt", "all_selected"))
        _check_choice(p, "contrastive_agg", self.contrastive_agg, ("sum", "mean"))


@dataclass(kw_only=True)
class EntropyTraceConfig:
    """Per-token entropy of the traced responses, with per-step quantiles and high-entropy share."""

    enabled: bool = False
    """Record the entropy trace."""
    every_n_steps: int = 1
    """Trace actor steps whose index is a multiple of this (1 = every step)."""
    max_responses_per_step: int = 16
    """Store per-token entropies of at most this many responses per rank and step (0 = all); stats use all."""
    max_tokens_per_response: int = 0
    """Store at most this many leading tokens of each stored response (0 = all)."""
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
    """Quantile levels of the response-token entropy reported per step (each in [0, 1])."""
    high_entropy_threshold: float = 1.0
    """A token is high-entropy when its entropy exceeds this many nats; its share is logged per step."""

    def __post_init__(self) -> None:
        p = _ENTROPY_PREFIX
        _check_min(p, "every_n_steps", self.every_n_steps, 1)
        _check_min(p, "max_responses_per_step", self.max_responses_per_step, 0)
        _check_min(p, "max_tokens_per_response", self.max_tokens_per_response, 0)
        self.quantiles = tuple(float(q) for q in self.quantiles)
        if not self.quantiles:
            raise ValueError(f"{p}.quantiles (()) must hold at least one level")
        for q in self.quantiles:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"{p}.quantiles ({self.quantiles!r}) must lie in [0, 1]; got {q!r}")
        if not (math.isfinite(self.high_entropy_threshold) and self.high_entropy_threshold >= 0):
            raise ValueError(f"{p}.high_entropy_threshold ({self.high_entropy_threshold!r}) must be a finite "
                             "number >= 0")


@dataclass(kw_only=True)
class TraceConfig:
    """Research traces of the actor step: gradient-projection influence and token entropy."""

    influence: InfluenceTraceConfig = field(default_factory=InfluenceTraceConfig)
    """Influence (gradient-projection) trace."""
    entropy: EntropyTraceConfig = field(default_factory=EntropyTraceConfig)
    """Entropy trace."""
