"""Replay buffer: circular writes, uniform seeded sampling, s' construction, truncation, exact restore.

Reference for s' = s ⊕ a ⊕ o: a per-row Python concatenation of the real tokens (`_next_state_reference`).
"""
import io
import random

import pytest
import torch

from fastarcher.replay import ReplayBuffer, TransitionBatch, concat_segments

PAD = 0


def _pad_rows(rows: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [1]) if width is None else width
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):  # test helper only; the buffer itself has no per-row loop
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def make_batch(states, actions, obs, reward=None, done=None, mc_return=None) -> TransitionBatch:
    n = len(states)
    s, sl = _pad_rows(states)
    a, al = _pad_rows(actions)
    o, ol = _pad_rows(obs)
    reward = torch.arange(n, dtype=torch.float32) if reward is None else torch.as_tensor(reward, dtype=torch.float32)
    done = torch.zeros(n) if done is None else torch.as_tensor(done, dtype=torch.float32)
    mc = -reward if mc_return is None else torch.as_tensor(mc_return, dtype=torch.float32)
    return TransitionBatch(state_ids=s, state_len=sl, action_ids=a, action_len=al, next_obs_ids=o,
                           next_obs_len=ol, reward=reward, done=done, mc_return=mc)


def tagged_batch(tags: list[int]) -> TransitionBatch:
    """Rows whose reward equals their tag, with short distinct token rows."""
    return make_batch(
        states=[[t + 1, t + 2] for t in tags], actions=[[t + 3] for t in tags],
        obs=[[t + 4, t + 5, t + 6] for t in tags], reward=[float(t) for t in tags],
    )


def stored(buf: ReplayBuffer) -> TransitionBatch:
    return buf.gather(torch.arange(len(buf)))


def random_batch(rng: random.Random, n: int, s_max: int, a_max: int, o_max: int, vocab: int = 50) -> TransitionBatch:
    def rows(lo, hi):
        return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return make_batch(rows(0, s_max), rows(1, a_max), rows(0, o_max),
                      reward=[rng.uniform(-1, 1) for _ in range(n)], done=[float(rng.random() < 0.3) for _ in range(n)],
                      mc_return=[rng.uniform(-5, 0) for _ in range(n)])


@pytest.mark.parametrize("kwargs, name", [
    (dict(capacity=0), "capacity"), (dict(capacity=-5), "capacity"), (dict(max_state_len=0), "max_state_len"),
    (dict(max_action_len=-1), "max_action_len"), (dict(max_obs_len=0), "max_obs_len"), (dict(pad_id=-1), "pad_id"),
])
def test_replay_constructor_rejects_bad_args_naming_them(kwargs, name):
    args = dict(capacity=4, max_state_len=8, max_action_len=4, max_obs_len=4, pad_id=PAD) | kwargs
    pad_id = args.pop("pad_id")
    with pytest.raises(ValueError, match=name):
        ReplayBuffer(**args, pad_id=pad_id)


def test_replay_circular_overwrite_order():
    buf = ReplayBuffer(4, 8, 4, 4, pad_id=PAD)
    buf.add(tagged_batch([0, 1, 2]))
    assert len(buf) == 3
    buf.add(tagged_batch([3, 4, 5]))
    # slots 0,1,2 ← 0,1,2 ; slot 3 ← 3 ; then wrap: slot 0 ← 4, slot 1 ← 5
    assert len(buf) == 4 and buf.num_added == 6
    assert stored(buf).reward.tolist() == [4.0, 5.0, 2.0, 3.0]
    assert stored(buf).state_ids[:, :2].tolist() == [[5, 6], [6, 7], [3, 4], [4, 5]]
    buf.add(tagged_batch([6]))  # pointer was at slot 2
    assert stored(buf).reward.tolist() == [4.0, 5.0, 6.0, 3.0]


def test_replay_batch_larger_than_capacity_keeps_last_rows_like_row_by_row_writes():
    buf = ReplayBuffer(3, 8, 4, 4, pad_id=PAD)
    buf.add(tagged_batch([0, 1, 2, 3, 4]))
    # row by row: 0→s0, 1→s1, 2→s2, 3→s0, 4→s1 ; pointer ends at slot 2
    assert stored(buf).reward.tolist() == [3.0, 4.0, 2.0]
    buf.add(tagged_batch([9]))
    assert stored(buf).reward.tolist() == [3.0, 4.0, 9.0]


