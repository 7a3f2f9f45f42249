"""Tabulate tuning studies: one row per study folder (each made by `python -m fastarcher.study` with one
algorithm and one setting on the tuning seeds) with its train flags and episodes to the threshold per seed.
Runs of a study stopped by hand (no study.json) are read from their metrics.jsonl, their flags from the
run's logged command (study.log beside the folder, or the study's stdout saved as FOLDER.log).

    python benchmarks/tuning_table.py --threshold 0.9 runs/tune/fixed_* > docs/results/frozenlake_fixed3/tuning.md
"""
import argparse
import json
import shlex
from pathlib import Path

from fastarcher.study import episodes_to_threshold, read_rows, success_curve

SKIP = {"--config", "--seed", "--iterations", "--log.run-dir", "--checkpoint.resume", "--algo"}


def run_flags(command: str) -> str:
    """The train flags of a logged command, without the ones every study run has."""
    words, kept = shlex.split(command), []
    words = words[words.index("fastarcher.train") + 1:]
    k = 0
    while k < len(words):
        if words[k] in SKIP:
            k += 2
        elif words[k] == "--log.no-progress":
            k += 1
        else:
            kept.append(words[k])
            k += 1
    return " ".join(kept)


def rows_of(folders: list[str], threshold: float) -> list[str]:
    out = []
    for folder in map(Path, sorted(folders)):
        if not (folder / "runs").is_dir():
            continue
        log = Path(f"{folder}.log")
        commands = {}
        if log.is_file():
            for line in log.read_text().splitlines():
                if line.startswith("study: ") and "fastarcher.train" in line:
                    name, _, command = line[len("study: "):].partition(": ")
                    commands[name] = command
        for algo in sorted({p.name.rsplit("_s", 1)[0] for p in (folder / "runs").iterdir()}):
            per_seed, flags, finals = {}, set(), []
            for run in sorted((folder / "runs").glob(f"{algo}_s*")):
                seed = run.name.rsplit("_s", 1)[1]
                curve = success_curve(read_rows(run, partial_ok=True))
                if len(curve) < 2:
                    continue
                per_seed[seed] = (episodes_to_threshold(curve, threshold), curve[-1][0])
                finals.append(curve[-1][1])
                if f"{algo} seed {seed}" in commands:
                    flags.add(run_flags(commands[f"{algo} seed {seed}"]))
            if not per_seed:
                continue
            hit = sorted(v for v, _ in per_seed.values() if v is not None)
            median = f"{hit[len(hit) // 2] if len(hit) % 2 else (hit[len(hit) // 2 - 1] + hit[len(hit) // 2]) / 2:,.0f}" \
                if hit else "—"
            seeds = ", ".join(f"{s}: {'—' if v is None else f'{v:,.0f}'} (of {n:,.0f})" for s, (v, n) in per_seed.items())
            out.append(f"| {folder.name} | `{algo}` | `{' / '.join(sorted(flags)) or '?'}` | {len(hit)}/{len(per_seed)} | "
                       f"{median} | {seeds} | {sum(finals) / len(finals):.2f} |")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    print(f"| study | algorithm | train flags | seeds reaching {args.threshold:g} | median episodes | "
          "per seed: episodes to it (of episodes played) | last success (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows_of(args.folders, args.threshold)))
