"""Elite store (top fraction of all episodes so far): ranking across adds, older-wins ties, capacity
eviction by whole episodes, row order, seeded sampling, exact checkpoint restore, untrusted state dicts.

Rows are tagged: an episode with tag T and r rows has rows tagged T, T+1, …; a row tagged t has state
[t, t+1] (or [t] for odd t), action [t+2], observation [] on the last row else [t+3, t+4], reward t.
"""

import pytest
import torch
from safetensors.torch import load, save

from fastarcher.algos.elite import TopTrajectories
from fastarcher.replay import TransitionBatch

PAD = 0


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max([len(r) for r in rows] + [1])), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def episodes(*specs: tuple[int, int, float]):
    """(tag, rows, return) per episode → (batch, episode_of_row, episode_returns)."""
    tags, ep, last = [], [], []
    for e, (tag, r, _) in enumerate(specs):
        tags += [tag + i for i in range(r)]
        ep += [e] * r
        last += [i == r - 1 for i in range(r)]
    s, sl = _pad([[t, t + 1] if t % 2 == 0 else [t] for t in tags])
    a, al = _pad([[t + 2] for t in tags])
    o, ol = _pad([[] if end else [t + 3, t + 4] for t, end in zip(tags, last)])
    f = torch.tensor(tags, dtype=torch.float32)
    batch = TransitionBatch(state_ids=s, state_len=sl, action_ids=a, action_len=al, next_obs_ids=o,
                            next_obs_len=ol, reward=f, done=torch.tensor(last, dtype=torch.float32), mc_return=-f)
    return batch, torch.tensor(ep, dtype=torch.long), torch.tensor([ret for *_, ret in specs], dtype=torch.float32)


def held_tags(store: TopTrajectories) -> list[int]:
    return [int(x) for x in store.transitions().reward]


def test_top_fraction_over_all_adds():
    store = TopTrajectories(0.5, 100, pad_id=PAD)
    store.add(*episodes((10, 2, 5.0), (20, 1, 1.0)))  # seen 2, k = 1 → A (5)
    assert (held_tags(store), store.num_episodes_seen, store.num_elite_episodes) == ([10, 11], 2, 1)
    assert store.threshold == 5.0
    store.add(*episodes((30, 1, 3.0), (40, 1, 2.0)))  # seen 4, k = 2 → A (5) stays, C (3) joins
    assert (held_tags(store), store.num_elite_episodes, store.threshold) == ([10, 11, 30], 2, 3.0)
    store.add(*episodes((50, 1, 9.0), (60, 2, 8.0)))  # seen 6, k = 3 → E (9), F (8), A (5); C evicted
    assert (held_tags(store), len(store), store.num_elite_episodes) == ([10, 11, 50, 60, 61], 5, 3)
    assert store.threshold == 5.0
    assert store.dropped_for_capacity == 0


def test_evicted_episode_does_not_come_back():
    store = TopTrajectories(0.5, 100, pad_id=PAD)
    store.add(*episodes((10, 1, 1.0), (20, 1, 2.0)))  # k = 1 → B; A evicted
    store.add(*episodes((30, 1, 0.0), (40, 1, 0.0)))  # k = 2 → top set {B, A}, but A's rows are gone
    assert (held_tags(store), store.num_elite_episodes, store.threshold) == ([20], 1, 2.0)


def test_ties_prefer_the_older_episode():
    store = TopTrajectories(0.5, 100, pad_id=PAD)
    store.add(*episodes((10, 1, 3.0)))  # seen 1, k = 1
    store.add(*episodes((20, 1, 3.0)))  # seen 2, k = 1: tie at 3 → the older (10) stays
    assert held_tags(store) == [10]
    one = TopTrajectories(0.25, 100, pad_id=PAD)  # within one add: k = 1 of returns [1, 2, 2, 0] → episode 1
    one.add(*episodes((10, 1, 1.0), (20, 1, 2.0), (30, 1, 2.0), (40, 1, 0.0)))
    assert held_tags(one) == [20]