def test_replay_stores_fields_and_returns_int64_right_padded():
    buf = ReplayBuffer(4, 6, 3, 5, pad_id=PAD)
    b = make_batch([[7, 8, 9], [5]], [[11, 12], [13]], [[], [21, 22]], reward=[0.5, -1.0], done=[0, 1], mc_return=[2.0, 3.0])
    buf.add(b)
    out = stored(buf)
    assert out.state_ids.dtype == torch.int64 and out.state_len.dtype == torch.int64
    assert out.state_ids.tolist() == [[7, 8, 9, 0, 0, 0], [5, 0, 0, 0, 0, 0]]
    assert out.action_ids.tolist() == [[11, 12, 0], [13, 0, 0]]
    assert out.next_obs_ids.tolist() == [[0, 0, 0, 0, 0], [21, 22, 0, 0, 0]]
    assert out.state_len.tolist() == [3, 1] and out.action_len.tolist() == [2, 1] and out.next_obs_len.tolist() == [0, 2]
    assert out.reward.tolist() == [0.5, -1.0] and out.done.tolist() == [0.0, 1.0] and out.mc_return.tolist() == [2.0, 3.0]
    assert out.pad_id == PAD


def test_replay_overwrites_tokens_beyond_length_with_pad():
    buf = ReplayBuffer(2, 4, 3, 3, pad_id=PAD)
    b = make_batch([[1, 2, 3]], [[4, 5]], [[6]])
    b.state_len = torch.tensor([1])  # tokens 2, 3 lie past the row's length
    buf.add(b)
    assert stored(buf).state_ids.tolist() == [[1, 0, 0, 0]]


def test_replay_left_truncates_long_states_and_counts_them():
    buf = ReplayBuffer(4, 3, 2, 2, pad_id=PAD)
    buf.add(make_batch([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]], [[1]] * 3, [[2]] * 3))
    out = stored(buf)
    assert out.state_ids.tolist() == [[3, 4, 5], [6, 7, 0], [9, 10, 11]]  # last tokens kept
    assert out.state_len.tolist() == [3, 2, 3]
    assert int(buf.truncated_states) == 2


def test_replay_rejects_long_actions_and_observations_naming_the_limit():
    buf = ReplayBuffer(4, 8, 2, 2, pad_id=PAD)
    with pytest.raises(ValueError, match=r"max_action_len \(2\)"):
        buf.add(make_batch([[1]], [[1, 2, 3]], [[1]]))
    with pytest.raises(ValueError, match=r"max_obs_len \(2\)"):
        buf.add(make_batch([[1]], [[1]], [[1, 2, 3]]))
    assert len(buf) == 0
    # a wider padded tensor whose real lengths fit is accepted
    b = make_batch([[1]], [[4, 5]], [[6]])
    b.action_ids = torch.nn.functional.pad(b.action_ids, (0, 5), value=PAD)
    buf.add(b)
    assert stored(buf).action_ids.tolist() == [[4, 5]]


def test_replay_rejects_inconsistent_batch_sizes():
    buf = ReplayBuffer(4, 8, 2, 2, pad_id=PAD)
    b = make_batch([[1], [2]], [[1], [2]], [[1], [2]])
    b.reward = torch.zeros(3)
    with pytest.raises(ValueError, match="reward"):
        buf.add(b)


