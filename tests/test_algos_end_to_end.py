"""Every algorithm on the built-in envs through the CLI under `torchrun --nproc_per_node=2` (3 iterations; each
algorithm on frozenlake and two other envs, every pair with FASTARCHER_FULL_MATRIX=1), and a bit-exact resume for every algorithm: 2 iterations, then `--checkpoint.resume auto` to 3, logs the
same metrics as 3 iterations straight through."""
import json
import os

import pytest

from dist_helpers import describe, run_torchrun

ALGOS = ["archer", "chai", "reinforce", "grpo", "rloo", "reinforce_pp", "remax", "ppo", "filtered_bc"]
ENVS = ["frozenlake", "guess_number", "sokoban", "twenty_questions"]
FLAGS = ("--device cpu --rollout.num-envs 4 --eval.episodes 2 --eval.every 0 --eval.no-random-baseline "
         "--archer.batch-size 4 --archer.critic-epochs 1 --archer.actor-epochs 1 --archer.warmup-iterations 1 "
         "--replay.capacity 64 --model.num-layers 1 --critic.num-layers 1 --log.no-progress "
         "--checkpoint.no-export-hf").split()


# a reference policy and a KL controller in the checkpoint, a schedule on the lr (over the run's iterations:
# this one gives iterations 0 and 1 the same factor in a run of 2 as in a run of 3, so the runs can be compared)
KL_VARIANTS = {
    "grpo_kl_loss_adaptive": ["--algo", "grpo", "--kl.coef", "0.1", "--kl.adaptive", "--kl.horizon", "8",
                              "--optim.lr-schedule", "cosine", "--optim.lr-warmup-iterations", "1"],
    "reinforce_kl_reward_full": ["--algo", "reinforce", "--kl.coef", "0.1", "--kl.placement", "reward",
                                 "--kl.estimator", "full"],
    "reinforce_pp_kl_reward": ["--algo", "reinforce_pp", "--kl.coef", "0.1", "--kl.placement", "reward",
                               "--kl.estimator", "kl", "--baseline.update-epochs", "2"],
    "filtered_bc_iteration": ["--algo", "filtered_bc", "--baseline.filter-over", "iteration"],
    "archer_token_baseline": ["--algo", "archer", "--archer.token-baseline"],
    "archer_kl_full": ["--algo", "archer", "--kl.coef", "0.1", "--kl.estimator", "full"],
    "grpo_length_norm": ["--algo", "grpo", "--baseline.length-norm", "--baseline.no-group-std"],
    "remax_kl_loss_groups": ["--algo", "remax", "--kl.coef", "0.1", "--rollout.group-size", "2"],
    "ppo_bilevel_kl_loss": ["--algo", "ppo", "--ppo.estimator", "bilevel_gae", "--kl.coef", "0.1",
                            "--kl.estimator", "mse", "--ppo.dual-clip", "3.0"],
    "ppo_archer_kl_reward": ["--algo", "ppo", "--ppo.estimator", "archer", "--kl.coef", "0.1", "--kl.placement",
                             "reward"],
}


def _run(tmp_path, name: str, algo: str, env: str, *extra: str):
    run_dir = tmp_path / name
    group = ["--rollout.group-size", "2"] if algo in ("grpo", "rloo") else []
    proc = run_torchrun(["-m", "fastarcher.train", *FLAGS, "--algo", algo, "--env.name", env, *group,
                         "--log.run-dir", str(run_dir), *extra], timeout=300)
    assert proc.returncode == 0, describe(proc)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def _check_run(rows, algo):
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all(r["count/rollout_episodes"] == 4 for r in rows[1:])
    assert ("critic/q_loss" in rows[1]) == (algo in ("archer", "chai"))  # on-policy algorithms build no critic
    assert any(k.startswith("actor/") for k in rows[-1]) == (algo != "chai")  # chai never steps the policy


# Every algorithm runs on frozenlake in the resume test below and on two of the other three envs here, rotated so
# that each env gets six algorithms: 18 runs instead of 27, for CI's time budget. FASTARCHER_FULL_MATRIX=1 runs
# every pair.
OTHER_ENVS = ENVS[1:]
PAIRS = [(algo, OTHER_ENVS[(i + k) % len(OTHER_ENVS)]) for i, algo in enumerate(ALGOS) for k in range(2)]
if os.environ.get("FASTARCHER_FULL_MATRIX") == "1":
    PAIRS = [(algo, env) for algo in ALGOS for env in OTHER_ENVS]


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "env"), PAIRS)
def test_every_algorithm_runs_on_other_envs_under_torchrun(tmp_path, algo, env):
    _check_run(_run(tmp_path, "run", algo, env, "--iterations", "3"), algo)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_resumes_bit_exactly_under_torchrun(tmp_path, algo):
    straight = _run(tmp_path, "straight", algo, "frozenlake", "--iterations", "3")
    _check_run(straight, algo)
    _run(tmp_path, "resumed", algo, "frozenlake", "--iterations", "2")
    resumed = _run(tmp_path, "resumed", algo, "frozenlake", "--iterations", "3", "--checkpoint.resume", "auto")
    # the 2-iteration run evaluates at its last iteration, the straight run does not (eval.every 0): the
    # evaluation (on its own seeds, the training stream put back) is left out of that row only
    without_eval = [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in resumed]
    assert without_eval[:3] == [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in straight[:3]]
    assert resumed[3] == straight[3]


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(KL_VARIANTS))
def test_kl_and_schedule_variants_resume_bit_exactly_under_torchrun(tmp_path, variant):
    flags = KL_VARIANTS[variant]
    algo = flags[1]
    # a higher lr, so that the policy leaves the reference within three iterations
    flags = [*flags[2:], "--optim.actor-lr", "1e-3", "--optim.actor-grad-clip", "1.0"]
    straight = _run(tmp_path, "straight", algo, "frozenlake", "--iterations", "3", *flags)
    _run(tmp_path, "resumed", algo, "frozenlake", "--iterations", "2", *flags)
    resumed = _run(tmp_path, "resumed", algo, "frozenlake", "--iterations", "3", "--checkpoint.resume", "auto", *flags)
    without_eval = [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in resumed]
    assert without_eval[:3] == [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in straight[:3]]
    assert resumed[3] == straight[3]
    if "reward" in flags:  # scored before the iteration's steps: π = π_ref at the first (up to the sharded
        # forward's rounding), not at the last
        first, last = straight[1]["kl/value"], straight[3]["kl/value"]
        assert abs(first) < 1e-7 and abs(last) > 1e3 * abs(first) and abs(last) > 1e-6, (first, last)
    if "cosine" in flags:  # cosine over 3 iterations with 1 of warm-up: 1, 1, then ½(1 + cos π/2)
        assert [r["optim/lr_scale"] for r in straight[1:]] == pytest.approx([1.0, 1.0, 0.5])
