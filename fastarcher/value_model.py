"""Token-level value model: V(s, a_<h) at every action token, an LM trunk of the policy's architecture and a
linear head on its last hidden state (the critic of PPO, verl's separate critic model; ArCHer's token-level
baseline).

Same layout as the policy's log-probs (fastarcher/policy.py): the state left-padded, the action right-padded,
so position S − 1 + h holds the hidden state that predicts action token h; its value is V(s, a_<h), the
value of the state before token h is sampled. The trunk is run without its LM head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastarcher.model import transformer_blocks
from fastarcher.policy import left_align


def _trunk(lm: nn.Module) -> nn.Module:
    base = getattr(lm, "model", None) or getattr(lm, "transformer", None)
    if base is None:
        raise ValueError(f"cannot find the transformer trunk of {type(lm).__name__}")
    return base


class TokenValueModel(nn.Module):
    """`lm`: a causal LM of the policy's architecture (its LM head is not used). The head starts at zero, so
    the first values are 0 and the first advantages are the returns."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        dtype = next(lm.parameters()).dtype
        self.head = nn.Linear(hidden, 1, dtype=dtype, device=next(lm.parameters()).device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if getattr(lm, "lm_head", None) is not None and lm.lm_head.weight is not _trunk(lm).get_input_embeddings().weight:
            lm.lm_head.requires_grad_(False)  # an untied LM head gets no gradient here: leave it out of the optimizer

    def blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.lm)

    @torch.no_grad()
    def copy_trunk_from(self, policy: nn.Module) -> None:
        """Start the trunk from the policy's weights (shard by shard under FSDP2: same mesh and placements)."""
        self.lm.load_state_dict(policy.state_dict())

    def forward(self, state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor, *,
                pad_id: int) -> Tensor:
        """(B, A) values V(s, a_<h) for h < A (rows right-padded; values past action_len are meaningless)."""
        hidden = hidden_before_tokens(self.lm, state_ids, state_len, action_ids, action_len, pad_id=pad_id)
        return self.head(hidden).squeeze(-1).float()


def hidden_before_tokens(lm: nn.Module, state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor,
                         *, pad_id: int) -> Tensor:
    """(B, A, H) the trunk's last hidden state at the position that predicts each action token."""
    width_a = action_ids.shape[1]
    state = left_align(state_ids, state_len, pad_id)
    ids = torch.cat([state, action_ids], dim=1)  # (B, S + A)
    action_mask = torch.arange(width_a, device=ids.device)[None, :] < action_len[:, None]
    state_mask = torch.arange(state.shape[1], device=ids.device)[None, :] >= (state.shape[1] - state_len)[:, None]
    attention = torch.cat([state_mask, action_mask], dim=1).long()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = _trunk(lm)(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                        use_cache=False).last_hidden_state  # (B, S + A, H)
    return hidden[:, state.shape[1] - 1: state.shape[1] - 1 + width_a]  # position S − 1 + h predicts token h


class PolicyValueHead(nn.Module):
    """A linear value head on the policy's own trunk (`--ppo.value-model policy`): reads the policy's last
    hidden state without a gradient into it (the policy is stepped by its own loss only), so only the head is
    trained and checkpointed. One process only: the trunk is called outside the policy's FSDP2 root."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self._policy = (policy,)  # not a submodule: its parameters stay out of this module and its state dict
        param = next(policy.parameters())
        self.head = nn.Linear(policy.config.hidden_size, 1, dtype=param.dtype, device=param.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def blocks(self) -> list[nn.Module]:
        return []

    def copy_trunk_from(self, policy: nn.Module) -> None:
        """Nothing to copy: the trunk is the policy's."""

    def forward(self, state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor, *,
                pad_id: int) -> Tensor:
        with torch.no_grad():
            hidden = hidden_before_tokens(self._policy[0], state_ids, state_len, action_ids, action_len, pad_id=pad_id)
        return self.head(hidden).squeeze(-1).float()
