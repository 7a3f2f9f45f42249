"""Per-turn rows ⇄ per-episode token rows, for the token-level estimators of `fastarcher.algos.estimators`.

Experience is stored per TURN: for N turns, per-token tensors are (N, A) right-padded and row i's scored
action tokens are its first `scored_len[i]` positions. `turns_per_episode` (E ints, sum N) groups the rows:
an episode's turns are contiguous and in turn order. The estimators want one row per EPISODE, (E, T):
    episode row = turn 0's scored tokens | sep | turn 1's scored tokens | sep | … | last turn's scored tokens
right-padded to T = the longest row (at least 1). A separator is one mask-0 position standing for the
observation between two turns; it keeps consecutive turns distinct runs of mask-1 tokens (the estimators'
definition of a turn) and, being mask 0, neither discounts nor carries a value there.
A turn with 0 scored tokens contributes no token but keeps its separators, so its neighbours never merge
into one run; it is simply absent as a turn for `bilevel_gae` (for its reward see `turn_end_rewards`).

`episode_layout` builds the index tensors once per batch (one host sync: T is data-dependent);
`pack` / `unpack` / `turn_end_rewards` / `broadcast_turns` are pure, sync-free indexing and therefore
differentiable w.r.t. their tensor input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class EpisodeLayout:
    """Index tensors of the turn → episode mapping (see the module docstring), on scored_len's device.

    mask: (E, T) float32, 1 on packed action tokens, 0 on separators and padding.
    index: (E, T) long, flat position in x.reshape(-1) (x: (N, A)) of each packed token; N·A elsewhere.
    inverse: (N, A) long, flat position in y.reshape(-1) (y: (E, T)) of each scored token; E·T elsewhere.
    reward_index: (N,) long, flat position in the (E, T) row that receives turn i's reward; E·T = dropped.
    num_turns: N. width: A.
    """

    mask: Tensor
    index: Tensor
    inverse: Tensor
    reward_index: Tensor
    num_turns: int
    width: int


def episode_layout(scored_len: Tensor, width: int, turns_per_episode: list[int]) -> EpisodeLayout:
    """Build the `EpisodeLayout` for per-turn rows of `width` tokens with `scored_len` (N,) integer
    scored tokens each, grouped into episodes of `turns_per_episode` (E ints ≥ 1, summing to N)."""
    if scored_len.dim() != 1 or scored_len.is_floating_point() or scored_len.is_complex():
        raise ValueError(f"scored_len must be a 1-D integer tensor, got {scored_len.dtype} {tuple(scored_len.shape)}")
    n = scored_len.numel()
    if width < 0:
        raise ValueError(f"width ({width}) must be non-negative")
    if any(k < 1 for k in turns_per_episode):
        raise ValueError(f"every episode needs at least one turn, got turns_per_episode={turns_per_episode}")
    if sum(turns_per_episode) != n:
        raise ValueError(f"sum(turns_per_episode) ({sum(turns_per_episode)}) must equal the number of turns ({n})")
    if n and bool(((scored_len < 0) | (scored_len > width)).any()):
        raise ValueError(f"scored_len must lie in [0, width={width}], got {scored_len.tolist()}")
    dev, e = scored_len.device, len(turns_per_episode)
    lens = scored_len.long()
    counts = torch.tensor(turns_per_episode, dtype=torch.long, device=dev)
    episode_of = torch.repeat_interleave(torch.arange(e, device=dev), counts)  # (N,)
    step = lens + 1  # a turn's tokens plus the separator after it
    before = step.cumsum(0) - step  # exclusive prefix sum over all turns
    first_turn = counts.cumsum(0) - counts  # (E,) row of each episode's first turn
    start = before - before[first_turn][episode_of]  # (N,) offset of turn i inside its episode row
    row_len = torch.zeros(e, dtype=torch.long, device=dev).index_add_(0, episode_of, step) - 1
    t = max(int(row_len.max()), 1) if e else 1  # the one host sync

    j = torch.arange(width, device=dev)
    scored = j < lens[:, None]  # (N, A)
    dest = (episode_of * t + start)[:, None] + j  # (N, A) flat position in the (E, T) rows
    inverse = torch.where(scored, dest, torch.full_like(dest, e * t))
    src = torch.arange(n * width, device=dev)
    index = torch.full((e * t + 1,), n * width, dtype=torch.long, device=dev)
    index = index.scatter(0, inverse.reshape(-1), src)[:-1].view(e, t)  # unscored tokens land in the spare slot
    mask = (index != n * width).float()

    # turn i's reward: its last scored token; if it has none, the previous non-empty turn's last token in
    # the same episode, else the next one's; an episode without any scored token drops it (E·T).
    row0 = episode_of * t
    nonempty = lens > 0
    end = row0 + start + lens - 1
    prev = torch.where(nonempty, end, torch.full_like(end, -1)).cummax(0).values
    nxt = torch.where(nonempty, end, torch.full_like(end, e * t)).flip(0).cummin(0).values.flip(0)
    reward_index = torch.where(prev >= row0, prev, torch.where(nxt < row0 + t, nxt, torch.full_like(nxt, e * t)))
    return EpisodeLayout(mask, index, inverse, reward_index, n, width)


def _check(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def pack(layout: EpisodeLayout, x: Tensor) -> Tensor:
    """x (N, A) per-turn → (E, T) per-episode: scored tokens moved to their episode positions, 0 on
    separators and padding; dtype of x, differentiable (a gather)."""
    _check("x", x, (layout.num_turns, layout.width))
    flat = torch.cat([x.reshape(-1), x.new_zeros(1)])  # the extra 0 is what index N·A reads
    return flat[layout.index]


def unpack(layout: EpisodeLayout, y: Tensor) -> Tensor:
    """y (E, T) per-episode → (N, A) per-turn: the inverse of `pack` on scored tokens, 0 on unscored ones;
    dtype of y, differentiable (a gather). unpack(pack(x)) = x · scored mask."""
    _check("y", y, tuple(layout.mask.shape))
    flat = torch.cat([y.reshape(-1), y.new_zeros(1)])
    return flat[layout.inverse]


def turn_end_rewards(layout: EpisodeLayout, turn_rewards: Tensor) -> Tensor:
    """turn_rewards (N,) → token rewards (E, T): turn i's reward on its last scored token of the episode
    row, 0 elsewhere (the layout `estimators` expects). A turn with no scored token gives its reward to
    the previous non-empty turn of its episode (the actions that led to it), else to the next non-empty
    turn; rewards landing on one token add up. In an episode with no scored token at all the reward is
    dropped (no action to credit). Float dtype of turn_rewards; differentiable (an index_add)."""
    _check("turn_rewards", turn_rewards, (layout.num_turns,))
    r = turn_rewards if turn_rewards.is_floating_point() else turn_rewards.float()
    e, t = layout.mask.shape
    out = r.new_zeros(e * t + 1).index_add(0, layout.reward_index, r)
    return out[:-1].view(e, t)


def broadcast_turns(x: Tensor, mask: Tensor) -> Tensor:
    """x (N,) per-turn, mask (N, A) scored tokens → (N, A) with x[i] on row i's scored tokens, 0 elsewhere.
    Float dtype of x; differentiable w.r.t. x."""
    if x.dim() != 1 or mask.dim() != 2 or mask.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (N,) and mask (N, A), got {tuple(x.shape)} and {tuple(mask.shape)}")
    x = x if x.is_floating_point() else x.float()
    return x[:, None] * mask.to(x.dtype)
