"""Success rate and return of the random and oracle policies on each environment.

    python -m fastarcher.envs.evaluate                    # defaults: 2000 episodes per env and policy
    python -m fastarcher.envs.evaluate --episodes 200 --envs frozenlake sokoban
    python -m fastarcher.envs.evaluate --variants         # also the non-default configs of docs/envs.md

The random policy draws uniformly from `action_choices()` each turn; the oracle policy plays
`oracle_action()`. Episodes use seeds seed, seed+1, ...; the random policy's generator is seeded
with `seed` too, so every figure is reproducible. These are the baselines quoted in docs/envs.md.
"""
from __future__ import annotations

import argparse
import random
import time

from fastarcher.envs import ENV_NAMES, EnvConfig, FrozenLakeConfig, SokobanConfig
from fastarcher.envs.runner import BatchedEnvRunner

VARIANTS: dict[str, EnvConfig] = {
    "frozenlake slippery": EnvConfig(name="frozenlake", frozenlake=FrozenLakeConfig(slippery=True)),
    "frozenlake slippery, 100 turns": EnvConfig(
        name="frozenlake", max_turns=100, frozenlake=FrozenLakeConfig(slippery=True)
    ),
    "frozenlake random 6x6, 20 turns": EnvConfig(
        name="frozenlake", max_turns=20, frozenlake=FrozenLakeConfig(random_map_size=6)
    ),
    "sokoban 8x8, 2 boxes": EnvConfig(
        name="sokoban", sokoban=SokobanConfig(width=8, height=8, num_boxes=2, max_solution_moves=14)
    ),
}
"""Non-default configs measured for docs/envs.md."""


def evaluate_policy(
    cfg: EnvConfig, policy: str, *, episodes: int = 2000, num_envs: int = 100, seed: int = 0
) -> dict[str, float]:
    """Run `episodes` episodes of `policy` ("random" or "oracle"); returns the runner summary."""
    if policy not in ("random", "oracle"):
        raise ValueError(f"policy ({policy!r}) must be 'random' or 'oracle'")
    rng = random.Random(seed)
    runner = BatchedEnvRunner(cfg, min(num_envs, episodes))
    totals = {"return": 0.0, "success": 0.0, "length": 0.0, "invalid": 0.0, "episodes": 0, "dropped": 0}
    next_seed = seed
    while totals["episodes"] + totals["dropped"] < episodes:
        batch = min(runner.num_envs, episodes - totals["episodes"] - totals["dropped"])
        seeds = list(range(next_seed, next_seed + runner.num_envs))
        next_seed += runner.num_envs
        runner.reset(seeds)
        while runner.live_indices():
            actions = runner.random_actions(rng) if policy == "random" else runner.oracle_actions()
            runner.step(actions)
        for stats in runner.stats[:batch]:
            if stats.dropped:
                totals["dropped"] += 1
                continue
            totals["episodes"] += 1
            totals["return"] += stats.episode_return
            totals["success"] += stats.success
            totals["length"] += stats.length
            totals["invalid"] += stats.invalid_count
    n = max(totals["episodes"], 1)
    return {
        "success_rate": totals["success"] / n,
        "return_mean": totals["return"] / n,
        "length_mean": totals["length"] / n,
        "invalid_rate": totals["invalid"] / max(totals["length"], 1),
        "num_episodes": float(totals["episodes"]),
        "num_dropped": float(totals["dropped"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000, help="episodes per env and policy")
    parser.add_argument("--seed", type=int, default=0, help="first episode seed and random-policy seed")
    parser.add_argument("--envs", nargs="+", default=list(ENV_NAMES), choices=ENV_NAMES, help="envs to run")
    parser.add_argument("--variants", action="store_true", help="also run the non-default configs in VARIANTS")
    args = parser.parse_args()
    configs = {name: EnvConfig(name=name) for name in args.envs}
    if args.variants:
        configs.update(VARIANTS)
    print("| env | policy | success rate | mean return | mean length | episodes | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in configs.items():
        for policy in ("random", "oracle"):
            start = time.perf_counter()
            result = evaluate_policy(cfg, policy, episodes=args.episodes, seed=args.seed)
            seconds = time.perf_counter() - start
            print(
                f"| {name} | {policy} | {result['success_rate']:.3f} | {result['return_mean']:.3f} | "
                f"{result['length_mean']:.2f} | {int(result['num_episodes'])} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
