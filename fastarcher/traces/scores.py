"""Influence scores from projected gradient factors: pure tensor functions, no model, no I/O.

Notation (docs/traces.md, "Scores"). Module m contributes the block vec(u v^T) (k_out * k_in,
row-major) of a D-dim projected gradient, D = sum_m k_out^m k_in^m.
- token factor   f_n = concat_m vec(u_n^m v_n^mT)                        (one traced token n)
- response grad  g_r = sum_{n in r} f_n + c_r                            (c_r: context share, see capture.py)
- accepted flag  a_r in {+1, -1, 0}: advantage rule sign(A_r); reward rule sign(r_r - mean of its group)
- coefficient    w_r = sign(objective weight_r) * (+1/|acc_k| if a_r = +1, -1/|rej_k| if a_r = -1, else 0)
                 (contrastive_agg=sum uses +-1 instead of +-1/|side|; an empty side contributes 0)
- direction      d_k = sum_{r in unit k} w_r g_r           (unit k: a prompt group, or all responses)
- metric         H = I (identity) or H = S^T S / N + lambda I over N sample gradients S (inverse)
- token score    s_n = <f_n, H^-1 d_k(n)>,  response score s_r = <g_r, H^-1 d_k(r)>

Multiplying by sign(weight) turns each weighted gradient (e.g. A_r grad log pi(y_r)) into |weight_r|
grad log pi(y_r), so d_k is the gradient of an accepted-minus-rejected log-likelihood margin whatever
the sign of the traced objective; s_n > 0 then means that token n's share of the update raises that
margin to first order (for the training loss, where the update is -grad, the two minus signs cancel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "Factors",
    "ExplicitSamples",
    "FactoredSamples",
    "ScoreResult",
    "token_vectors",
    "response_gradients",
    "accept_flags",
    "unit_ids_for",
    "contrast_coefficients",
    "contrast_directions",
    "auto_damping",
    "solve_damped",
    "token_scores",
    "context_scores",
    "identity_token_scores_gram",
    "score_step",
]


@dataclass
class Factors:
    """Projected factors of one step's traced tokens, tokens stored response after response."""

    u: list[torch.Tensor]
    """Per module (N, k_out): projected output gradients P_out dy at the traced tokens."""
    v: list[torch.Tensor]
    """Per module (N, k_in): projected inputs P_in x at the traced tokens."""
    context: list[torch.Tensor]
    """Per module (R, k_out, k_in): summed factors of each response's untraced positions."""
    response_offsets: torch.Tensor
    """(R + 1,) long: tokens of response r are rows offsets[r]:offsets[r + 1] of u and v."""

    @property
    def n_tokens(self) -> int:
        return int(self.response_offsets[-1])

    @property
    def n_responses(self) -> int:
        return int(self.response_offsets.numel()) - 1

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [(c.shape[1], c.shape[2]) for c in self.context]

    @property
    def dim(self) -> int:
        return sum(a * b for a, b in self.blocks)

    @property
    def token_response(self) -> torch.Tensor:
        """(N,) response index of each token."""
        counts = self.response_offsets.diff()
        return torch.repeat_interleave(torch.arange(self.n_responses, device=counts.device), counts)

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """(..., D) -> per module (..., k_out, k_in) views."""
        out, start = [], 0
        for k_out, k_in in self.blocks:
            out.append(vector[..., start:start + k_out * k_in].unflatten(-1, (k_out, k_in)))
            start += k_out * k_in
        return out


