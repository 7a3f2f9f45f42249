"""Utterance-level double critic for ArCHer: Q1, Q2 on (state, action) and V1, V2 on the state.

Follows the critic of ArCHer (Zhou et al. 2024, https://arxiv.org/abs/2402.19446; reference code
github.com/YifeiZhou02/ArCHer, archer/models/critic.py): one encoder embeds the state and the
action *separately*; Q heads are 3-layer MLPs on [state_emb; action_emb], V heads are 3-layer MLPs on
state_emb alone. The reference encodes with a pretrained RoBERTa; here the default encoder is a small
random-init causal transformer (`LlamaModel`, built in code, no download), pooled at the last real
token, which under causal attention is the only position that has seen the whole sequence. The
option `encoder="policy"` embeds with the policy's own backbone instead (no gradient into it unless
`CriticConfig.backbone_grad` is set).

Target network: `make_target(critic)` makes a frozen deep copy; `soft_update(target, online, tau)`
applies θ̄ ← (1 − τ) θ̄ + τ θ after every critic optimizer step. Both work on plain tensors and on
FSDP2-sharded (DTensor) parameters; call `make_target` before sharding and shard both copies alike.

    critic = DoubleCritic(CriticConfig(), vocab_size=tok.vocab_size, pad_id=tok.pad_token_id)
    q1, q2, v1, v2 = critic(state_ids, state_mask, action_ids, action_mask)   # each (B,) fp32
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass(kw_only=True)
class CriticConfig:
    """Double critic (Q1, Q2, V1, V2) and its encoder."""

    encoder: Literal["separate", "policy"] = "separate"
    """Which network embeds states and actions: "separate" (a small random-init transformer owned by
    the critic) or "policy" (the policy's backbone, last hidden state at the last token)."""
    encoder_path: str | None = None
    """encoder="separate" from a local Hugging Face folder (its base model, decoder or encoder, as the reference
    used RoBERTa) instead of random init; it reads the policy's token ids, so its vocabulary must be the
    policy tokenizer's (same model family). Sharded by FSDP2 under torchrun like the random-init one."""
    init: Literal["random", "policy"] = "random"
    """encoder="separate": its starting weights. random (the reference); policy = a copy of the policy's trunk
    after the warm start, as PPO's value model and the token baseline start, so the critic begins with the
    features behaviour cloning learned (then trains apart from the policy). Needs the encoder's shape to equal
    the trunk's (the built-in policy's and the critic's defaults match)."""
    hidden_size: int = 64
    """Width of the separate encoder (ignored for encoder="policy", which uses the backbone's)."""
    num_layers: int = 2
    """Transformer blocks in the separate encoder."""
    num_heads: int = 4
    """Attention heads in the separate encoder (must divide hidden_size)."""
    mlp_hidden: int = 128
    """Hidden width of the Q/V heads (each head: Linear → ReLU → Linear → ReLU → Linear(1))."""
    max_positions: int = 1024
    """Maximum sequence length (state or action) the separate encoder accepts (rotary positions)."""
    share_state_pass: bool = True
    """Where s′ extends s (no context window slid), embed s inside the target's pass over s′ (causal encoders;
    a pretrained encoder_path trunk never): one pass fewer, the same values to float32 rounding. Off: three
    separate target passes, as before this option (bit for bit)."""
    backbone_grad: bool = False
    """encoder="policy" only: let critic losses backpropagate into the policy backbone. The backbone's
    parameters are never part of `critic.parameters()`: the trainer gives them to the critic optimizer too."""

    def __post_init__(self):
        if self.encoder not in ("separate", "policy"):
            raise ValueError(f"critic.encoder ({self.encoder!r}) must be 'separate' or 'policy'")
        if self.init not in ("random", "policy"):
            raise ValueError(f"critic.init ({self.init!r}) must be 'random' or 'policy'")
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_hidden", "max_positions"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"critic.{name} ({value}) must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"critic.hidden_size ({self.hidden_size}) must be divisible by critic.num_heads ({self.num_heads})"
            )


