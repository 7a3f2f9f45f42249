"""Per-utterance log-probs of the policy: Σ_h log π(a_h | s, a_<h) with gradients, plus token entropy.

Layout: the state is left-padded and the action right-padded, so every row's action starts at the same
column; the model then computes logits only for the last A+1 positions (`logits_to_keep`), never for
the whole dialogue. With an action constraint the logits of disallowed tokens are set to −inf first,
so log-probs and entropy are those of the constrained distribution the engine sampled from.

Without a constraint (and unless the whole distribution is asked for), the LM head is fused with the
log-prob: for that one forward a `ScoringHead` takes the head's place and turns the last hidden states
into per-token (log-prob, entropy) through `linear_token_logprobs_and_entropy`, so the (B, A, V) logits
never exist. It runs inside the model's own forward, so an FSDP2-sharded head is unsharded as usual.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastarcher.kv_cache import cache_arg, cache_of, plain_layers, repeated_rows, select_rows
from fastarcher.logprobs import linear_token_logprobs_and_entropy, token_logprobs_and_entropy
from fastarcher.rollout.base import ActionConstraint


def left_align(ids: Tensor, lengths: Tensor, pad_id: int) -> Tensor:
    """Right-padded (B, S) → left-padded (B, S) (real tokens at the end of each row)."""
    width = ids.shape[1]
    src = torch.arange(width, device=ids.device)[None, :] - (width - lengths)[:, None]  # (B, S)
    out = ids.gather(1, src.clamp(min=0))
    return out.masked_fill(src < 0, pad_id)


class ScoringHead(nn.Module):
    """Stands in for a bias-free linear LM head during one forward: hidden (B, T, H) → (B, T, 2) holding
    each position's log-prob of `targets` (B, T) and its entropy, computed chunk by chunk."""

    def __init__(self, head: nn.Linear, targets: Tensor, backend: str):
        super().__init__()
        self.head, self.targets, self.backend = head, targets, backend

    def forward(self, hidden: Tensor) -> Tensor:
        logp, entropy = linear_token_logprobs_and_entropy(hidden, self.head.weight, self.targets,
                                                          ignore_index=-100, backend=self.backend)
        return torch.stack([logp, entropy], dim=-1)