def token_vectors(u: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
    """(N, D) explicit token factors concat_m vec(u_n v_n^T). Materialises N x D: use on chunks."""
    return torch.cat([(a[:, :, None] * b[:, None, :]).flatten(1) for a, b in zip(u, v)], dim=1)


def response_gradients(f: Factors) -> torch.Tensor:
    """(R, D) g_r = sum of the response's token factors + its context block, via one padded bmm per module."""
    response = f.token_response  # (N,)
    counts = f.response_offsets.diff()
    length = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(f.n_tokens, device=response.device) - f.response_offsets[response]  # (N,)
    blocks = []
    for u, v, ctx in zip(f.u, f.v, f.context):
        padded_u = u.new_zeros(f.n_responses, length, u.shape[1])  # (R, L, k_out)
        padded_v = v.new_zeros(f.n_responses, length, v.shape[1])  # (R, L, k_in)
        padded_u[response, slot] = u
        padded_v[response, slot] = v
        blocks.append((padded_u.transpose(1, 2) @ padded_v + ctx).flatten(1))  # (R, k_out * k_in)
    return torch.cat(blocks, dim=1)


def accept_flags(signal: torch.Tensor, group_ids: torch.Tensor, rule: Literal["advantage", "reward"]) -> torch.Tensor:
    """(R,) int8: +1 accepted, -1 rejected, 0 neither.

    advantage: sign(A_r) (the advantage already has its baseline subtracted, so the threshold is 0).
    reward: sign(r_r - mean reward of r's group); equal within 1e-9 relative counts as neither.
    NaN signals count as neither.
    """
    signal = signal.to(torch.float64)
    if rule == "advantage":
        threshold = torch.zeros_like(signal)
    elif rule == "reward":
        _, inverse = torch.unique(group_ids, return_inverse=True)
        sums = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=torch.float64, device=signal.device)
        sums.index_add_(0, inverse, signal)
        counts = torch.bincount(inverse, minlength=sums.numel()).to(torch.float64)
        threshold = (sums / counts)[inverse]
    else:
        raise ValueError(f"trace.influence.accept_signal ({rule!r}) must be 'advantage' or 'reward'")
    flags = torch.sign(signal - threshold)
    tie = torch.isclose(signal, threshold, rtol=1e-9, atol=1e-12) | torch.isnan(signal)
    return torch.where(tie, torch.zeros_like(flags), flags).to(torch.int8)


def unit_ids_for(group_ids: torch.Tensor, scope: Literal["per_prompt", "all_selected"]) -> tuple[torch.Tensor, int]:
    """(R,) unit index of each response and the number of units: one per prompt group, or one in all."""
    if scope == "all_selected":
        return torch.zeros_like(group_ids, dtype=torch.long), 1
    if scope == "per_prompt":
        unique, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.long(), int(unique.numel())
    raise ValueError(f"trace.influence.accepted_rejected_scope ({scope!r}) must be 'per_prompt' or 'all_selected'")