def test_capacity_drops_whole_episodes_from_the_bottom():
    store = TopTrajectories(1.0, 4, pad_id=PAD)
    store.add(*episodes((10, 2, 1.0), (20, 2, 3.0)))  # 4 rows fit
    assert held_tags(store) == [10, 11, 20, 21]
    store.add(*episodes((30, 1, 2.0)))  # 5 rows: ranking B 3, C 2, A 1 → drop A
    assert (held_tags(store), store.dropped_for_capacity, store.threshold) == ([20, 21, 30], 1, 2.0)
    store.add(*episodes((40, 1, 2.0)))  # B, C, D: 4 rows fit
    store.add(*episodes((50, 1, 2.0)))  # B, C, D, E (5 rows); E ties C and D at 2 and is newest → dropped
    assert (held_tags(store), store.dropped_for_capacity) == ([20, 21, 30, 40], 2)
    store.add(*episodes((60, 3, 10.0)))  # F 3 rows first: drop D, C (6, 5 rows > 4), then F + B = 5 > 4 → drop B
    assert (held_tags(store), store.dropped_for_capacity, store.num_elite_episodes) == ([60, 61, 62], 5, 1)
    store.add(*episodes((70, 5, 99.0)))  # alone longer than the capacity: never held, F stays
    assert (held_tags(store), store.dropped_for_capacity, store.num_episodes_seen) == ([60, 61, 62], 6, 7)


def test_transitions_order_contents_and_widths():
    store = TopTrajectories(1.0, 100, pad_id=PAD)
    store.add(*episodes((11, 1, 1.0)))  # state [11], no obs: widths grow from 1
    assert store.transitions().state_ids.tolist() == [[11]] and store.transitions().next_obs_ids.tolist() == [[PAD]]
    store.add(*episodes((20, 2, 2.0)))
    tb = store.transitions()
    assert tb.state_ids.tolist() == [[11, PAD], [20, 21], [21, PAD]]
    assert tb.state_len.tolist() == [1, 2, 1]
    assert tb.action_ids.tolist() == [[13], [22], [23]] and tb.action_len.tolist() == [1, 1, 1]
    assert tb.next_obs_ids.tolist() == [[PAD, PAD], [23, 24], [PAD, PAD]] and tb.next_obs_len.tolist() == [0, 2, 0]
    assert tb.reward.tolist() == [11.0, 20.0, 21.0] and tb.mc_return.tolist() == [-11.0, -20.0, -21.0]
    assert tb.done.tolist() == [1.0, 0.0, 1.0]
    assert all(getattr(tb, f).dtype == torch.int64 for f in ("state_ids", "state_len", "action_ids", "next_obs_len"))
    assert tb.reward.dtype == torch.float32 and tb.pad_id == PAD


def test_sample_is_seeded_and_uniform_over_held_rows():
    store = TopTrajectories(1.0, 100, pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        store.sample(2, torch.Generator().manual_seed(0))
    store.add(*episodes((10, 2, 1.0), (20, 3, 2.0)))
    a = store.sample(7, torch.Generator().manual_seed(3))
    b = store.sample(7, torch.Generator().manual_seed(3))
    index = torch.randint(5, (7,), generator=torch.Generator().manual_seed(3))
    assert a.reward.tolist() == b.reward.tolist() == [[10, 11, 20, 21, 22][i] for i in index.tolist()]
    assert torch.equal(a.state_ids, store.transitions().state_ids[index])


def _adds():
    return [episodes((10, 2, 1.0), (20, 1, 4.0), (30, 2, 2.0)), episodes((40, 3, 3.0), (50, 1, 0.5)),
            episodes((60, 1, 5.0), (70, 2, 4.0)), episodes((80, 4, 6.0))]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_state_dict_round_trip_then_identical_adds():
    adds = _adds()
    ref, first = TopTrajectories(0.5, 6, pad_id=PAD), TopTrajectories(0.5, 6, pad_id=PAD)
    for add in adds[:2]:
        ref.add(*add)
        first.add(*add)
    sd = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["meta"].tolist() == [6, PAD, 5, len(first), first.num_elite_episodes, first.dropped_for_capacity]
    restored = TopTrajectories(0.5, 6, pad_id=PAD)
    restored.load_state_dict(load(save(sd)))  # through safetensors, as the checkpointer writes it
    _assert_same(restored.state_dict(), sd)
    for add in adds[2:]:
        ref.add(*add)
        restored.add(*add)
        _assert_same(restored.state_dict(), ref.state_dict())
    assert ref.dropped_for_capacity > 0 and held_tags(restored) == held_tags(ref)  # the capacity path ran
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ref.sample(5, g1).state_ids, restored.sample(5, g2).state_ids)


