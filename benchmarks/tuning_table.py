"""Tabulate tuning studies: one row per study folder (each made by `python -m fastarcher.study` with one
algorithm and one setting on the tuning seeds) with its train flags and episodes to the threshold per seed.
Runs of a study stopped by hand (no study.json) are read from their metrics.jsonl, their flags from the
run's logged command (study.log beside the folder, or the study's stdout saved as FOLDER.log).

    python benchmarks/tuning_table.py --threshold 0.9 runs/tune/fixed_* > docs/results/frozenlake_fixed3/tuning.md
"""
import argparse
import json
import re
import shlex
from pathlib import Path

from fastarcher.study import read_rows, success_curve, summarize

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
            # logs written before the study printed whole lines can hold two commands on one line
            for line in re.sub(r"(?<=\S)study: ", "\nstudy: ", log.read_text()).splitlines():
                if line.startswith("study: ") and "fastarcher.train" in line:
                    name, _, command = line[len("study: "):].partition(": ")
                    commands[name] = command
        for algo in sorted({p.name.rsplit("_s", 1)[0] for p in (folder / "runs").iterdir()}):
            curves, flags = {}, set()
            for run in sorted((folder / "runs").glob(f"{algo}_s*")):
                seed = run.name.rsplit("_s", 1)[1]
                curve = success_curve(read_rows(run, partial_ok=True))
                if len(curve) < 2:
                    continue
                curves[seed] = curve
                if f"{algo} seed {seed}" in commands:
                    flags.add(run_flags(commands[f"{algo} seed {seed}"]))
            if not curves:
                continue
            row = summarize({algo: curves}, threshold)[0]
            median = "—" if row["episodes_median"] is None else f"{row['episodes_median']:,.0f}"
            seeds = ", ".join(f"{s}: {'—' if v is None else f'{v:,.0f}'} (of {curves[s][-1][0]:,.0f})"
                              for s, v in row["per_seed"].items())
            out.append(f"| {folder.name} | `{algo}` | `{' / '.join(sorted(f or '(none)' for f in flags)) or '?'}` | "
                       f"{row['reached']}/{row['seeds']} | {median} | {seeds} | {row['final_mean']:.2f} |")
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
