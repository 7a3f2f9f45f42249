"""Guards against numerical faults and bad input (fastarcher/guards.py, config validation, env errors).

Reference for the guarded step: plain `clip_grad_norm_` + `optimizer.step()` on an identical copy.
"""

import logging
import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastarcher.config import GuardConfig
from fastarcher.guards import (
    NonFiniteLossError, NonFiniteParametersError, StepGuard, largest_parameter, parameters_within,
)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _loss(model, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 6).reshape(2, 3)
    return model(x).pow(2).mean() * scale


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in optimizer.state.items()}
    return params, state


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_finite_step_is_bitwise_the_plain_clip_and_step():
    model, opt = _model_and_opt()
    ref, ref_opt = _model_and_opt()
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    for _ in range(3):
        loss = _loss(model)
        loss.backward()
        guard.track("critic", loss)
        norm = guard.check_and_step("critic", opt, max_norm=0.05, iteration=0)
        ref_loss = _loss(ref)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert torch.equal(norm, ref_norm)
    assert _same(model.parameters(), ref.parameters())
    assert guard.metrics() == {"guard/skipped_steps": 0.0, "guard/skipped_critic_steps": 0.0,
                               "guard/skipped_actor_steps": 0.0}


def test_nan_loss_skips_step_and_leaves_optimizer_state_untouched():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    _loss(model).backward()
    guard.check_and_step("critic", opt, max_norm=1.0, iteration=0)  # a real step creates Adam state
    params, state = _snapshot(model, opt)
    loss = _loss(model)
    loss.backward()  # finite gradients ...
    guard.track("critic", loss * float("nan"))  # ... but the loss that is reported is NaN
    guard.check_and_step("critic", opt, max_norm=1.0, iteration=4)
    assert _same(params, model.parameters())
    for key, values in state.items():  # Adam moments and step counter unchanged
        assert all(torch.equal(values[n], opt.state[key][n]) for n in values)
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are dropped
    assert guard.metrics()["guard/skipped_steps"] == 1.0
    assert guard.metrics()["guard/skipped_critic_steps"] == 1.0


def test_infinite_gradient_with_finite_loss_is_skipped():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    params, _ = _snapshot(model, opt)
    loss = _loss(model)
    loss.backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    norm = guard.check_and_step("actor", opt, max_norm=1.0, iteration=0, loss=loss)
    assert math.isinf(float(norm))
    assert _same(params, model.parameters())
    assert guard.metrics()["guard/skipped_actor_steps"] == 1.0


def test_stops_after_consecutive_skips_naming_loss_value_and_step():
    model, opt = _model_and_opt()
    messages = []
    guard = StepGuard(GuardConfig(max_consecutive_skips=3), log=messages.append)
    for step in range(2):
        _loss(model).backward()
        guard.check_and_step("critic", opt, max_norm=1.0, iteration=7, loss=torch.tensor(float("nan")))
    assert len(messages) == 2 and "2 in a row" in messages[1]
    _loss(model).backward()
    with pytest.raises(NonFiniteLossError) as info:
        guard.check_and_step("critic", opt, max_norm=1.0, iteration=7, loss=torch.tensor(float("nan")))
    text = str(info.value)
    assert "3 consecutive critic optimizer steps" in text
    assert "critic loss nan" in text and "iteration 7" in text and "critic step 3" in text
    assert "optim.critic_lr" in text  # says what to change


def _guarded_steps(guard, model, opt, losses, iteration: int = 0) -> None:
    """One backward and one guarded critic step per loss value (the value the guard sees)."""
    for loss in losses:
        _loss(model).backward()
        guard.check_and_step("critic", opt, max_norm=1.0, iteration=iteration, loss=torch.tensor(loss))


def test_a_good_step_resets_the_consecutive_count():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(max_consecutive_skips=2), log=lambda m: None)
    _guarded_steps(guard, model, opt, (float("nan"), 1.0, float("nan"), 1.0, float("inf")))
    assert guard.counters["critic"].skipped == 3 and guard.counters["critic"].consecutive == 1


def test_zero_limit_never_stops_and_disabled_guard_steps_anyway():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(max_consecutive_skips=0), log=lambda m: None)
    _guarded_steps(guard, model, opt, [float("nan")] * 5)
    assert guard.counters["critic"].skipped == 5
    off = StepGuard(GuardConfig(skip_nonfinite=False), log=lambda m: None)
    loss = _loss(model)
    loss.backward()
    next(model.parameters()).grad.fill_(float("nan"))
    off.check_and_step("critic", opt, max_norm=0.0, iteration=0, loss=loss)
    assert torch.isnan(next(model.parameters())).all()  # stepped with the NaN gradient
    assert off.metrics()["guard/skipped_steps"] == 0.0


def test_guard_counters_survive_state_dict_roundtrip():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    for loss in (float("nan"), 1.0):
        _loss(model).backward()
        guard.check_and_step("actor", opt, max_norm=1.0, iteration=0, loss=torch.tensor(loss))
    restored = StepGuard(GuardConfig(), log=lambda m: None)
    restored.load_state_dict(guard.state_dict())
    assert restored.metrics() == guard.metrics() and restored.counters["actor"].steps == 2