def _mlp_head(in_dim: int, hidden: int) -> nn.Sequential:
    """3-layer MLP to one scalar, the shape of the reference critic's heads."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 1),
    )


ABSOLUTE_POSITION_ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2")
"""Model types that derive their own positions (from their pad id): the critic passes them no position_ids."""


def load_pretrained_encoder(path: str, *, vocab_size: int) -> nn.Module:
    """The base model in `path` (`AutoModel`), checked to read token ids below `vocab_size`."""
    from transformers import AutoModel

    try:
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"critic.encoder_path ({path!r}): cannot load a model: {reason}") from None
    if encoder.config.vocab_size < vocab_size:
        raise ValueError(f"critic.encoder_path ({path!r}) has a vocabulary of {encoder.config.vocab_size} tokens, the "
                         f"policy's tokenizer {vocab_size}: the critic reads the policy's token ids, so use an encoder "
                         f"of the policy's model family")
    encoder.config.use_cache = False
    return encoder


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder (`layers`, `h`) or encoder (`encoder.layer`) base model."""
    for path in ("layers", "h", "encoder.layer"):
        node = encoder
        for part in path.split("."):
            node = getattr(node, part, None)
        if node is not None:
            return list(node)
    raise ValueError(f"cannot find the transformer blocks of {type(encoder).__name__}")


def build_separate_encoder(cfg: CriticConfig, *, vocab_size: int, pad_id: int) -> nn.Module:
    """Small random-init causal transformer (transformers `LlamaModel`) used as the critic encoder, or the
    pretrained one of `cfg.encoder_path`."""
    from transformers import LlamaConfig, LlamaModel

    if cfg.encoder_path:
        return load_pretrained_encoder(cfg.encoder_path, vocab_size=vocab_size)

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=pad_id,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return LlamaModel(config)


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden (B, T, H), mask (B, T) → (B, H): the hidden state at each row's last non-pad position.

    The last position where mask is 1 (works for right or left padding; an all-pad row pools position 0).
    """
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1).clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)


def prefix_rows(state_ids: Tensor, state_mask: Tensor, next_ids: Tensor, next_mask: Tensor) -> Tensor:
    """(B,) bool: the row's s (right-padded) is the start of its s′ (right-padded), i.e. no context window slid."""
    state_len, next_len = state_mask.sum(1), next_mask.sum(1)
    width = min(state_ids.shape[1], next_ids.shape[1])
    same = ((state_ids[:, :width] == next_ids[:, :width]) | ~state_mask[:, :width].bool()).all(1)
    return same & (state_len > 0) & (state_len <= next_len) & (state_len <= width)


