"""ArCHer learns: the tiny CPU preset, whole, under `torchrun --nproc_per_node=2`.

The preset (configs/tiny_cpu.yaml, 250 iterations, about 5.5 minutes on 2 cores) was tuned on seed 0,
which first reaches greedy success 1.0 at iteration 110 with the pinned libraries (constraints.txt).
Seed 1 was not tuned on. Each run asserts that greedy success ended at least 0.3 above the start and
above the uniformly random valid-action policy, and that the sampled policy improved too.

The whole preset runs rather than a prefix: a prefix that stops 20 iterations after the tuned seed
first succeeds breaks whenever library numerics move the trajectory (a fresh install with newer
libraries learned at iteration 150). Seeded and deterministic on CPU: the same iterations give the same
numbers on every run of one install.
"""
import json
import re
import warnings

import pytest
import yaml

from dist_helpers import REPO, describe, run_torchrun

NATIVE_CRASH = re.compile(r"Signal \d+ \((SIGSEGV|SIGBUS|SIGILL|SIGABRT)\) received")
"""torchrun's report of a worker killed in native code, which no assertion of this file is about."""


def run_preset(run_dir, seed: int):
    return run_torchrun(["-m", "fastarcher.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
                         "--algo", "archer", "--device", "cpu", "--seed", str(seed),
                         "--log.no-progress", "--checkpoint.no-export-hf", "--log.run-dir", str(run_dir)],
                        timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1], ids=["tuned_seed0", "heldout_seed1"])
def test_archer_tiny_preset_learns_frozenlake_with_two_processes(tmp_path, seed):
    run_dir = tmp_path / "run"
    proc = run_preset(run_dir, seed)
    crash = NATIVE_CRASH.search(proc.stderr) if proc.returncode != 0 else None
    if crash:
        # One CI run lost a worker to a SIGSEGV at iteration 89 that four reruns of that seed did not
        # repeat. Such a crash is rerun once, from scratch (the run is deterministic, so the numbers are the
        # same), and reported with its Python stack (faulthandler) rather than hidden; a second crash fails.
        warnings.warn(f"a worker died of {crash.group(1)}; rerunning seed {seed} once. Its output:\n"
                      f"{proc.stderr[-4000:]}")
        run_dir = tmp_path / "rerun"
        proc = run_preset(run_dir, seed)
    assert proc.returncode == 0, describe(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    start, final = summary["start/eval_success_rate"], summary["final/eval_success_rate"]
    random_policy = summary["random/success_rate"]
    assert final >= start + 0.3, summary
    assert final >= random_policy + 0.3, summary

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["iterations"] == 250 and rows[-1]["iteration"] == 250
    warmup_iterations = config["archer"]["warmup_iterations"]
    assert warmup_iterations == 30  # the preset's critic-only warm-up
    warmup = [r for r in rows if 1 <= r["iteration"] <= warmup_iterations]
    assert warmup and not any("actor/pg_loss" in r for r in warmup)
    assert all("actor/pg_loss" in r for r in rows if r["iteration"] > warmup_iterations)
    # the sampled policy improved too, not only its argmax
    early = sum(r["rollout/success_rate"] for r in rows[1:11]) / 10
    late = sum(r["rollout/success_rate"] for r in rows[-10:]) / 10
    assert late >= early + 0.3, (early, late)