def test_a_step_that_makes_parameters_non_finite_stops_the_run_naming_the_optimizer():
    model, opt = _model_and_opt()
    for group in opt.param_groups:
        group["lr"] = float("inf")  # finite loss and gradient, yet the step writes Inf/NaN into the weights
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    loss = _loss(model)
    loss.backward()
    with pytest.raises(NonFiniteParametersError) as info:
        guard.check_and_step("critic", opt, max_norm=1.0, iteration=5, loss=loss)
    text = str(info.value)
    assert "\n" not in text and "critic parameters" in text and "iteration 5" in text and "nan" in text
    assert "optim.critic_lr" in text and "--checkpoint.resume auto" in text
    assert isinstance(info.value, NonFiniteLossError)  # train.py turns it into one "numerical error" line


def test_a_step_that_makes_parameters_huge_stops_the_run_at_the_configured_limit():
    model, opt = _model_and_opt()
    for group in opt.param_groups:
        group["lr"] = 1e30  # finite weights of about 1e30: far beyond any sane network
    guard = StepGuard(GuardConfig(), log=lambda m: None)
    loss = _loss(model)
    loss.backward()
    huge = r"actor parameters reach \|w\| = [0-9.]+e\+30.*guard.max_param_abs"
    with pytest.raises(NonFiniteParametersError, match=huge):
        guard.check_and_step("actor", opt, max_norm=1.0, iteration=0, loss=loss)
    # below the limit the same step is accepted
    model, opt = _model_and_opt()
    for group in opt.param_groups:
        group["lr"] = 1e30
    loss = _loss(model)
    loss.backward()
    StepGuard(GuardConfig(max_param_abs=1e31), log=lambda m: None).check_and_step(
        "actor", opt, max_norm=1.0, iteration=0, loss=loss)
    assert 1e29 < largest_parameter(list(model.parameters())) < 1e31


def test_largest_parameter_is_the_max_abs_and_nan_wins():
    a, b = torch.tensor([1.0, -7.0]), torch.tensor([[3.0]], dtype=torch.bfloat16)
    assert largest_parameter([a, b, torch.zeros(0)]) == 7.0
    assert largest_parameter([a, torch.tensor([float("-inf")])]) == float("inf")
    assert math.isnan(largest_parameter([torch.tensor([float("inf")]), torch.tensor([float("nan"), 1.0])]))


def test_parameter_check_tells_overflow_of_the_norm_from_infinite_weights():
    normal, huge = [torch.full((3,), 0.5)], [torch.full((3,), 1e30)]  # ‖huge‖₂ overflows fp32: inf
    assert parameters_within(normal, 1e6) == (True, pytest.approx(0.5 * 3 ** 0.5))  # fast path: the 2-norm
    assert parameters_within(huge, 0.0) == (True, pytest.approx(1e30))  # finite, no limit
    assert parameters_within(huge, 1e6) == (False, pytest.approx(1e30))
    assert parameters_within([torch.tensor([1.0, float("inf")])], 0.0) == (False, float("inf"))


def test_resume_resets_the_consecutive_count_and_keeps_the_totals():
    model, opt = _model_and_opt()
    guard = StepGuard(GuardConfig(max_consecutive_skips=3), log=lambda m: None)
    _guarded_steps(guard, model, opt, [float("nan")] * 2)
    restored = StepGuard(GuardConfig(max_consecutive_skips=3), log=lambda m: None)
    restored.load_state_dict(guard.state_dict())
    assert restored.counters["critic"].consecutive == 0
    assert restored.counters["critic"].skipped == 2 and restored.counters["critic"].steps == 2
    _guarded_steps(restored, model, opt, [float("nan")] * 2, iteration=1)  # without the reset: a stop at once
    assert restored.counters["critic"].consecutive == 2 and restored.metrics()["guard/skipped_steps"] == 4.0


def _rank_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]
    loss = _loss(model)
    loss.backward()
    bad = torch.tensor(float("nan")) if rank == 1 else loss  # only rank 1 sees a NaN loss
    StepGuard(GuardConfig(), log=lambda m: None).check_and_step("critic", opt, max_norm=1.0, iteration=0,
                                                                loss=bad)
    results[rank] = _same(before, model.parameters())
    dist.destroy_process_group()


def test_ranks_skip_together_when_one_rank_has_a_nan_loss():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(port, results), nprocs=2)
    assert dict(results) == {0: True, 1: True}  # rank 0's loss was fine, yet it skipped too


# ------------------------------------------------------------------------------------------------------
# through the trainer (one process, tiny settings)