def _any_on_some_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over ranks: the sharded encoder's passes are collectives, so every rank must take the
    same passes."""
    from fastarcher.dist import all_reduce_max

    return [bool(x) for x in all_reduce_max(torch.tensor([int(f) for f in flags], device=device)).tolist()]


class DoubleCritic(nn.Module):
    """Q1, Q2(s, a) and V1, V2(s) over token ids; every output is (B,) float32."""

    def __init__(self, cfg: CriticConfig, *, vocab_size: int, pad_id: int, backbone: nn.Module | None = None):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size ({vocab_size}) must be positive")
        self.cfg = cfg
        self.pad_id = pad_id
        if cfg.encoder == "separate":
            if backbone is not None:
                raise ValueError('critic.encoder="separate" builds its own encoder; pass backbone only with "policy"')
            self.encoder = build_separate_encoder(cfg, vocab_size=vocab_size, pad_id=pad_id)
            emb_dim = self.encoder.config.hidden_size
        else:
            if backbone is None:
                raise ValueError('critic.encoder="policy" needs the policy backbone (backbone=policy.model)')
            # kept in a tuple so it is not a submodule: its parameters stay out of critic.parameters(),
            # the critic's state_dict and the critic optimizer; make_target shares it instead of copying
            self._backbone = (backbone,)
            self.encoder = None
            emb_dim = backbone.config.hidden_size
        # Causal encoders (the built-in one, the policy's trunk) embed s inside the pass over s′ when s′
        # extends s; a pretrained encoder_path model may attend both ways, so it always embeds s apart.
        self.share_state_pass = cfg.share_state_pass and (cfg.encoder == "policy" or not cfg.encoder_path)
        self.q1 = _mlp_head(2 * emb_dim, cfg.mlp_hidden)
        self.q2 = _mlp_head(2 * emb_dim, cfg.mlp_hidden)
        self.v1 = _mlp_head(emb_dim, cfg.mlp_hidden)
        self.v2 = _mlp_head(emb_dim, cfg.mlp_hidden)

    @property
    def backbone(self) -> nn.Module | None:
        """The shared policy backbone (encoder="policy"), else None."""
        return self._backbone[0] if self.cfg.encoder == "policy" else None

    def encoder_layers(self) -> list[nn.Module]:
        """Transformer blocks owned by the critic, for per-block FSDP2 `fully_shard`.

        Empty for encoder="policy": the backbone is sharded with the policy."""
        if self.encoder is None:
            return []
        return encoder_blocks(self.encoder)

    def embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (B, T) int64, mask (B, T) → (B, H) embedding pooled at the last non-pad token."""
        return last_token_pool(self._hidden(ids, mask), mask)  # (B, H)

    def _hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The encoder's last hidden state (B, T, H)."""
        mask = mask.to(torch.long)
        # positions count real tokens only, so left padding embeds the same as right padding
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        net = self.encoder if self.encoder is not None else self._backbone[0]
        kwargs = {} if net.config.model_type in ABSOLUTE_POSITION_ENCODERS else {"position_ids": position_ids,
                                                                                 "use_cache": False}
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.encoder is not None or self.cfg.backbone_grad)):
            if self.encoder is None and hasattr(net, "lm_head"):
                # the policy itself (a causal LM): called through its root so that FSDP2's root hooks gather the
                # embedding and final norm; its last hidden state is the trunk's, one logit row is computed
                out = net(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, **kwargs)
                hidden = out.hidden_states[-1]
            else:
                hidden = net(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        return hidden

    def forward(self, state_ids: Tensor, state_mask: Tensor, action_ids: Tensor, action_mask: Tensor,
                next_ids: Tensor | None = None, next_mask: Tensor | None = None,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Q1, Q2)(s, a) and (V1, V2)(s); with `next_ids`/`next_mask`, (V1, V2)(s′) instead of V(s).

        The second form is what the critic targets need (Q on fresh actions, V on next states) in one
        call: no action is embedded only to be thrown away. (Embedding s and s′ as one batch measured
        slower on CPU and is not bit-identical to two calls, so they stay separate.)"""
        if (next_ids is None) != (next_mask is None):
            raise ValueError("pass both next_ids and next_mask, or neither")
        prefix = None
        if next_ids is not None and self.share_state_pass:
            prefix = prefix_rows(state_ids, state_mask, next_ids, next_mask)
            some, others = _any_on_some_rank([bool(prefix.any()), not bool(prefix.all())], state_ids.device)
            prefix = prefix if some else None
        if prefix is not None:
            # rows with s′ = s ⊕ a ⊕ o (no context window slid): under causal attention the pass over s′ holds
            # s's embedding at s's last token, so their s needs no pass of its own
            hidden = self._hidden(next_ids, next_mask)  # (B, T′, H)
            value_emb = last_token_pool(hidden, next_mask)
            within = torch.arange(next_ids.shape[1], device=next_ids.device)[None, :] < state_mask.sum(1)[:, None]
            state_emb = last_token_pool(hidden, within)
            if others:  # the rows whose window slid (on some rank) embed s apart
                rows = (~prefix).nonzero().squeeze(1)
                pick = rows if len(rows) else rows.new_zeros(1)  # a rank without such rows embeds one, unused
                apart = self.embed(state_ids[pick], state_mask[pick])
                if len(rows):
                    state_emb = state_emb.index_copy(0, rows, apart.to(state_emb.dtype))
        else:
            state_emb = self.embed(state_ids, state_mask)  # (B, H)
            value_emb = state_emb if next_ids is None else self.embed(next_ids, next_mask)  # (B, H)
        # two encoder calls instead of one on the concatenated batch: states are long and actions
        # short, so padding both to one width would waste most of the action call
        action_emb = self.embed(action_ids, action_mask)  # (B, H)
        # heads run in their own (compute) dtype; reading it here sees FSDP2's unsharded parameter
        head_dtype = self.q1[0].weight.dtype
        state_emb, action_emb, value_emb = state_emb.to(head_dtype), action_emb.to(head_dtype), value_emb.to(head_dtype)
        state_action = torch.cat([state_emb, action_emb], dim=-1)  # (B, 2H)
        q1 = self.q1(state_action).squeeze(-1).float()
        q2 = self.q2(state_action).squeeze(-1).float()
        v1 = self.v1(value_emb).squeeze(-1).float()
        v2 = self.v2(value_emb).squeeze(-1).float()
        # fresh tensors, not views: FSDP2 warns that in-place ops on a view output would skip its hooks
        return q1.clone(), q2.clone(), v1.clone(), v2.clone()


def policy_trunk_state(policy: nn.Module) -> dict[str, Tensor]:
    """The policy's trunk (its `model` submodule: embeddings, blocks, final norm) as a state dict keyed like a
    plain `LlamaModel`, for critic.init policy."""
    trunk = getattr(policy, "model", None)
    if trunk is None:
        raise ValueError(f"critic.init policy: cannot find the trunk of {type(policy).__name__} (no .model)")
    return trunk.state_dict()


def check_encoder_matches(encoder: nn.Module, trunk_state: dict[str, Tensor]) -> None:
    """critic.init policy needs the separate encoder to have the trunk's tensors, name by name and shape by
    shape; otherwise one error naming the first difference and the flags to set."""
    own = encoder.state_dict()
    for name in sorted(set(own) | set(trunk_state)):
        if name not in own or name not in trunk_state or own[name].shape != trunk_state[name].shape:
            shapes = tuple(own[name].shape) if name in own else None, \
                tuple(trunk_state[name].shape) if name in trunk_state else None
            raise ValueError(f"critic.init policy: the critic encoder's {name!r} is {shapes[0]} and the policy "
                             f"trunk's is {shapes[1]}: set critic.hidden_size, num_layers, num_heads to the "
                             f"policy's (critic intermediate size is 4 x hidden) or use critic.init random")


def make_target(critic: DoubleCritic) -> DoubleCritic:
    """A frozen deep copy (requires_grad False, eval mode) to serve as the target critic.

    A shared policy backbone (encoder="policy") is not copied: target and online critic read the
    same backbone and differ in their heads. Call before FSDP2 sharding.
    """
    memo = {}
    if critic.backbone is not None:
        memo[id(critic.backbone)] = critic.backbone
    target = copy.deepcopy(critic, memo)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak averaging θ̄ ← (1 − τ) θ̄ + τ θ over all parameters, in place, with foreach ops.

    For FSDP2 modules each rank updates its own shard (`DTensor.to_local()`); both modules must be
    sharded identically. Parameters are matched by name.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau ({tau}) must be in [0, 1]")
    target_params = dict(target.named_parameters())
    online_params = dict(online.named_parameters())
    if target_params.keys() != online_params.keys():
        missing = sorted(set(target_params) ^ set(online_params))[:5]
        raise ValueError(f"target and online critic have different parameters, e.g. {missing}")
    names = list(target_params)
    dst = [_local(target_params[n].data) for n in names]
    src = [_local(online_params[n].data) for n in names]
    for d, s, n in zip(dst, src, names):
        if d.shape != s.shape:
            raise ValueError(f"parameter {n}: target shard {tuple(d.shape)} vs online shard {tuple(s.shape)}")
    # lerp: θ̄ + τ (θ − θ̄) = (1 − τ) θ̄ + τ θ
    torch._foreach_lerp_(dst, src, tau)