def contrast_coefficients(flags: torch.Tensor, weight_sign: torch.Tensor, unit_ids: torch.Tensor, n_units: int,
                          agg: Literal["sum", "mean"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R,) coefficients w_r of the module docstring, and (K,) accepted and rejected counts per unit."""
    accepted = (flags > 0).long()
    rejected = (flags < 0).long()
    n_acc = torch.zeros(n_units, dtype=torch.long, device=flags.device).index_add_(0, unit_ids, accepted)
    n_rej = torch.zeros(n_units, dtype=torch.long, device=flags.device).index_add_(0, unit_ids, rejected)
    side = accepted.to(torch.float64) - rejected.to(torch.float64)  # (R,) +1 / -1 / 0
    if agg == "mean":
        size = torch.where(flags > 0, n_acc[unit_ids], n_rej[unit_ids]).clamp_min(1).to(torch.float64)
        side = side / size
    elif agg != "sum":
        raise ValueError(f"trace.influence.contrastive_agg ({agg!r}) must be 'sum' or 'mean'")
    return side * torch.sign(weight_sign.to(torch.float64)), n_acc, n_rej


def contrast_directions(gradients: torch.Tensor, coefficients: torch.Tensor, unit_ids: torch.Tensor,
                        n_units: int) -> torch.Tensor:
    """(K, D) d_k = sum_{r in unit k} w_r g_r."""
    weighted = gradients * coefficients.to(gradients.dtype)[:, None]  # (R, D)
    return gradients.new_zeros(n_units, gradients.shape[1]).index_add_(0, unit_ids, weighted)


class ExplicitSamples:
    """Sample gradients held as an (N, D) matrix (per-response gradients)."""

    def __init__(self, samples: torch.Tensor):
        self.samples = samples  # (N, D)
        self.n, self.dim = samples.shape

    def squared_norm_sum(self) -> torch.Tensor:
        return self.samples.square().sum()

    def gram(self) -> torch.Tensor:  # (N, N)
        return self.samples @ self.samples.T

    def outer(self) -> torch.Tensor:  # (D, D) S^T S
        return self.samples.T @ self.samples

    def apply(self, q: torch.Tensor) -> torch.Tensor:  # (K, D) -> (N, K) = S q^T
        return self.samples @ q.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # (N, K) -> (K, D) = y^T S
        return y.T @ self.samples


class FactoredSamples:
    """Sample gradients held as token factors f_n = concat_m vec(u_n v_n^T), never formed all at once.

    Uses <u_i v_i^T, u_j v_j^T> = (u_i . u_j)(v_i . v_j) for the Gram matrix, u^T Q v for products
    with a D-vector Q, and sum_n y_n u_n v_n^T for the adjoint.
    """

    def __init__(self, f: Factors, chunk: int = 1024):
        self.f = f
        self.n, self.dim = f.n_tokens, f.dim
        self.chunk = chunk

    def squared_norm_sum(self) -> torch.Tensor:
        return sum((u.square().sum(1) * v.square().sum(1)).sum() for u, v in zip(self.f.u, self.f.v))

    def gram(self) -> torch.Tensor:
        return sum((u @ u.T) * (v @ v.T) for u, v in zip(self.f.u, self.f.v))

    def outer(self) -> torch.Tensor:
        out = None
        for start in range(0, self.n, self.chunk):
            block = token_vectors([u[start:start + self.chunk] for u in self.f.u],
                                  [v[start:start + self.chunk] for v in self.f.v])
            part = block.T @ block
            out = part if out is None else out + part
        return out

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        result = q.new_zeros(self.n, q.shape[0])
        for (u, v), q_m in zip(zip(self.f.u, self.f.v), self.f.split(q)):  # q_m (K, k_out, k_in)
            for k in range(q.shape[0]):
                result[:, k] += ((u @ q_m[k]) * v).sum(1)
        return result

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        blocks = []
        for u, v in zip(self.f.u, self.f.v):
            blocks.append(torch.stack([((u * y[:, k:k + 1]).T @ v).flatten() for k in range(y.shape[1])]))
        return torch.cat(blocks, dim=1)  # (K, D)


def auto_damping(squared_norm_sum: torch.Tensor, n: int, dim: int) -> float:
    """0.1 * trace(S^T S / N) / D; 1.0 when every sample gradient is zero."""
    trace = float(squared_norm_sum) / max(n, 1)
    return 0.1 * trace / dim if trace > 0 else 1.0


def solve_damped(samples: ExplicitSamples | FactoredSamples, rhs: torch.Tensor, damping: float | None,
                 method: Literal["auto", "direct", "woodbury"] = "auto") -> tuple[torch.Tensor, float, str]:
    """(K, D) H^-1 rhs with H = S^T S / N + lambda I, the lambda used, and the method.

    direct: Cholesky of the D x D matrix H. woodbury (auto when N < D):
    H^-1 d = (d - S^T (N lambda I + S S^T)^-1 S d) / lambda, a Cholesky of an N x N matrix instead.
    """
    lam = auto_damping(samples.squared_norm_sum(), samples.n, samples.dim) if damping is None else float(damping)
    if method == "auto":
        method = "woodbury" if samples.n < samples.dim else "direct"
    if method == "woodbury":
        inner = samples.gram()
        inner = inner + samples.n * lam * torch.eye(samples.n, dtype=inner.dtype, device=inner.device)
        chol = torch.linalg.cholesky(inner)
        y = torch.cholesky_solve(samples.apply(rhs), chol)  # (N, K)
        return (rhs - samples.adjoint(y)) / lam, lam, method
    if method == "direct":
        hessian = samples.outer() / samples.n
        hessian = hessian + lam * torch.eye(samples.dim, dtype=hessian.dtype, device=hessian.device)
        chol = torch.linalg.cholesky(hessian)
        return torch.cholesky_solve(rhs.T, chol).T, lam, method
    raise ValueError(f"unknown solve method {method!r}")


def token_scores(f: Factors, q: torch.Tensor, token_unit: torch.Tensor) -> torch.Tensor:
    """(N,) s_n = <f_n, q[unit_n]> = sum_m u_n^T Q_m[unit_n] v_n, looping over units (no (N, D) tensor)."""
    scores = q.new_zeros(f.n_tokens)
    for k in torch.unique(token_unit).tolist():
        idx = torch.nonzero(token_unit == k, as_tuple=False).flatten()
        for u, v, q_m in zip(f.u, f.v, f.split(q[k])):
            scores[idx] += ((u[idx] @ q_m) * v[idx]).sum(1)
    return scores


def context_scores(f: Factors, q: torch.Tensor, response_unit: torch.Tensor) -> torch.Tensor:
    """(R,) <c_r, q[unit_r]>: the score of each response's untraced positions."""
    scores = q.new_zeros(f.n_responses)
    for ctx, q_m in zip(f.context, f.split(q)):  # ctx (R, k_out, k_in), q_m (K, k_out, k_in)
        scores += (ctx * q_m[response_unit]).sum((1, 2))
    return scores


def identity_token_scores_gram(f: Factors, coefficients: torch.Tensor, response_unit: torch.Tensor) -> torch.Tensor:
    """(N,) identity-mode token scores through Gram products, without forming token D-vectors:
    s_n = sum_{r in unit} w_r [sum_{j in r} sum_m (u_n.u_j)(v_n.v_j) + sum_m u_n^T c_r^m v_n]."""
    token_response = f.token_response
    token_unit = response_unit[token_response]
    scores = f.u[0].new_zeros(f.n_tokens)
    for k in torch.unique(response_unit).tolist():
        idx = torch.nonzero(token_unit == k, as_tuple=False).flatten()
        w_tok = coefficients.to(scores.dtype)[token_response[idx]]  # (N_k,)
        in_unit = response_unit == k
        w_resp = coefficients.to(scores.dtype) * in_unit.to(scores.dtype)  # (R,)
        for u, v, ctx in zip(f.u, f.v, f.context):
            u_k, v_k = u[idx], v[idx]
            scores[idx] += ((u_k @ u_k.T) * (v_k @ v_k.T)) @ w_tok
            ctx_dir = (ctx * w_resp[:, None, None]).sum(0)  # (k_out, k_in)
            scores[idx] += ((u_k @ ctx_dir) * v_k).sum(1)
    return scores


@dataclass
class ScoreResult:
    """Scores and bookkeeping of one step (shapes: N tokens, R responses, K units)."""

    token_scores: torch.Tensor  # (N,)
    response_scores: torch.Tensor  # (R,)
    context_scores: torch.Tensor  # (R,)
    token_grad_norm: torch.Tensor  # (N,)
    response_grad_norm: torch.Tensor  # (R,)
    accepted: torch.Tensor  # (R,) int8
    unit_ids: torch.Tensor  # (R,)
    coefficients: torch.Tensor  # (R,)
    unit_n_accepted: torch.Tensor  # (K,)
    unit_n_rejected: torch.Tensor  # (K,)
    damping: float | None
    method: str


def score_step(
    f: Factors,
    *,
    signal: torch.Tensor,
    weights: torch.Tensor,
    group_ids: torch.Tensor,
    hessian_mode: Literal["identity", "inverse"],
    hessian_source: Literal["response", "token"] = "response",
    damping: float | None = None,
    accept_signal: Literal["advantage", "reward"] = "advantage",
    scope: Literal["per_prompt", "all_selected"] = "all_selected",
    agg: Literal["sum", "mean"] = "mean",
    identity_method: Literal["auto", "direct", "gram"] = "auto",
    solve_method: Literal["auto", "direct", "woodbury"] = "auto",
) -> ScoreResult:
    """Scores of every traced token and response (module docstring). signal, weights, group_ids: (R,)."""
    device = f.response_offsets.device
    signal, weights, group_ids = signal.to(device), weights.to(device), group_ids.to(device)
    flags = accept_flags(signal, group_ids, accept_signal)
    unit_ids, n_units = unit_ids_for(group_ids, scope)
    coefficients, n_acc, n_rej = contrast_coefficients(flags, weights, unit_ids, n_units, agg)
    gradients = response_gradients(f)  # (R, D)
    directions = contrast_directions(gradients, coefficients, unit_ids, n_units)  # (K, D)
    token_unit = unit_ids[f.token_response]
    lam = None
    if hessian_mode == "identity":
        q = directions
        if identity_method == "auto":
            # Gram products cost ~N_k^2 (k_in + k_out) per unit, the direct path ~N D.
            gram_cost = sum(int((token_unit == k).sum()) ** 2 for k in range(n_units)) * sum(a + b for a, b in f.blocks)
            identity_method = "gram" if gram_cost < f.n_tokens * f.dim else "direct"
        if identity_method == "gram":
            tok = identity_token_scores_gram(f, coefficients, unit_ids)
        else:
            tok = token_scores(f, q, token_unit)
        method = f"identity-{identity_method}"
    elif hessian_mode == "inverse":
        samples = ExplicitSamples(gradients) if hessian_source == "response" else FactoredSamples(f)
        q, lam, solve = solve_damped(samples, directions, damping, solve_method)
        tok = token_scores(f, q, token_unit)
        method = f"inverse-{hessian_source}-{solve}"
    else:
        raise ValueError(f"trace.influence.hessian_mode ({hessian_mode!r}) must be 'identity' or 'inverse'")
    ctx = context_scores(f, q, unit_ids)
    resp = tok.new_zeros(f.n_responses).index_add_(0, f.token_response, tok) + ctx
    tok_norm = torch.sqrt(sum(u.square().sum(1) * v.square().sum(1) for u, v in zip(f.u, f.v)))  # ||f_n||
    return ScoreResult(
        token_scores=tok,
        response_scores=resp,
        context_scores=ctx,
        token_grad_norm=tok_norm,
        response_grad_norm=gradients.norm(dim=1),
        accepted=flags,
        unit_ids=unit_ids,
        coefficients=coefficients,
        unit_n_accepted=n_acc,
        unit_n_rejected=n_rej,
        damping=lam,
        method=method,
    )
