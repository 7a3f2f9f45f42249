"""Learning-rate multiplier schedules against hand-computed values, and LambdaLR save/restore."""
import copy
import json
import math

import pytest
import torch

from fastarcher.schedule import lr_multiplier, scheduler

# total 10, warm-up 2, floor 0.1: warm-up steps 0, 1 → (0+1)/2 = 0.5, (1+1)/2 = 1.0; the decay spans
# steps 2..10 (8 steps), u = (step − 2)/8
COMMON = dict(total_steps=10, warmup_steps=2, min_ratio=0.1)
COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))  # ½(1 + 0.70711) = 0.85355


@pytest.mark.parametrize("kind, expected", [
    ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 9: 1.0, 10: 1.0, 50: 1.0}),
    # m + (1 − m)(1 − u): step 6 → u = .5 → .1 + .9·.5 = .55 ; step 8 → u = .75 → .1 + .9·.25 = .325
    ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.55, 8: 0.325, 10: 0.1, 25: 0.1}),
    # m + (1 − m)·½(1 + cos πu): step 4 → u = .25 → .1 + .9·.85355 = .86820 ; step 6 → .1 + .9·.5 = .55
    ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.9 * COS_QUARTER, 6: 0.55, 10: 0.1, 99: 0.1}),
])
def test_lr_multiplier_hand_values_with_warmup(kind, expected):
    got = {step: lr_multiplier(step, kind=kind, **COMMON) for step in expected}
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_lr_multiplier_without_warmup_and_with_warmup_equal_to_total():
    # linear over 4 steps to 0: 1, .75, .5, .25, then 0
    assert [lr_multiplier(s, total_steps=4, kind="linear") for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    # cosine over 2 steps: 1, ½(1 + cos π/2) = .5, then the floor
    assert [lr_multiplier(s, total_steps=2, kind="cosine", min_ratio=0.2) for s in range(3)] == pytest.approx(
        [1.0, 0.2 + 0.8 * 0.5, 0.2])
    # warm-up fills the whole run: 1/3, 2/3, 1, then the floor (empty decay span)
    assert [lr_multiplier(s, total_steps=3, warmup_steps=3, kind="linear", min_ratio=0.3)
            for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.3, 0.3])
    assert lr_multiplier(0, total_steps=1) == 1.0


def test_lr_multiplier_is_monotone_after_warmup():
    for kind in ("linear", "cosine"):
        values = [lr_multiplier(s, total_steps=50, warmup_steps=5, kind=kind, min_ratio=0.05) for s in range(5, 60)]
        assert all(a >= b for a, b in zip(values, values[1:])), kind
        assert values[0] == 1.0 and values[-1] == 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=True), "total_steps"),
    (dict(total_steps=10.0), "total_steps"),
    (dict(total_steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(total_steps=10, kind="exponential"), "cosine"),
    (dict(total_steps=10, kind="linear", min_ratio=1.5), "min_ratio"),
    (dict(total_steps=10, kind="linear", min_ratio=-0.1), "min_ratio"),
    (dict(total_steps=10, kind="linear", min_ratio=float("nan")), "min_ratio"),
    (dict(total_steps=10, kind="linear", min_ratio="0.1"), "min_ratio"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, **kwargs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):  # checked when the scheduler is built, not at its first use
        scheduler(opt, **kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_invalid_step_raises(step):
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(step, total_steps=10)


def _setup(lr=0.2, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, scheduler(opt, **kwargs)


def _train_step(model, opt, sched, x):
    """One optimizer step; returns the lr it ran at."""
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()
    return lr


KW = dict(total_steps=12, warmup_steps=3, kind="cosine", min_ratio=0.1)
XS = torch.randn(20, 4, 3, generator=torch.Generator().manual_seed(5))


def test_scheduler_applies_the_multiplier_at_each_optimizer_step():
    model, opt, sched = _setup(**KW)
    lrs = [_train_step(model, opt, sched, XS[k]) for k in range(15)]
    assert lrs == pytest.approx([0.2 * lr_multiplier(k, **KW) for k in range(15)], rel=1e-12)
    assert lrs[0] == pytest.approx(0.2 / 3)


@pytest.mark.parametrize("order", ["scheduler_only", "optimizer_then_scheduler", "scheduler_then_optimizer"])
def test_restored_scheduler_continues_identically(order):
    model, opt, sched = _setup(**KW)
    for k in range(5):
        _train_step(model, opt, sched, XS[k])
    sched_state = json.loads(json.dumps(sched.state_dict()))  # a "run" part: plain JSON
    opt_state, model_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    expected = [_train_step(model, opt, sched, XS[k]) for k in range(5, 14)]

    model2, opt2, sched2 = _setup(**KW)
    fresh_first_lr = opt2.param_groups[0]["lr"]
    assert fresh_first_lr != pytest.approx(expected[0])  # without the restore the run would differ
    model2.load_state_dict(model_state)
    if order == "optimizer_then_scheduler":
        opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    if order == "scheduler_then_optimizer":
        opt2.load_state_dict(opt_state)
    got = [_train_step(model2, opt2, sched2, XS[k]) for k in range(5, 14)]
    assert got == expected  # bit-identical lrs, from the first step after the restore
    if order != "scheduler_only":  # with the optimizer's moments too, the weights follow the same path
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)
    assert sched2.checkpoint_scope == "run"  # the contract of checkpoint/parts.py


def test_optim_config_schedule_is_a_function_of_the_iteration():
    from fastarcher.config import OptimConfig

    constant = OptimConfig()
    assert not constant.scheduled and constant.lr_multiplier(7, 10) == 1.0  # the optimizers' lr is left alone
    linear = OptimConfig(lr_schedule="linear", lr_warmup_iterations=2, min_lr_ratio=0.1)
    assert linear.scheduled
    # warm-up 1/2, 2/2; then u = (i − 2)/(10 − 2): 0.1 + 0.9·(1 − u)
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 7 / 8, 0.1 + 0.9 * 6 / 8]
    assert [linear.lr_multiplier(i, 10) for i in range(5)] == pytest.approx(expected)
    assert OptimConfig(lr_warmup_iterations=4).lr_multiplier(0, 3) == pytest.approx(1 / 3)  # warm-up ≤ the run
