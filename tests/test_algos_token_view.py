"""Per-turn ⇄ per-episode token rows (fastarcher.algos.token_view) against hand-written layouts."""
import pytest
import torch

from fastarcher.algos.estimators import discounted_returns
from fastarcher.algos.token_view import broadcast_turns, episode_layout, pack, turn_end_rewards, unpack

t = torch.tensor

# Hand case: 2 episodes (3 turns, 1 turn), width A = 4, scored lengths 2, 1, 3 | 2.
# Episode 0: [t0 t0 | sep | t1 | sep | t2 t2 t2]  (length 8);  episode 1: [t3 t3 | pad × 6];  T = 8.
SCORED = t([2, 1, 3, 2])
TPE = [3, 1]
A = 4
MASK = t([[1, 1, 0, 1, 0, 1, 1, 1],
          [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
TURN_MASK = t([[1, 1, 0, 0],
               [1, 0, 0, 0],
               [1, 1, 1, 0],
               [1, 1, 0, 0]], dtype=torch.float32)
X = torch.arange(1.0, 17.0).view(4, 4)  # rows [1..4], [5..8], [9..12], [13..16]
PACKED = t([[1.0, 2, 0, 5, 0, 9, 10, 11],
            [13.0, 14, 0, 0, 0, 0, 0, 0]])


def _layout():
    return episode_layout(SCORED, A, TPE)


def test_layout_mask_and_fields():
    lay = _layout()
    assert torch.equal(lay.mask, MASK)
    assert lay.num_turns == 4 and lay.width == 4
    assert lay.index.shape == (2, 8) and lay.inverse.shape == (4, 4)
    assert torch.equal(lay.index[0, :4], t([0, 1, 16, 4]))  # flat source positions, N·A = 16 elsewhere


def test_pack_and_unpack_roundtrip():
    lay = _layout()
    assert torch.equal(pack(lay, X), PACKED)
    assert torch.equal(unpack(lay, pack(lay, X)), X * TURN_MASK)
    y = torch.arange(100.0, 116.0).view(2, 8)  # values on separators/padding must be ignored
    assert torch.equal(unpack(lay, y), t([[100.0, 101, 0, 0], [103, 0, 0, 0],
                                          [105, 106, 107, 0], [108, 109, 0, 0]]))
    assert pack(lay, X.double()).dtype == torch.float64


def test_pack_unpack_gradients():
    lay = _layout()
    x = X.clone().requires_grad_(True)
    pack(lay, x).sum().backward()
    assert torch.equal(x.grad, TURN_MASK)
    y = torch.zeros(2, 8, requires_grad=True)
    unpack(lay, y).sum().backward()
    assert torch.equal(y.grad, MASK)


def test_turn_end_rewards_placement():
    lay = _layout()
    r = turn_end_rewards(lay, t([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(r, t([[0.0, 1, 0, 2, 0, 0, 0, 3], [0.0, 4, 0, 0, 0, 0, 0, 0]]))
    rr = t([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    turn_end_rewards(lay, rr).sum().backward()
    assert torch.equal(rr.grad, torch.ones(4))


def test_terminal_reward_discounts_over_action_tokens_only():
    lay = _layout()
    R, gamma = 2.0, 0.9
    rewards = turn_end_rewards(lay, t([0.0, 0.0, R, 0.0]))
    g = discounted_returns(rewards, lay.mask, gamma)
    # episode 0 action tokens at 0, 1, 3, 5, 6, 7: token 0 has 5 later action tokens (separators don't count)
    exp = R * t([gamma ** 5, gamma ** 4, 0, gamma ** 3, 0, gamma ** 2, gamma, 1.0])
    assert torch.allclose(g[0], exp)
    assert torch.allclose(g[0, 0], t(R * gamma ** 5)) and not torch.allclose(g[0, 0], t(R * gamma ** 7))
    assert torch.equal(g[1], torch.zeros(8))
    g1 = discounted_returns(rewards, lay.mask, 1.0)
    assert torch.equal(g1[0], R * MASK[0])
    # back to per-turn rows: every scored token of turn 0 sees the terminal reward
    assert torch.allclose(unpack(lay, g)[0], t([R * gamma ** 5, R * gamma ** 4, 0.0, 0.0]))


def test_empty_turns_keep_separators_and_route_rewards():
    # ep 0 turns [0, 2, 0, 1] scored: [sep | t1 t1 | sep | sep | t3]   (t1 and t3 stay distinct runs)
    # ep 1 turns [0, 1]:              [sep | t5]
    # ep 2 turns [0]:                 []  -> all padding
    lay = episode_layout(t([0, 2, 0, 1, 0, 1, 0]), 2, [4, 2, 1])
    assert torch.equal(lay.mask, t([[0.0, 1, 1, 0, 0, 1], [0.0, 1, 0, 0, 0, 0], [0.0] * 6]))
    r = turn_end_rewards(lay, t([1.0, 2, 4, 8, 16, 32, 64]))
    # t0 (no earlier turn) -> next non-empty t1's end; t2 -> previous t1's end; t4 -> t5; t6 dropped
    assert torch.equal(r, t([[0.0, 0, 7, 0, 0, 8], [0.0, 48, 0, 0, 0, 0], [0.0] * 6]))
    x = torch.arange(1.0, 15.0).view(7, 2)
    assert torch.equal(pack(lay, x), t([[0.0, 3, 4, 0, 0, 7], [0.0, 11, 0, 0, 0, 0], [0.0] * 6]))


def test_all_empty_has_width_one():
    lay = episode_layout(t([0, 0]), 3, [1, 1])
    assert torch.equal(lay.mask, torch.zeros(2, 1))
    assert torch.equal(turn_end_rewards(lay, t([1.0, 2.0])), torch.zeros(2, 1))
    assert torch.equal(unpack(lay, torch.ones(2, 1)), torch.zeros(2, 3))


def test_broadcast_turns():
    out = broadcast_turns(t([1.5, -2.0, 3.0, 4.0]), TURN_MASK)
    assert torch.equal(out, t([1.5, -2.0, 3.0, 4.0])[:, None] * TURN_MASK)
    x = torch.ones(4, requires_grad=True)
    broadcast_turns(x, TURN_MASK).sum().backward()
    assert torch.equal(x.grad, TURN_MASK.sum(1))
    with pytest.raises(ValueError):
        broadcast_turns(torch.ones(3), TURN_MASK)


@pytest.mark.parametrize("scored,width,tpe", [
    (t([2, 1, 3, 2]), 4, [3, 2]),  # sum(turns_per_episode) != N
    (t([2, 1, 5, 2]), 4, [3, 1]),  # scored_len > width
    (t([2, -1, 3, 2]), 4, [3, 1]),  # negative
    (t([2, 1, 3, 2]), 4, [4, 0]),  # empty episode
    (t([2.0, 1, 3, 2]), 4, [3, 1]),  # float lengths
    (t([[2, 1, 3, 2]]), 4, [3, 1]),  # not 1-D
])
def test_bad_layout_inputs(scored, width, tpe):
    with pytest.raises(ValueError):
        episode_layout(scored, width, tpe)


def test_bad_shapes():
    lay = _layout()
    with pytest.raises(ValueError):
        pack(lay, torch.zeros(4, 5))
    with pytest.raises(ValueError):
        unpack(lay, torch.zeros(2, 7))
    with pytest.raises(ValueError):
        turn_end_rewards(lay, torch.zeros(3))
