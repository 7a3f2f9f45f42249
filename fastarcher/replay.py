"""Device-resident circular replay buffer of utterance-level transitions.

One transition is one turn of a dialogue: the state s (all tokens so far), the action a (the utterance
the policy produced, including its stop token), the observation o that the environment answered with,
the reward r, the terminal flag and the discounted Monte-Carlo return from that turn.

The next state is never stored: the trainer builds state token ids by concatenating segment token ids,
so s' = s ⊕ a ⊕ o exactly, and `TransitionBatch.next_state` rebuilds it on the fly in one vectorised
gather. This halves the memory of the largest field (states are whole dialogues).

Storage is preallocated at construction (capacity × max lengths, reported by `describe()`); token ids
are stored as int32 (every tokenizer vocabulary fits) and returned as int64. `add` writes a whole batch
with `index_copy_`, `sample` draws indices with `torch.randint` from the caller's generator: neither
has a Python loop over rows, and neither synchronises with the device except where noted.

Length limits on `add`:
- states longer than `max_state_len` are left-truncated (the last tokens, nearest to the action, are
  kept) and counted in `truncated_states`;
- actions longer than `max_action_len` and observations longer than `max_obs_len` are rejected with a
  `ValueError`: cutting an utterance changes what its log-probability scores, and cutting an
  observation changes s'. Raise the limit instead.

Checkpoints: `state_dict()` holds only the filled rows (slots [0, size)) and the counters, so a shard
grows with the data, not the capacity. The buffer is a per-rank checkpoint part (the checkpointer writes
its state dict as one safetensors file per rank); on a resume with another world size
`load_resharded` takes every old rank's shard and adds this rank's share of their rows
(`redistribute`, pure: state dicts or lazy file mappings in, this rank's batch out).

Example:
    buf = ReplayBuffer(100_000, 512, 16, 64, pad_id=0)
    buf.add(batch)                      # TransitionBatch from the rollout
    mb = buf.sample(32, generator)      # uniform with replacement
    next_ids, next_len = mb.next_state(max_len=512)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

_ID_STORAGE_DTYPE = torch.int32


@dataclass
class TransitionBatch:
    """A batch of utterance-level transitions; token tensors are right-padded with the pad id."""

    state_ids: Tensor
    """(B, S) int64 token ids of the state (dialogue so far)."""
    state_len: Tensor
    """(B,) int64 number of real tokens in each state row."""
    action_ids: Tensor
    """(B, A) int64 token ids of the utterance, including its stop token."""
    action_len: Tensor
    """(B,) int64 number of real action tokens."""
    next_obs_ids: Tensor
    """(B, O) int64 token ids of the observation that followed the action."""
    next_obs_len: Tensor
    """(B,) int64 number of real observation tokens (0 is allowed, e.g. at a terminal turn)."""
    reward: Tensor
    """(B,) float32 reward of the turn."""
    done: Tensor
    """(B,) float32, 1.0 when the episode ended with this turn."""
    mc_return: Tensor
    """(B,) float32 discounted Monte-Carlo return from this turn on."""
    pad_id: int = 0
    """Token id used for right padding (the buffer sets it on the batches it returns)."""

    def __len__(self) -> int:
        return self.state_ids.shape[0]

    def to(self, device) -> "TransitionBatch":
        """All fields moved to `device` (non-blocking where possible)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.tensor_fields()}
        return TransitionBatch(**moved, pad_id=self.pad_id)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        """Names of the tensor fields, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.name != "pad_id")

    def validate(self) -> None:
        """Check field ranks and that every field has the same batch size (shape checks only, no sync)."""
        b = self.state_ids.shape[0]
        for name in ("state_ids", "action_ids", "next_obs_ids"):
            t = getattr(self, name)
            if t.dim() != 2:
                raise ValueError(f"TransitionBatch.{name} must be 2-D (B, T), got shape {tuple(t.shape)}")
        for name in self.tensor_fields():
            t = getattr(self, name)
            if t.shape[0] != b:
                raise ValueError(f"TransitionBatch.{name} has batch size {t.shape[0]}, expected {b} (from state_ids)")
            if not name.endswith("_ids") and t.dim() != 1:
                raise ValueError(f"TransitionBatch.{name} must be 1-D (B,), got shape {tuple(t.shape)}")

    def select(self, rows: slice | Tensor) -> "TransitionBatch":
        """The rows `rows` (a slice or an index tensor on the batch's device) as a new batch."""
        return TransitionBatch(**{f: getattr(self, f)[rows] for f in self.tensor_fields()}, pad_id=self.pad_id)

    def trimmed(self) -> "TransitionBatch":
        """Drop all-padding columns (widths cut to the longest row of each field).

        Sync point: reads three maxima from the device. Worth it before an encoder forward when the
        buffer's maximum lengths are far above the typical row.
        """
        widths = torch.stack([self.state_len.max(), self.action_len.max(), self.next_obs_len.max()]).tolist()
        s, a, o = (max(int(w), 1) for w in widths)
        return TransitionBatch(
            state_ids=self.state_ids[:, :s], state_len=self.state_len,
            action_ids=self.action_ids[:, :a], action_len=self.action_len,
            next_obs_ids=self.next_obs_ids[:, :o], next_obs_len=self.next_obs_len,
            reward=self.reward, done=self.done, mc_return=self.mc_return, pad_id=self.pad_id,
        )

    def next_state_width(self, max_len: int) -> int:
        """Columns of `next_state(max_len)`: rows of a bigger batch's s' cut to this width are equal to it."""
        return min(self.state_ids.shape[1] + self.action_ids.shape[1] + self.next_obs_ids.shape[1], max_len)

    def next_state(self, max_len: int) -> tuple[Tensor, Tensor]:
        """s' = s ⊕ a ⊕ o as right-padded ids (B, S') and lengths (B,).

        Rows longer than `max_len` are left-truncated (the last `max_len` tokens are kept).
        S' = min(S + A + O, max_len). Built with one gather, no loop over rows.
        """
        return concat_segments(
            [(self.state_ids, self.state_len), (self.action_ids, self.action_len),
             (self.next_obs_ids, self.next_obs_len)],
            max_len=max_len, pad_id=self.pad_id,
        )


def concat_segments(segments: list[tuple[Tensor, Tensor]], *, max_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Concatenate right-padded token segments row by row, keeping at most the last `max_len` tokens.

    segments: [(ids (B, T_k), lengths (B,)), ...]. Returns int64 ids (B, W) with W = min(Σ T_k, max_len)
    and lengths (B,) = min(Σ len_k, max_len). Output position q of row b reads concatenated position
    p = start_b + q, start_b = max(total_b − max_len, 0). Position p lies in the last segment k whose
    real tokens begin at or before it (ends_{k−1} <= p), and sits at column p + shift_k of the segments
    laid side by side, shift_k = (T_0 + … + T_{k−1}) − (len_0 + … + len_{k−1}): so one gather from that
    side-by-side tensor fills the whole output (a loop over the segments, never over rows).
    """
    if max_len <= 0:
        raise ValueError(f"max_len ({max_len}) must be positive")
    device = segments[0][0].device
    widths = [ids.shape[1] for ids, _ in segments]
    width = min(sum(widths), max_len)
    lens = [length.to(device=device, dtype=torch.long) for _, length in segments]
    ends, shifts = [], []  # per segment (B,): where its real tokens end; column shift inside it
    end, first_col = torch.zeros_like(lens[0]), 0
    for w, length in zip(widths, lens):
        shifts.append(first_col - end)
        end = end + length
        ends.append(end)
        first_col += w
    total = end
    pos = (total - max_len).clamp(min=0)[:, None] + torch.arange(width, device=device)  # (B, W)
    col = pos + shifts[0][:, None]
    for k in range(1, len(segments)):
        col = torch.where(pos >= ends[k - 1][:, None], pos + shifts[k][:, None], col)
    side_by_side = torch.cat([ids.long() for ids, _ in segments], 1)  # (B, Σ T_k)
    out = side_by_side.gather(1, col.clamp_(max=max(first_col - 1, 0)))  # positions past the end: padded below
    return out.masked_fill_(pos >= total[:, None], pad_id), total.clamp(max=max_len)


class ReplayBuffer:
    """Preallocated circular buffer of `TransitionBatch` rows with uniform sampling with replacement."""

    def __init__(
        self,
        capacity: int,
        max_state_len: int,
        max_action_len: int,
        max_obs_len: int,
        *,
        pad_id: int,
        device: str | torch.device = "cpu",
    ):
        for name, value in (("capacity", capacity), ("max_state_len", max_state_len),
                            ("max_action_len", max_action_len), ("max_obs_len", max_obs_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ReplayBuffer {name} ({value!r}) must be a positive integer")
        if not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"ReplayBuffer pad_id ({pad_id!r}) must be a non-negative integer token id")
        self.capacity = capacity
        self.max_state_len = max_state_len
        self.max_action_len = max_action_len
        self.max_obs_len = max_obs_len
        self.pad_id = pad_id
        self.device = torch.device(device)
        C, dev = capacity, self.device

        def ids(width: int) -> Tensor:
            return torch.full((C, width), pad_id, dtype=_ID_STORAGE_DTYPE, device=dev)

        def vec(dtype: torch.dtype) -> Tensor:
            return torch.zeros(C, dtype=dtype, device=dev)

        self._storage: dict[str, Tensor] = {
            "state_ids": ids(max_state_len), "state_len": vec(torch.int32),
            "action_ids": ids(max_action_len), "action_len": vec(torch.int32),
            "next_obs_ids": ids(max_obs_len), "next_obs_len": vec(torch.int32),
            "reward": vec(torch.float32), "done": vec(torch.float32), "mc_return": vec(torch.float32),
        }
        # write pointer and fill level are host ints: they depend only on batch sizes, never on data
        self._ptr = 0
        self._size = 0
        self._num_added = 0
        # number of states left-truncated on add; kept on the device so add never syncs
        self._truncated_states = torch.zeros((), dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ size
    def __len__(self) -> int:
        return self._size

    @property
    def num_added(self) -> int:
        """Transitions added since construction (including overwritten ones)."""
        return self._num_added

    @property
    def truncated_states(self) -> Tensor:
        """0-d int64 tensor on the buffer device: states left-truncated on add so far."""
        return self._truncated_states

    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated storage."""
        return sum(t.numel() * t.element_size() for t in self._storage.values())

    def describe(self) -> str:
        return (
            f"replay: {self.capacity} × (S={self.max_state_len}, A={self.max_action_len}, "
            f"O={self.max_obs_len}) tokens, {self.nbytes / 2**20:.1f} MiB on {self.device}"
        )

    # ------------------------------------------------------------------ add
    def add(self, batch: TransitionBatch) -> None:
        """Write a batch at the write pointer, overwriting the oldest rows once full.

        If the batch is larger than the capacity only its last `capacity` rows are kept (the same
        result as writing it row by row).
        """
        batch.validate()
        n = len(batch)
        if n == 0:
            return
        dev = self.device
        state_ids, state_len = self._fit_states(batch.state_ids.to(dev), batch.state_len.to(dev))
        action_ids = self._fit_rejecting(batch.action_ids.to(dev), batch.action_len.to(dev),
                                         self.max_action_len, "action", "max_action_len")
        obs_ids = self._fit_rejecting(batch.next_obs_ids.to(dev), batch.next_obs_len.to(dev),
                                      self.max_obs_len, "next_obs", "max_obs_len")
        rows = {
            "state_ids": state_ids, "state_len": state_len,
            "action_ids": action_ids, "action_len": batch.action_len,
            "next_obs_ids": obs_ids, "next_obs_len": batch.next_obs_len,
            "reward": batch.reward, "done": batch.done, "mc_return": batch.mc_return,
        }
        keep = min(n, self.capacity)  # rows of an over-long batch that survive; avoids duplicate indices
        index = (self._ptr + (n - keep) + torch.arange(keep, device=dev)) % self.capacity  # (keep,)
        for name, dst in self._storage.items():
            src = rows[name].to(device=dev, dtype=dst.dtype)[n - keep:]
            dst.index_copy_(0, index, src)
        self._ptr = (self._ptr + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        self._num_added += n

    def _pad_to(self, ids: Tensor, lengths: Tensor, width: int) -> Tensor:
        """(B, T) → (B, width) with every position ≥ length set to pad_id (T ≤ width)."""
        ids = torch.nn.functional.pad(ids.long(), (0, width - ids.shape[1]), value=self.pad_id)
        valid = torch.arange(width, device=ids.device)[None, :] < lengths[:, None]
        return torch.where(valid, ids, self.pad_id)

    def _fit_states(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        S = self.max_state_len
        lengths = lengths.long()
        if ids.shape[1] <= S:
            return self._pad_to(ids, lengths, S), lengths
        # left-truncate: keep tokens [len − S, len) of each longer row, gathered in one call
        over = lengths > S
        self._truncated_states += over.sum()
        start = (lengths - S).clamp(min=0)  # (B,)
        src = (start[:, None] + torch.arange(S, device=ids.device)).clamp(max=ids.shape[1] - 1)  # (B, S)
        new_len = lengths.clamp(max=S)
        return self._pad_to(ids.long().gather(1, src), new_len, S), new_len

    def _fit_rejecting(self, ids: Tensor, lengths: Tensor, limit: int, what: str, arg: str) -> Tensor:
        if ids.shape[1] > limit:
            # only reached when the padded width exceeds the limit; this max() is a sync point
            longest = int(lengths.max())
            if longest > limit:
                raise ValueError(
                    f"{what} of {longest} tokens exceeds the replay buffer's {arg} ({limit}); "
                    f"raise {arg} (or shorten the generation/observation)"
                )
            ids = ids[:, :limit]
        return self._pad_to(ids, lengths.long(), limit)

    # ------------------------------------------------------------------ sample
    def sample(self, n: int, generator: torch.Generator) -> TransitionBatch:
        """`n` rows drawn uniformly with replacement from the filled part, indices from `generator`.

        The generator must live on the buffer's device (a CUDA buffer needs a CUDA generator).
        """
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer; add transitions first")
        if n <= 0:
            raise ValueError(f"sample size n ({n}) must be positive")
        if generator.device.type != self.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the replay buffer is on {self.device}; "
                f"create it with torch.Generator(device={str(self.device)!r})"
            )
        index = torch.randint(self._size, (n,), generator=generator, device=self.device)  # (n,)
        return self.gather(index)

    def gather(self, index: Tensor) -> TransitionBatch:
        """Rows at `index` (int64, on the buffer device) as a TransitionBatch with int64 ids/lengths."""
        out = {}
        for name, t in self._storage.items():
            picked = t.index_select(0, index)
            out[name] = picked.long() if t.dtype in (torch.int32, torch.int64) else picked
        return TransitionBatch(**out, pad_id=self.pad_id)

    # ------------------------------------------------------------------ checkpoint (a per-rank part)
    checkpoint_scope = "rank"

    def state_dict(self) -> dict[str, Tensor]:
        """The filled rows and the counters, as tensors only (torch.load(weights_only=True) and safetensors
        both accept it); views of the storage, not copies.

        Rows are filled from slot 0 and the write pointer only wraps once every slot is filled, so the
        filled rows are always slots [0, size): a checkpoint grows with the data, not with the capacity.
        """
        sd: dict[str, Tensor] = {name: t[: self._size] for name, t in self._storage.items()}
        sd["meta"] = torch.tensor(
            [self.capacity, self.max_state_len, self.max_action_len, self.max_obs_len, self.pad_id,
             self._ptr, self._size, self._num_added], dtype=torch.int64)
        sd["truncated_states"] = self._truncated_states.clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from `state_dict()`: the same rows at the same slots, the rest as a fresh buffer holds
        them, and the same counters, so sampling and the next `add` continue exactly."""
        missing = [name for name in (*self._storage, "meta", "truncated_states") if name not in sd]
        if missing:
            raise ValueError(f"replay state_dict lacks {', '.join(missing)}")
        counters = read_meta(sd["meta"])
        for name in ("capacity", "max_state_len", "max_action_len", "max_obs_len", "pad_id"):
            if counters[name] != getattr(self, name):
                raise ValueError(f"replay state_dict has {name}={counters[name]} but this buffer has "
                                 f"{name}={getattr(self, name)}")
        size = counters["size"]
        for name, dst in self._storage.items():
            src = sd[name]
            # a shard written before only the filled rows were saved holds all `capacity` rows
            if src.shape[1:] != dst.shape[1:] or src.shape[0] not in (size, self.capacity):
                raise ValueError(f"replay state_dict {name} has shape {tuple(src.shape)}, expected "
                                 f"{(size, *dst.shape[1:])}")
            dst[:size].copy_(src[:size].to(dst.device, dst.dtype))
            dst[size:].fill_(self.pad_id if name.endswith("_ids") else 0)
        self._ptr, self._size, self._num_added = counters["ptr"], size, counters["num_added"]
        self._truncated_states = sd["truncated_states"].to(self.device, torch.int64).clone()

    def load_resharded(self, shards: Sequence[Mapping[str, Tensor]], rank: int, world_size: int,
                       iteration: int = 0) -> int:
        """Fill this (fresh) buffer with this rank's share of the rows of every old rank's shard (a resume
        with another world size or device; see `redistribute`); returns the rows added."""
        batch = redistribute(shards, rank, world_size)
        self.add(batch)
        return len(batch)


META_FIELDS = ("capacity", "max_state_len", "max_action_len", "max_obs_len", "pad_id", "ptr", "size", "num_added")
"""Order of the int64 `meta` tensor of a replay state dict."""


def read_meta(meta: Tensor) -> dict[str, int]:
    """The counters of a replay state dict's `meta` tensor, checked for consistency (files are untrusted)."""
    if meta.shape != (len(META_FIELDS),) or meta.dtype != torch.int64:
        raise ValueError(f"replay meta has shape {tuple(meta.shape)} and dtype {meta.dtype}, expected "
                         f"({len(META_FIELDS)},) int64")
    counters = dict(zip(META_FIELDS, meta.tolist()))
    capacity, ptr, size = counters["capacity"], counters["ptr"], counters["size"]
    # before the pointer wraps it equals the fill level; after, every slot is filled
    if not (0 <= size <= capacity and 0 <= ptr < capacity and (size == capacity or ptr == size)
            and counters["num_added"] >= size):
        raise ValueError(f"replay meta is inconsistent: capacity {capacity}, write pointer {ptr}, size {size}, "
                         f"{counters['num_added']} added")
    return counters


def oldest_first_slots(ptr: int, size: int, capacity: int) -> Tensor:
    """(size,) storage slots of the filled rows, oldest first (the slot after the write pointer is the
    oldest once the buffer has wrapped)."""
    return (ptr - size + torch.arange(size)) % capacity


def redistribute(shards: Sequence[Mapping[str, Tensor]], rank: int, world_size: int) -> TransitionBatch:
    """This rank's share of the rows of `shards` (replay state dicts of the old ranks), oldest first.

    The rows of every shard are ordered oldest first and interleaved across shards by age (rows of equal
    age by old rank), then dealt out round-robin over `world_size` new ranks; adding the result to a
    buffer keeps the newest rows when they exceed its capacity. Each field of each shard is read once and
    only for the rows this rank takes, so lazy mappings (checkpoint `RankFile`s) keep one field in memory at a time.
    """
    slots, ages, shard_of, sizes, pad_id = [], [], [], [], 0
    for k, shard in enumerate(shards):
        counters = read_meta(shard["meta"])
        size, pad_id = counters["size"], counters["pad_id"]
        sizes.append((size, counters["capacity"]))
        slots.append(oldest_first_slots(counters["ptr"], size, counters["capacity"]))
        ages.append(torch.arange(size) - size)  # -size (oldest) .. -1 (newest)
        shard_of.append(torch.full((size,), k))
    slot, age, shard = torch.cat(slots), torch.cat(ages), torch.cat(shard_of)
    order = torch.argsort(age * len(shards) + shard, stable=True)  # oldest first, then by old rank
    mine = order[rank::world_size]  # (n,) indices into the pooled rows, in the order they are added
    picks = [(shard[mine] == k).nonzero().squeeze(1) for k in range(len(shards))]  # positions in `mine` per shard
    rows: dict[str, Tensor] = {}
    for name in TransitionBatch.tensor_fields():
        for k, state in enumerate(shards):
            here, (size, capacity) = picks[k], sizes[k]
            if len(here) == 0 and name in rows:  # an empty pick is read only to give the field its dtype and width
                continue
            values = state[name]
            if values.shape[0] not in (size, capacity):  # all `capacity` rows: a shard of the earlier layout
                raise ValueError(f"replay shard {k} field {name} has {values.shape[0]} rows, its meta says {size}")
            values = values.index_select(0, slot[mine[here]])
            if name not in rows:
                rows[name] = torch.empty((len(mine), *values.shape[1:]), dtype=values.dtype)
            rows[name][here] = values
    batch = {name: t.long() if name.endswith(("_ids", "_len")) else t for name, t in rows.items()}
    return TransitionBatch(**batch, pad_id=pad_id)
