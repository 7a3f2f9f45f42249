"""ArCHer learns: the tiny CPU preset, shortened, under `torchrun --nproc_per_node=2`.

The preset (configs/tiny_cpu.yaml, seed 0) reaches greedy success 1.0 at iteration 110 of its 250;
this test runs its first 130 iterations (about 3.5 minutes on 2 cores) and asserts that greedy
success rose by at least 0.3 over the start and over the uniformly random valid-action policy.
Seeded and deterministic on CPU: the same iterations give the same numbers on every run.
"""
import json

import pytest
import yaml

from dist_helpers import REPO, describe, run_torchrun

ITERATIONS = 130


@pytest.mark.slow
def test_archer_tiny_preset_learns_frozenlake_with_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_torchrun(["-m", "fastarcher.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
                         "--algo", "archer", "--device", "cpu", "--iterations", str(ITERATIONS),
                         "--log.no-progress", "--checkpoint.no-export-hf", "--log.run-dir", str(run_dir)],
                        timeout=900)
    assert proc.returncode == 0, describe(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    start, final = summary["start/eval_success_rate"], summary["final/eval_success_rate"]
    random_policy = summary["random/success_rate"]
    assert final >= start + 0.3, summary
    assert final >= random_policy + 0.3, summary

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warmup_iterations = yaml.safe_load((run_dir / "config.yaml").read_text())["archer"]["warmup_iterations"]
    assert warmup_iterations == 30  # the preset's critic-only warm-up
    warmup = [r for r in rows if 1 <= r["iteration"] <= warmup_iterations]
    assert warmup and not any("actor/pg_loss" in r for r in warmup)
    assert all("actor/pg_loss" in r for r in rows if r["iteration"] > warmup_iterations)
    # the sampled policy improved too, not only its argmax
    early = sum(r["rollout/success_rate"] for r in rows[1:11]) / 10
    late = sum(r["rollout/success_rate"] for r in rows[-10:]) / 10
    assert late >= early + 0.3, (early, late)