def test_replay_sample_draws_only_from_filled_part_and_rejects_empty():
    buf = ReplayBuffer(10, 4, 2, 4, pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(3, torch.Generator().manual_seed(0))
    buf.add(tagged_batch([0, 1, 2, 3]))
    tags = buf.sample(500, torch.Generator().manual_seed(0)).reward
    assert set(tags.tolist()) == {0.0, 1.0, 2.0, 3.0}


def test_replay_sampling_is_uniform_chi_square():
    torch.manual_seed(0)
    n_slots, n = 10, 20_000
    buf = ReplayBuffer(n_slots, 4, 2, 4, pad_id=PAD)
    buf.add(tagged_batch(list(range(n_slots))))
    tags = buf.sample(n, torch.Generator().manual_seed(1234)).reward.long()
    counts = torch.bincount(tags, minlength=n_slots).double()
    expected = n / n_slots
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 9 degrees of freedom: the 99.9 % quantile is 27.9; a biased sampler (e.g. one slot never drawn) is >> 2000
    assert chi2 < 27.9, (chi2, counts)


def test_replay_sampling_is_determined_by_generator_seed():
    rng = random.Random(0)
    buf = ReplayBuffer(64, 8, 3, 4, pad_id=PAD)
    buf.add(random_batch(rng, 50, 8, 3, 4))
    a = buf.sample(32, torch.Generator().manual_seed(7))
    b = buf.sample(32, torch.Generator().manual_seed(7))
    c = buf.sample(32, torch.Generator().manual_seed(8))
    for name in TransitionBatch.tensor_fields():
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.reward, c.reward)


def _next_state_reference(batch: TransitionBatch, max_len: int) -> list[list[int]]:
    out = []
    for i in range(len(batch)):
        row = (batch.state_ids[i, : batch.state_len[i]].tolist() + batch.action_ids[i, : batch.action_len[i]].tolist()
               + batch.next_obs_ids[i, : batch.next_obs_len[i]].tolist())
        out.append(row[-max_len:] if len(row) > max_len else row)
    return out


@pytest.mark.parametrize("max_len", [1, 5, 9, 100])
def test_next_state_matches_per_row_reference(max_len):
    rng = random.Random(max_len)
    batch = random_batch(rng, 40, 7, 3, 4)
    ids, lengths = batch.next_state(max_len)
    ref = _next_state_reference(batch, max_len)
    assert ids.shape == (40, min(7 + 3 + 4, max_len))
    assert lengths.tolist() == [len(r) for r in ref]
    for i, r in enumerate(ref):
        assert ids[i].tolist() == r + [PAD] * (ids.shape[1] - len(r)), i


@pytest.mark.parametrize("case", range(60))
def test_concat_segments_matches_per_row_reference_with_empty_segments(case):
    """Any number of segments, empty rows and zero-width segments, int32 or int64 ids, any max_len."""
    rng = random.Random(1000 + case)
    n, k = rng.randint(1, 9), rng.randint(1, 4)
    widths = [rng.choice([0, 1, 2, 5]) for _ in range(k)]
    segments, rows = [], [[] for _ in range(n)]
    for w in widths:
        lengths = [rng.randint(0, w) for _ in range(n)]
        ids = torch.full((n, w), 7, dtype=rng.choice([torch.int32, torch.int64]))  # 7: padding the output must not show
        for i, length in enumerate(lengths):
            real = [rng.randrange(10, 60) for _ in range(length)]
            ids[i, :length] = torch.tensor(real, dtype=ids.dtype)
            rows[i] += real
        segments.append((ids, torch.tensor(lengths, dtype=torch.int32)))
    max_len = rng.randint(1, sum(widths) + 2)
    out, lengths = concat_segments(segments, max_len=max_len, pad_id=PAD)
    assert out.dtype == torch.int64 and out.shape == (n, min(sum(widths), max_len))
    for i, row in enumerate(rows):
        want = row[-max_len:]
        assert lengths[i].item() == len(want)
        assert out[i].tolist() == want + [PAD] * (out.shape[1] - len(want)), (case, i)


@pytest.mark.parametrize("max_len", [1, 6, 11, 100])
def test_next_state_of_whole_batch_sliced_equals_next_state_of_trimmed_rows(max_len):
    """The critic phase rebuilds s' once for all its rows and cuts each micro-batch's rows to its width."""
    rng = random.Random(max_len)
    batch = random_batch(rng, 64, 9, 3, 5)
    all_ids, all_len = batch.next_state(max_len)
    for lo in range(0, 64, 8):
        rows = slice(lo, lo + 8)
        mb = batch.select(rows).trimmed()
        ids, lengths = mb.next_state(max_len)
        assert torch.equal(all_ids[rows, :mb.next_state_width(max_len)], ids)
        assert torch.equal(all_len[rows], lengths)


