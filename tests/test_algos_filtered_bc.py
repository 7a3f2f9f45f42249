"""Filtered BC: top-fraction selection with deterministic ties, masked mean NLL; hand-computed values."""
import pytest
import torch

from fastarcher.algos import ALGORITHMS
from fastarcher.algos.filtered_bc import bc_loss, filter_top_fraction

t = torch.tensor


def test_filter_top_fraction_keeps_best_rows():
    # k = ceil(0.5 · 4) = 2 → the rows with returns 5 and 3
    assert filter_top_fraction(t([1.0, 5.0, 3.0, -2.0]), 0.5).tolist() == [False, True, True, False]
    assert filter_top_fraction(t([1.0, 5.0, 3.0]), 1.0).all()
    # k = ceil(0.1 · 3) = 1
    assert filter_top_fraction(t([1.0, 5.0, 3.0]), 0.1).tolist() == [False, True, False]


def test_filter_top_fraction_ties_prefer_earlier_rows():
    # returns [1, 2, 2, 1, 2], k = 2 among three tied 2s → rows 1 and 2 (earliest)
    assert filter_top_fraction(t([1.0, 2.0, 2.0, 1.0, 2.0]), 0.4).tolist() == [False, True, True, False, False]
    # k = 3 at a tie on 1 → the three 2s... then no 1 ; k = 4 → the first 1 (row 0)
    assert filter_top_fraction(t([1.0, 2.0, 2.0, 1.0, 2.0]), 0.8).tolist() == [True, True, True, False, True]


def test_filter_top_fraction_rounding_and_validation():
    assert int(filter_top_fraction(torch.arange(10.0), 0.3).sum()) == 3  # 0.3·10 is 3.0000000000000004
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            filter_top_fraction(t([1.0]), bad)


def test_bc_loss_hand_computed():
    # Σ log π [-1, -2, -3], keep rows 0 and 2: NLL = (1 + 3)/2 = 2 ; ∂/∂lp = −mask/2
    lp = t([-1.0, -2.0, -3.0], requires_grad=True)
    loss, m = bc_loss(logprob_sum=lp, mask=t([True, False, True]))
    torch.testing.assert_close(loss, t(2.0))
    torch.testing.assert_close(m["actor/kept_fraction"], t(2 / 3))
    loss.backward()
    torch.testing.assert_close(lp.grad, t([-0.5, 0.0, -0.5]))


def test_bc_loss_with_no_kept_rows_is_zero_and_differentiable():
    lp = t([-1.0, -2.0], requires_grad=True)
    loss, _ = bc_loss(logprob_sum=lp, mask=t([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert lp.grad.tolist() == [0.0, 0.0]


def test_bc_loss_gradcheck_float64():
    lp = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mask = t([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda x: bc_loss(logprob_sum=x, mask=mask)[0], (lp,))


def test_algorithm_names_agree_across_the_flag_type_and_the_registry():
    from typing import get_args

    from fastarcher.algos.registry import REGISTRY
    from fastarcher.config import Algo

    assert ALGORITHMS == ("archer", "chai", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo", "filtered_bc", "sft")
    assert set(get_args(Algo)) == set(ALGORITHMS) == set(REGISTRY) | {"sft"}