def fusable_head(policy: nn.Module) -> nn.Linear | None:
    """The policy's LM head if the fused path can replace it: an `lm_head` that is a bias-free nn.Linear
    with no hooks (a trace capturing the head's inputs needs the real module called)."""
    head = getattr(policy, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


@contextmanager
def _scoring_head(policy: nn.Module, head: nn.Linear, targets: Tensor, backend: str):
    policy.lm_head = ScoringHead(head, targets, backend)
    try:
        yield
    finally:
        policy.lm_head = head


def _checkpoints_activations(policy: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    if hasattr(type(policy), "is_activation_checkpointing"):
        return bool(policy.is_activation_checkpointing)
    return bool(getattr(policy, "is_gradient_checkpointing", False))


def shared_prefix(policy: nn.Module, state: Tensor, state_len: Tensor, state_mask: Tensor, position_ids: Tensor):
    """Keys/values of every row's state but its last token, each distinct state computed once and repeated
    for its rows (differentiable), or None when fewer than half the rows repeat a state, a state has a
    single token, the policy is FSDP2-sharded or checkpoints activations (no cache then), or the model's
    cache is not plain (sliding window, quantised). `state` left-padded (B, S)."""
    if state.shape[1] < 2 or int(state_len.min()) < 2 or _checkpoints_activations(policy):
        return None
    if isinstance(next(policy.parameters()), DTensor):
        return None  # FSDP2 frees the gathered weights after each root forward: two before one backward fail
    shared = repeated_rows(state.masked_fill(~state_mask, -1).tolist(), state.device)
    if shared is None:
        return None
    pick, inverse = shared
    out = policy(input_ids=state[pick, :-1], attention_mask=state_mask[pick, :-1].long(),
                 position_ids=position_ids[pick, : state.shape[1] - 1], logits_to_keep=1, use_cache=True)
    cache = cache_of(out)
    if cache is None or not plain_layers(cache):
        return None
    return select_rows(cache, inverse)


def action_logprobs(
    policy: nn.Module,
    state_ids: Tensor,  # (B, S) right-padded
    state_len: Tensor,  # (B,)
    action_ids: Tensor,  # (B, A) right-padded, includes the stop token
    action_len: Tensor,  # (B,)
    *,
    pad_id: int,
    constraint: ActionConstraint | None = None,
    backend: str = "auto",
    per_token: bool = False,
    sampled_len: Tensor | None = None,  # (B,)
    log_distribution: bool = False,
    fused_head: bool = True,
    share_states: bool = False,
) -> tuple[Tensor, ...]:
    """Returns (logprob_sum (B,), token_entropy (B, A), action_mask (B, A)); entropy is 0 on padding.
    With per_token=True the first value is the per-token log π (B, A) instead of its sum (0 on padding).

    sampled_len: how many leading tokens of each action the policy sampled (default: all of action_len).
    Only those are scored (and in the returned mask): a stop token appended to close an utterance cut at
    max_new_tokens was never drawn from π, so its log-prob is no part of the action's likelihood.
    log_distribution=True adds a fourth value: the whole log π(·|s, a_<h) (B, A, V), constrained like the
    sampling (−inf off the allowed set), for the exact KL. fused_head=False always materialises the logits.
    share_states: when at least half the rows repeat a state (a group's episodes from one prompt), each
    distinct state but its last token runs once and the rows continue from its keys/values (`shared_prefix`);
    the same values and gradients as the whole forward, to rounding."""
    batch, width_a = action_ids.shape
    state = left_align(state_ids, state_len, pad_id)
    ids = torch.cat([state, action_ids], dim=1)  # (B, S + A)
    positions_a = torch.arange(width_a, device=ids.device)
    action_mask = positions_a[None, :] < action_len[:, None]  # (B, A)
    state_mask = torch.arange(state.shape[1], device=ids.device)[None, :] >= (state.shape[1] - state_len)[:, None]
    attention = torch.cat([state_mask, action_mask], dim=1).long()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    scored = action_mask if sampled_len is None else positions_a[None, :] < sampled_len[:, None]  # (B, A)
    targets = action_ids.masked_fill(~scored, -100)
    head = fusable_head(policy) if fused_head and constraint is None and not log_distribution else None
    # position S-1+h predicts action token h; the last kept position predicts nothing
    shifted = None if head is None else torch.cat([targets, targets.new_full((batch, 1), -100)], dim=1)  # (B, A + 1)
    prefix = shared_prefix(policy, state, state_len, state_mask, position_ids) if share_states else None
    with nullcontext() if head is None else _scoring_head(policy, head, shifted, backend):
        if prefix is None:
            out = policy(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                         logits_to_keep=width_a + 1, use_cache=False)
        else:  # the last state token and the action, after the shared keys/values
            tail = state.shape[1] - 1
            out = policy(input_ids=ids[:, tail:], attention_mask=attention, position_ids=position_ids[:, tail:],
                         logits_to_keep=width_a + 1, use_cache=True, **{cache_arg(policy): prefix})
    if head is not None:
        logp, entropy = out.logits[:, :-1].unbind(-1)  # (B, A) each, from the ScoringHead
    else:
        logits = out.logits[:, :-1]  # (B, A, V)
        if constraint is not None:
            allowed = constraint.masks_for(action_ids, action_len)
            logits = logits.masked_fill(~allowed, float("-inf"))
        logp, entropy = token_logprobs_and_entropy(
            logits.reshape(batch * width_a, -1), targets.reshape(-1), ignore_index=-100, backend=backend
        )
    logp = logp.reshape(batch, width_a)
    entropy = entropy.reshape(batch, width_a)
    out = (logp if per_token else logp.sum(-1)), entropy, scored
    return (*out, torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)) if log_distribution else out