def test_next_state_of_sampled_batch_uses_buffer_pad_id():
    buf = ReplayBuffer(4, 5, 2, 3, pad_id=99)
    buf.add(make_batch([[1, 2]], [[3]], [[4]]))
    ids, lengths = buf.sample(1, torch.Generator().manual_seed(0)).next_state(12)
    assert ids.tolist() == [[1, 2, 3, 4] + [99] * 6] and lengths.tolist() == [4]


def _fill(buf: ReplayBuffer, seed: int):
    rng = random.Random(seed)
    for n in (7, 5, 9):
        buf.add(random_batch(rng, n, 12, 3, 4))


def test_replay_state_dict_round_trip_is_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    buf = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
    _fill(buf, 0)
    sd = buf.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    f = io.BytesIO()
    torch.save(sd, f)
    f.seek(0)
    restored_pt = torch.load(f, weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "replay.safetensors"))
    restored_st = load_file(str(tmp_path / "replay.safetensors"))
    for restored in (restored_pt, restored_st):
        other = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
        other.load_state_dict(restored)
        assert len(other) == len(buf) and other.num_added == buf.num_added
        assert int(other.truncated_states) == int(buf.truncated_states) > 0
        x = buf.sample(64, torch.Generator().manual_seed(3))
        y = other.sample(64, torch.Generator().manual_seed(3))
        for name in TransitionBatch.tensor_fields():
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        # the write pointer is restored too: the next add lands in the same slot
        extra = tagged_batch([100, 101])
        b2 = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
        b2.load_state_dict(buf.state_dict())
        b2.add(extra)
        other.add(extra)
        assert torch.equal(stored(b2).reward, stored(other).reward)
        assert not torch.equal(stored(b2).reward, stored(buf).reward)


def test_replay_load_state_dict_rejects_other_shapes():
    buf = ReplayBuffer(8, 10, 3, 4, pad_id=PAD)
    with pytest.raises(ValueError, match="max_state_len"):
        ReplayBuffer(8, 12, 3, 4, pad_id=PAD).load_state_dict(buf.state_dict())


def test_replay_nbytes_and_describe():
    buf = ReplayBuffer(1000, 512, 16, 64, pad_id=PAD)
    # int32 ids: 1000 × (512+16+64) × 4 ; three int32 lengths and three float32 scalars per row
    assert buf.nbytes == 1000 * (512 + 16 + 64) * 4 + 1000 * 6 * 4
    assert buf.describe() == f"replay: 1000 × (S=512, A=16, O=64) tokens, {buf.nbytes / 2**20:.1f} MiB on cpu"


def test_transition_batch_trimmed_and_to():
    buf = ReplayBuffer(4, 10, 5, 6, pad_id=PAD)
    buf.add(make_batch([[1, 2], [3, 4, 5]], [[6], [6]], [[7, 8], []]))
    full = stored(buf)
    t = full.trimmed()
    assert t.state_ids.shape == (2, 3) and t.action_ids.shape == (2, 1) and t.next_obs_ids.shape == (2, 2)
    assert torch.equal(t.next_state(20)[0], full.next_state(20)[0][:, :6])
    moved = t.to("cpu")
    assert moved.pad_id == t.pad_id and torch.equal(moved.state_ids, t.state_ids)


def _every_slot(buf: ReplayBuffer) -> TransitionBatch:
    """All `capacity` rows, filled or not: the whole preallocated storage."""
    return buf.gather(torch.arange(buf.capacity))


