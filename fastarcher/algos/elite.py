"""Elite store: the transitions of the top fraction of ALL episodes collected so far.

The "Filtered BC" baseline of the ArCHer paper (Zhou et al. 2024, https://arxiv.org/abs/2402.19446)
imitates the best `fraction` of every trajectory gathered during training, not only this iteration's
(`filter_top_fraction` ranks one iteration). `TopTrajectories` keeps that set across iterations:

- the return of every episode ever added is kept (float64, grows by E per add: 8 bytes an episode), so
  the top k = ceil(fraction · seen) is always decided over all episodes seen. Episode ids count from 0
  in the order episodes were added (older = smaller id);
- turn rows are kept only for episodes in the current top set. After each add the top set is recomputed
  (`filter_top_fraction`: stable descending sort, ties go to the OLDER episode) and the rows of episodes
  that fell out are evicted. Evicted rows are gone for good: an episode that re-enters the top set later
  (k grows with seen) keeps its rank but holds no rows, so the held episodes are always a subset of the
  true top set and a worse episode never fills the gap;
- an episode longer than `capacity` rows on its own is never held; then, while the held rows exceed
  `capacity`, whole episodes are dropped from the bottom of the ranking (lowest return, then newest).
  Both count in `dropped_for_capacity` (episodes) and, like evictions, are never restored.

Rows live on the CPU, right-padded with pad_id to the widest row seen per field (ids and lengths stored
int32 as in the replay buffer, returned int64), ordered by episode age (oldest first), turns in order.
Tensors are never modified in place: `state_dict()` returns the store's own tensors, not copies.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fastarcher.replay import TransitionBatch

@torch.no_grad()
def filter_top_fraction(returns: Tensor, fraction: float) -> Tensor:
    """Boolean mask (B,) keeping the k = ceil(fraction · B) rows with the highest returns.

    Ties are broken deterministically by position: among equal returns the earlier row wins (a stable
    descending sort), so exactly k rows are kept even when returns tie at the threshold.
    fraction must be in (0, 1]; fraction = 1 keeps everything.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"filtered_bc fraction ({fraction}) must be in (0, 1]")
    if returns.dim() != 1:
        raise ValueError(f"returns must be 1-D (B,), got shape {tuple(returns.shape)}")
    n = returns.numel()
    # round first so that e.g. 0.3 · 10 = 3.0000000000000004 keeps 3 rows, not 4
    k = min(n, math.ceil(round(fraction * n, 9)))
    order = torch.sort(returns, descending=True, stable=True).indices  # (B,) best first, earlier first on ties
    mask = torch.zeros(n, dtype=torch.bool, device=returns.device)
    mask[order[:k]] = True
    return mask


_DTYPES: dict[str, torch.dtype] = {
    "state_ids": torch.int32, "state_len": torch.int32, "action_ids": torch.int32, "action_len": torch.int32,
    "next_obs_ids": torch.int32, "next_obs_len": torch.int32,
    "reward": torch.float32, "done": torch.float32, "mc_return": torch.float32,
}
_LEN_OF = {"state_ids": "state_len", "action_ids": "action_len", "next_obs_ids": "next_obs_len"}

META_FIELDS = ("capacity", "pad_id", "num_episodes_seen", "num_rows", "num_elite_episodes", "dropped_for_capacity")
"""Order of the int64 `meta` tensor of an elite state dict."""


