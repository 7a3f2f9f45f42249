"""A whole training iteration (rollout, critic phase, actor phase, syncs) of a CPU preset, with today's fast
paths against the same iteration with them off, measured side by side.

    python benchmarks/bench_iteration.py [--rounds 5] [--preset frozenlake_random4_cpu]
    pytest benchmarks/bench_iteration.py --benchmark-only

Two trainers are built from the same preset and seed (the built-in policy, no warm start, the actor on from
the first iteration) and take turns: one `Trainer.iterate()` each per round, after one warm-up iteration
each. Providers:
- `plain` (baseline): `--rollout.no-kv-cache --model.no-fused-head` (every turn prefilled again, logits
  materialised for the actor), and the critic target embedding s in its own pass even where s′ extends s;
- `default`: the preset as shipped (cross-turn KV cache, fused LM head, s embedded inside the pass over s′
  where it can be; the replay rebuild and batched tokenization are always on).
The two play the same episodes only while their numerics agree; the figure is the median seconds per
iteration, and `time/*` splits it by phase.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PROVIDERS = {"plain": ["--rollout.no-kv-cache", "--model.no-fused-head"], "default": []}
BASELINE = "plain"


def build(preset: str, flags: list[str], run_dir: Path):
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    argv = ["--config", str(REPO / "configs" / f"{preset}.yaml"), "--algo", "archer", "--warm-start.steps", "0",
            "--archer.warmup-iterations", "0", "--log.no-progress", "--log.run-dir", str(run_dir), *flags]
    trainer = Trainer(parse_config(argv), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.algorithm.start(resumed=False)
    if "--rollout.no-kv-cache" in flags:  # the baseline: the critic target's three separate passes too
        trainer.algorithm.critic.share_state_pass = trainer.algorithm.target.share_state_pass = False
    return trainer


def measure(preset: str, rounds: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: build(preset, flags, Path(tmp) / name) for name, flags in PROVIDERS.items()}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        phases: dict[str, list[dict]] = {name: [] for name in trainers}
        for r in range(rounds + 1):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                metrics = trainer.iterate()
                trainer.iteration += 1
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                    phases[name].append({k: v for k, v in metrics.items() if k.startswith("time/")})
        for trainer in trainers.values():
            trainer.logger.close()
    out = {}
    for name in trainers:
        keys = phases[name][0].keys()
        out[name] = {"iteration_s": statistics.median(times[name]),
                     **{k: statistics.median(p[k] for p in phases[name]) for k in keys}}
    return out


def test_iteration(ratio_table, monkeypatch):
    monkeypatch.chdir(REPO)
    result = measure("frozenlake_random4_cpu", rounds=3)
    for name, row in result.items():
        ratio_table.record("iteration[frozenlake_random4_cpu, archer]", name, baseline=BASELINE,
                           time_s=row["iteration_s"], peak_mib=None,
                           note=f"rollout {row['time/rollout_s']:.3f} s, critic {row['time/critic_s']:.3f} s, "
                                f"actor {row['time/actor_s']:.3f} s")
    assert result["default"]["iteration_s"] > 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="frozenlake_random4_cpu")
    args = parser.parse_args()
    result = measure(args.preset, args.rounds)
    base = result[BASELINE]["iteration_s"]
    print(f"{args.preset}, archer, no warm start, actor on; medians of {args.rounds} interleaved iterations, 1 thread")
    print("| provider | s per iteration | rollout s | critic s | actor s | speedup |")
    print("|---|---|---|---|---|---|")
    for name, row in result.items():
        print(f"| {name} | {row['iteration_s']:.3f} | {row['time/rollout_s']:.3f} | {row['time/critic_s']:.3f} | "
              f"{row['time/actor_s']:.3f} | {base / row['iteration_s']:.2f}x |")


if __name__ == "__main__":
    main()