TINY = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.no-random-baseline "
        "--archer.batch-size 8 --archer.warmup-iterations 0 --replay.capacity 256 --log.no-progress "
        "--checkpoint.no-export-hf --checkpoint.no-save-on-sigterm --iterations 2").split()


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = parse_config(TINY + ["--log.run-dir", str(tmp_path / "run"), "--guard.max-consecutive-skips", "3"])
    cfg.validate(world_size=1)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    yield trainer
    trainer.logger.close()
    torch.set_num_threads(threads)


def test_trainer_skips_a_nan_critic_step_and_keeps_training(trainer, monkeypatch):
    import fastarcher.algos.archer as trainer_module

    real = trainer_module.critic_loss
    calls = {"n": 0}

    def nan_once(**kwargs):
        loss, metrics = real(**kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), metrics

    monkeypatch.setattr(trainer_module, "critic_loss", nan_once)
    first = trainer.iterate()
    assert first["guard/skipped_critic_steps"] == 1.0 and first["guard/skipped_steps"] == 1.0
    second = trainer.iterate()
    assert second["guard/skipped_critic_steps"] == 1.0  # cumulative; no new skip
    assert math.isfinite(second["critic/q_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.algorithm.critic.parameters())


def test_trainer_stops_after_consecutive_nan_steps_with_a_clear_message(trainer, monkeypatch):
    import fastarcher.algos.archer as trainer_module

    real = trainer_module.critic_loss
    monkeypatch.setattr(trainer_module, "critic_loss", lambda **kw: (real(**kw)[0] * float("nan"), real(**kw)[1]))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive critic optimizer steps.*critic loss nan.*iteration 0"):
        trainer.iterate()  # tiny preset: 3 critic epochs per iteration


def test_trainer_stops_before_a_diverged_critic_reaches_the_target_or_a_checkpoint(trainer):
    from fastarcher.checkpoint import CheckpointError

    for group in trainer.algorithm.critic_opt.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteParametersError, match=r"critic parameters .* at iteration 0 \(critic step 1\)"):
        trainer.iterate()
    assert trainer.guard.counters["critic"].steps == 1  # stopped at the first step, not after many skips
    assert all(torch.isfinite(p).all() for p in trainer.algorithm.target.parameters())  # no soft update from it
    with pytest.raises(CheckpointError, match=r"refusing to save .*critic weights are not finite"):
        trainer.checkpointer.save(trainer.iteration)  # the save path refuses too, should anything call it
    assert not (trainer.run_dir / "checkpoints").exists() or not any((trainer.run_dir / "checkpoints").iterdir())


def test_env_that_raises_is_dropped_and_reported_with_seed_and_episode(trainer, caplog):
    env = trainer.runner.envs[1]
    real_step = env.step
    calls = {"n": 0}

    def flaky(action):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulator crashed")
        return real_step(action)

    env.step = flaky
    seed = trainer.train_seeds()[1]
    with caplog.at_level(logging.WARNING, logger="fastarcher.envs.runner"):
        metrics = trainer.iterate()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"seed {seed}" in messages and "episode 1" in messages and "simulator crashed" in messages
    assert metrics["count/rollout_dropped"] == 1.0 and metrics["count/rollout_episodes"] == 3.0
    assert trainer.iterate()["count/rollout_dropped"] == 0.0  # the run goes on with the next batch


# ------------------------------------------------------------------------------------------------------
# config validated before any work, messages name the field

BAD_CONFIGS = [
    (["--checkpoint.keep-last", "0"], "checkpoint.keep_last (0) must be positive"),
    (["--checkpoint.save-every", "-1"], "checkpoint.save_every (-1) must not be negative"),
    (["--checkpoint.resume", "/no/such/checkpoint"], "checkpoint.resume ('/no/such/checkpoint') must be 'auto'"),
    (["--guard.max-consecutive-skips", "-2"], "guard.max_consecutive_skips (-2) must not be negative"),
    (["--archer.batch-size", "64", "--replay.capacity", "10"],
     "archer.batch_size (64) must not exceed replay.capacity"),
    (["--iterations", "0"], "iterations (0) must be positive"),
]


@pytest.mark.parametrize("flags,message", BAD_CONFIGS, ids=[m.split(" ")[0] for _, m in BAD_CONFIGS])
def test_bad_config_stops_before_any_work_naming_the_field(flags, message, tmp_path, monkeypatch):
    from fastarcher.train import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["--config", "configs/tiny_cpu.yaml", "--log.run-dir", str(run_dir), *flags])
    assert message in str(info.value) and str(info.value).startswith("config error")
    assert not (run_dir / "metrics.jsonl").exists()  # nothing was started


def test_missing_preset_is_named():
    from fastarcher.train import main

    with pytest.raises(SystemExit, match=r"config preset 'configs/no_such_preset.yaml' does not exist"):
        main(["--config", "configs/no_such_preset.yaml"])


def test_unknown_preset_key_is_named(tmp_path):
    from fastarcher.config import load_preset

    preset = tmp_path / "bad.yaml"
    preset.write_text("checkpoint:\n  keep_lst: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'checkpoint.keep_lst'"):
        load_preset(preset)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