class TopTrajectories:
    """Turn rows of the top ceil(fraction · seen) episodes by return over every episode added so far."""

    checkpoint_scope = "rank"

    def __init__(self, fraction: float, capacity: int, *, pad_id: int):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"elite fraction ({fraction!r}) must be in (0, 1]")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"elite capacity ({capacity!r}) must be a positive integer")
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
            raise ValueError(f"elite pad_id ({pad_id!r}) must be a non-negative integer token id")
        self.fraction, self.capacity, self.pad_id = float(fraction), capacity, pad_id
        self._rows: dict[str, Tensor] = {
            name: torch.full((0, 1), pad_id, dtype=dt) if name in _LEN_OF else torch.zeros(0, dtype=dt)
            for name, dt in _DTYPES.items()}
        self._episode = torch.zeros(0, dtype=torch.int64)  # (R,) episode id of each held row
        self._returns = torch.zeros(0, dtype=torch.float64)  # (seen,) return of every episode seen
        self._held = torch.zeros(0, dtype=torch.bool)  # (seen,) True where the episode's rows are held
        self._dropped = 0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._episode.shape[0]

    @property
    def num_episodes_seen(self) -> int:
        return self._returns.shape[0]

    @property
    def num_elite_episodes(self) -> int:
        """Episodes whose rows are held."""
        return int(self._held.sum())

    @property
    def dropped_for_capacity(self) -> int:
        """Top-set episodes dropped (whole) to keep the held rows within `capacity`."""
        return self._dropped

    @property
    def threshold(self) -> float | None:
        """Lowest return among the held episodes, None when nothing is held."""
        return float(self._returns[self._held].min()) if bool(self._held.any()) else None

    def transitions(self) -> TransitionBatch:
        """Every held row: by episode age (oldest first), the rows of an episode in turn order."""
        out = {n: t.long() if t.dtype == torch.int32 else t for n, t in self._rows.items()}
        return TransitionBatch(**out, pad_id=self.pad_id)

    def sample(self, n: int, generator: torch.Generator) -> TransitionBatch:
        """`n` held rows drawn uniformly with replacement, indices from `generator` (a CPU generator)."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty elite store; add episodes first")
        if n <= 0:
            raise ValueError(f"sample size n ({n}) must be positive")
        return self.transitions().select(torch.randint(len(self), (n,), generator=generator))

    # ------------------------------------------------------------------ add
    def add(self, batch: TransitionBatch, episode_of_row: Tensor, episode_returns: Tensor) -> None:
        """Add one iteration's episodes: rows grouped by episode (`episode_of_row` (N,) int64 = 0, 0, 1, …,
        E − 1, every episode at least one row) and their returns (E,); then re-rank every episode seen."""
        batch.validate()
        n = len(batch)
        if episode_returns.dim() != 1 or not episode_returns.is_floating_point():
            raise ValueError(f"episode_returns must be a 1-D float tensor, got {episode_returns.dtype} "
                             f"of shape {tuple(episode_returns.shape)}")
        if episode_of_row.shape != (n,) or episode_of_row.dtype != torch.int64:
            raise ValueError(f"episode_of_row must be ({n},) int64, got {episode_of_row.dtype} "
                             f"of shape {tuple(episode_of_row.shape)}")
        e, ep = episode_returns.shape[0], episode_of_row.cpu()
        if n == 0 and e == 0:
            return
        step = ep[1:] - ep[:-1]
        if n == 0 or int(ep[0]) != 0 or int(ep[-1]) != e - 1 or bool(((step != 0) & (step != 1)).any()):
            raise ValueError(f"episode_of_row must number contiguous episodes 0..{e - 1} in order, every "
                             f"episode with at least one row (one return per episode)")
        returns = episode_returns.detach().cpu().to(torch.float64)
        if not bool(torch.isfinite(returns).all()):
            raise ValueError("episode_returns must be finite")
        new = self._fit(batch)  # validates lengths before any state changes
        episode = torch.cat([self._episode, ep + self.num_episodes_seen])
        all_returns = torch.cat([self._returns, returns])
        top = filter_top_fraction(all_returns, self.fraction)  # (seen,) older wins ties
        held = torch.cat([self._held, torch.ones(e, dtype=torch.bool)]) & top
        counts = torch.bincount(episode, minlength=held.shape[0])  # (seen,) rows of each episode
        too_long = held & (counts > self.capacity)
        held &= ~too_long
        order = torch.sort(all_returns, descending=True, stable=True).indices  # best first, older on ties
        in_order = held[order]
        over = in_order & (torch.cumsum(counts[order] * in_order, 0) > self.capacity)  # bottom of ranking
        held[order[over]] = False
        self._dropped += int(too_long.sum()) + int(over.sum())
        keep = held[episode]
        for name, old in self._rows.items():
            if name in _LEN_OF:
                width = max(old.shape[1], new[name].shape[1])
                old, new[name] = self._widen(old, width), self._widen(new[name], width)
            self._rows[name] = torch.cat([old, new[name]])[keep]
        self._episode, self._returns, self._held = episode[keep], all_returns, held

    def _widen(self, ids: Tensor, width: int) -> Tensor:
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)

    def _fit(self, batch: TransitionBatch) -> dict[str, Tensor]:
        """The batch as storage dtypes, id fields cut to their longest row (≥ 1) and padding set to pad_id."""
        out = {}
        for name in _DTYPES:
            t = getattr(batch, name).detach().cpu()
            if name not in _LEN_OF:
                out[name] = t.to(_DTYPES[name])
                continue
            length = getattr(batch, _LEN_OF[name]).cpu().long()
            if t.is_floating_point() or bool(((length < 0) | (length > t.shape[1])).any()):
                raise ValueError(f"TransitionBatch.{name} must hold integer ids and {_LEN_OF[name]} must "
                                 f"be in [0, {t.shape[1]}]")
            width = max(int(length.max()), 1)
            t = self._widen(t[:, :width].long(), width)
            valid = torch.arange(width)[None, :] < length[:, None]
            out[name] = torch.where(valid, t, self.pad_id).to(torch.int32)
        return out

    # ------------------------------------------------------------------ checkpoint (a per-rank part)
    def state_dict(self) -> dict[str, Tensor]:
        """Held rows per field, `episode` (R,) id per row, `returns` of every episode seen, `held` flags,
        `fraction` (float64) and the int64 `meta` counters (META_FIELDS): tensors only."""
        sd = dict(self._rows)
        meta = [self.capacity, self.pad_id, self.num_episodes_seen, len(self), self.num_elite_episodes, self._dropped]
        sd.update(episode=self._episode, returns=self._returns, held=self._held,
                  fraction=torch.tensor(self.fraction, dtype=torch.float64), meta=torch.tensor(meta, dtype=torch.int64))
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from `state_dict()` after checking every field (files are untrusted), so that further adds
        give exactly what an uninterrupted store gives."""
        keys = (*_DTYPES, "episode", "returns", "held", "fraction", "meta")
        missing = [k for k in keys if not isinstance(sd.get(k), Tensor)]
        if missing:
            raise ValueError(f"elite state_dict lacks tensors {', '.join(missing)}")
        meta = _expect(sd, "meta", (len(META_FIELDS),), torch.int64)
        c = dict(zip(META_FIELDS, meta.tolist()))
        for name in ("capacity", "pad_id"):
            if c[name] != getattr(self, name):
                raise ValueError(f"elite state_dict meta has {name}={c[name]} but this store has {getattr(self, name)}")
        seen, rows, elite = c["num_episodes_seen"], c["num_rows"], c["num_elite_episodes"]
        if min(seen, rows, elite, c["dropped_for_capacity"]) < 0 or rows > self.capacity or elite > min(seen, rows):
            raise ValueError(f"elite state_dict meta is inconsistent: {c}")
        fraction = _expect(sd, "fraction", (), torch.float64)
        if float(fraction) != self.fraction:
            raise ValueError(f"elite state_dict fraction {float(fraction)} differs from this store's {self.fraction}")
        returns = _expect(sd, "returns", (seen,), torch.float64)
        if not bool(torch.isfinite(returns).all()):
            raise ValueError("elite state_dict returns are not all finite")
        held = _expect(sd, "held", (seen,), torch.bool)
        if int(held.sum()) != elite or bool((held & ~filter_top_fraction(returns, self.fraction)).any()):
            raise ValueError(f"elite state_dict held must flag {elite} episodes, all within the top fraction")
        episode = _expect(sd, "episode", (rows,), torch.int64)
        ids_ok = torch.equal(torch.unique(episode), held.nonzero().squeeze(1))
        if bool((episode[1:] < episode[:-1]).any()) or not ids_ok:
            raise ValueError("elite state_dict episode must list the held episodes' ids in order, each at least once")
        out: dict[str, Tensor] = {}
        for name, dt in _DTYPES.items():
            if name not in _LEN_OF:
                out[name] = _expect(sd, name, (rows,), dt)
                continue
            t = sd[name]
            if t.dim() != 2 or t.shape[0] != rows or t.shape[1] < 1 or t.dtype != dt:
                raise ValueError(f"elite state_dict {name} is {t.dtype} of shape {tuple(t.shape)}, expected "
                                 f"{dt} of shape ({rows}, W ≥ 1)")
            out[name] = t.cpu().clone()
        for name, len_name in _LEN_OF.items():
            ids, length = out[name], _expect(sd, len_name, (rows,), torch.int32)
            pad = torch.arange(ids.shape[1])[None, :] >= length[:, None].long()
            if bool(((length < 0) | (length > ids.shape[1])).any()) or bool((ids[pad] != self.pad_id).any()):
                raise ValueError(f"elite state_dict {len_name} is outside [0, {ids.shape[1]}] or {name} "
                                 f"has non-pad tokens past it")
        self._rows, self._episode, self._returns, self._held = out, episode, returns, held
        self._dropped = c["dropped_for_capacity"]


def _expect(sd: Mapping[str, Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A CPU copy of sd[name], after checking its shape and dtype (ValueError naming the field)."""
    t = sd[name]
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"elite state_dict {name} is {t.dtype} of shape {tuple(t.shape)}, "
                         f"expected {dtype} of shape {shape}")
    return t.cpu().clone()