@pytest.mark.parametrize("rows_added", [11, 21], ids=["not_wrapped", "wrapped"])
def test_replay_shard_holds_only_filled_rows_and_restores_exactly(tmp_path, rows_added):
    from fastarcher.checkpoint import load_rank_file, save_rank_file

    buf = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
    rng = random.Random(rows_added)
    for n in (rows_added // 2, rows_added - rows_added // 2):
        buf.add(random_batch(rng, n, 12, 3, 4))
    assert len(buf) == min(rows_added, 16)
    assert all(v.shape[0] == len(buf) for k, v in buf.state_dict().items() if k in TransitionBatch.tensor_fields())
    save_rank_file(buf.state_dict(), tmp_path / "shard.safetensors")
    other = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
    other.add(tagged_batch(list(range(14))))  # stale rows: a restore must replace all of them
    other.load_state_dict(load_rank_file(tmp_path / "shard.safetensors"))
    assert (len(other), other.num_added, int(other.truncated_states)) == (len(buf), buf.num_added,
                                                                           int(buf.truncated_states))
    for name in TransitionBatch.tensor_fields():  # the same rows at the same slots, padding included
        assert torch.equal(getattr(_every_slot(buf), name), getattr(_every_slot(other), name)), name
    x, y = buf.sample(64, torch.Generator().manual_seed(5)), other.sample(64, torch.Generator().manual_seed(5))
    for name in TransitionBatch.tensor_fields():
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    extra = tagged_batch([100, 101, 102])  # the write pointer is restored: the next add lands in the same slots
    buf.add(extra)
    other.add(extra)
    assert torch.equal(_every_slot(buf).reward, _every_slot(other).reward)


def test_replay_shard_size_follows_filled_rows_not_capacity(tmp_path):
    from fastarcher.checkpoint import save_rank_file

    def size(capacity: int, rows: int) -> int:
        buf = ReplayBuffer(capacity, 32, 4, 8, pad_id=PAD)
        buf.add(tagged_batch(list(range(rows))))
        path = tmp_path / f"{capacity}_{rows}.safetensors"
        save_rank_file(buf.state_dict(), path)
        return path.stat().st_size

    assert size(4096, 8) == size(16, 8)
    row_bytes = (32 + 4 + 8) * 4 + 6 * 4  # int32 ids, three int32 lengths, three float32 scalars
    assert 0 <= size(4096, 16) - size(4096, 8) - 8 * row_bytes < 64  # the header's offsets gain a few digits
    assert size(4096, 8) < 8 * row_bytes + 2048  # the header and counters are small


def test_replay_shard_bytes_depend_only_on_the_state(tmp_path):
    from fastarcher.checkpoint import save_rank_file

    def build() -> ReplayBuffer:
        buf = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
        _fill(buf, 0)
        return buf

    first, second = build(), build()
    blobs = set()
    for k, buf in enumerate([first, second] * 4):  # several saves: a hash-ordered header would differ
        path = tmp_path / f"shard_{k}.safetensors"
        save_rank_file(buf.state_dict(), path)
        blobs.add(path.read_bytes())
    assert len(blobs) == 1


def test_replay_loads_a_state_dict_that_holds_every_slot(tmp_path):
    # checkpoints written before only the filled rows were saved hold all `capacity` rows
    buf = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
    buf.add(tagged_batch(list(range(6))))
    every = _every_slot(buf)
    sd = {name: getattr(every, name) for name in TransitionBatch.tensor_fields()}
    sd.update(meta=buf.state_dict()["meta"], truncated_states=buf.truncated_states)
    other = ReplayBuffer(16, 10, 3, 4, pad_id=PAD)
    other.load_state_dict(sd)
    assert len(other) == 6 and torch.equal(_every_slot(other).state_ids, every.state_ids)


def test_redistribute_pools_state_dicts_oldest_first_and_deals_them_round_robin():
    from fastarcher.replay import redistribute

    wrapped, partial = ReplayBuffer(4, 8, 4, 4, pad_id=PAD), ReplayBuffer(4, 8, 4, 4, pad_id=PAD)
    wrapped.add(tagged_batch([0, 1, 2]))
    wrapped.add(tagged_batch([3, 4, 5]))  # keeps 2..5; the oldest, 2, sits at slot 2
    partial.add(tagged_batch([10, 11]))
    shards = [wrapped.state_dict(), partial.state_dict()]
    # ages (rows before the newest): 2→4, 3→3, 4→2, 10→2, 5→1, 11→1; equal ages by old rank
    assert redistribute(shards, 0, 1).reward.tolist() == [2, 3, 4, 10, 5, 11]
    assert redistribute(shards, 1, 2).reward.tolist() == [3, 10, 11]
    assert len(redistribute(shards[1:], 2, 3)) == 0  # 2 rows over 3 ranks: the last gets none
    partial_sd = partial.state_dict()
    partial_sd["reward"] = partial_sd["reward"][:1]  # an untrusted file whose rows disagree with its counters
    with pytest.raises(ValueError, match="replay shard 1 field reward has 1 rows, its meta says 2"):
        redistribute([shards[0], partial_sd], 0, 1)