def test_empty_state_dict_round_trip():
    sd = TopTrajectories(0.3, 2, pad_id=PAD).state_dict()
    store = TopTrajectories(0.3, 2, pad_id=PAD)
    store.load_state_dict(load(save(sd)))
    assert len(store) == 0 and store.threshold is None and store.num_episodes_seen == 0


def _corrupt(**edits):
    store = TopTrajectories(0.5, 6, pad_id=PAD)
    for add in _adds()[:2]:
        store.add(*add)
    sd = {k: v.clone() for k, v in store.state_dict().items()}
    for k, fn in edits.items():
        sd[k] = fn(sd[k])
    return sd


def _meta(i, value):
    def edit(m):
        m[i] = value
        return m
    return edit


@pytest.mark.parametrize("edits, field", [
    (dict(meta=lambda m: m[:-1]), "meta"),
    (dict(meta=lambda m: m.to(torch.int32)), "meta"),
    (dict(meta=_meta(0, 7)), "capacity"),
    (dict(meta=_meta(1, 3)), "pad_id"),
    (dict(meta=_meta(4, 99)), "meta"),
    (dict(meta=_meta(3, -1)), "meta"),
    (dict(fraction=lambda f: f * 0 + 0.25), "fraction"),
    (dict(returns=lambda r: r[:-1]), "returns"),
    (dict(returns=lambda r: r.float()), "returns"),
    (dict(returns=lambda r: r.fill_(float("nan"))), "returns"),
    (dict(held=lambda h: ~h), "held"),
    (dict(episode=lambda e: e.flip(0)), "episode"),
    (dict(episode=lambda e: e + 1), "episode"),
    (dict(state_ids=lambda t: t[:, None]), "state_ids"),
    (dict(state_ids=lambda t: t[1:]), "state_ids"),
    (dict(action_ids=lambda t: t.long()), "action_ids"),
    (dict(reward=lambda t: t[:-1]), "reward"),
    (dict(state_len=lambda t: t + 5), "state_len"),
    (dict(next_obs_ids=lambda t: t.fill_(9)), "next_obs"),
    (dict(done=lambda t: "x"), "done"),
])
def test_corrupted_state_dict_raises_naming_the_field(edits, field):
    store = TopTrajectories(0.5, 6, pad_id=PAD)
    with pytest.raises(ValueError, match=field):
        store.load_state_dict(_corrupt(**edits))
    assert len(store) == 0 and store.num_episodes_seen == 0  # nothing restored


def test_missing_key_raises():
    sd = _corrupt()
    del sd["held"]
    with pytest.raises(ValueError, match="held"):
        TopTrajectories(0.5, 6, pad_id=PAD).load_state_dict(sd)


def test_validation_of_arguments_and_adds():
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="fraction"):
            TopTrajectories(bad, 4, pad_id=PAD)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="capacity"):
            TopTrajectories(0.5, bad, pad_id=PAD)
    store = TopTrajectories(0.5, 4, pad_id=PAD)
    batch, ep, ret = episodes((10, 2, 1.0), (20, 1, 2.0))
    for bad_ep in (torch.tensor([0, 2, 1]), torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0]), ep.int(), ep[:2]):
        with pytest.raises(ValueError, match="episode_of_row"):
            store.add(batch, bad_ep, ret)
    with pytest.raises(ValueError, match="finite"):
        store.add(batch, ep, torch.tensor([1.0, float("nan")]))
    bad_len = TransitionBatch(**{f: getattr(batch, f) for f in TransitionBatch.tensor_fields()})
    bad_len.state_len = bad_len.state_len + 9
    with pytest.raises(ValueError, match="state_len"):
        store.add(bad_len, ep, ret)
    assert store.num_episodes_seen == 0 and len(store) == 0  # failed adds change nothing
    store.add(*episodes())  # an empty add is a no-op
    assert store.num_episodes_seen == 0
