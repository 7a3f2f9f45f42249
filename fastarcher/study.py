"""Sample-efficiency study: several algorithms × several seeds on one task preset, the same budget of
environment episodes each; success against episodes (mean and spread over seeds) and episodes to a success
threshold, as a table and a plot.

    python -m fastarcher.study --preset configs/tiny_cpu.yaml --algos archer grpo --seeds 10 11 12 13 14 \\
        --episodes 6400 --threshold 0.9 --out runs/study_frozenlake    # then copy study.* to docs/results/
    python -m fastarcher.study ... --flags "grpo: --rollout.group-size 4"    # per-algorithm flags
    python -m fastarcher.study ... --common="--eval.every 2"                # flags of every run (note the =)
    python -m fastarcher.study ... --jobs 2 --stop-after 3    # 2 runs at once; end a run once 3 evaluations
                                                              # in a row reach the threshold

Each run is `python -m fastarcher.train --config PRESET --algo A --seed S --iterations N` (N = episodes /
rollout.num_envs of that run's config, or under torchrun with --nproc > 1; every run's config is validated
before the first starts) in OUT/runs/A_sS; a run whose
metrics.jsonl already reaches N is not run again, a killed one resumes (`--checkpoint.resume auto`).
Episodes count every environment episode a run plays for training (rollout episodes, dropped ones and
ReMax's greedy baseline episodes); evaluation episodes are not counted. OUT gets `study.md` (the table,
the commands), `study.json` (every curve) and `study.png`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import tyro

from fastarcher.train import parse_config



@dataclass(kw_only=True)
class StudyConfig:
    preset: str
    """The task: a training preset (configs/*.yaml) every run starts from."""
    algos: tuple[str, ...] = ("archer", "grpo", "reinforce", "filtered_bc")
    """Algorithms to compare (--algo values)."""
    seeds: tuple[int, ...] = (10, 11, 12, 13, 14)
    """Seeds of every algorithm (state which ones tuning used; report others)."""
    episodes: int = 6400
    """Environment-episode budget of each run (rounded up to whole iterations)."""
    threshold: float = 0.9
    """Greedy-evaluation success rate whose first crossing is reported in episodes."""
    out: str = "runs/study"
    """Folder for the runs, the table, the curves and the plot."""
    flags: tuple[str, ...] = ()
    """Extra train flags per algorithm, each "ALGO: FLAGS", e.g. "grpo: --rollout.group-size 4"."""
    common: str = ""
    """Extra train flags for every run; pass as --common="--eval.every 2" (with =: the value starts with --)."""

    def algo_flags(self) -> dict[str, str]:
        """`flags` by algorithm; an entry without "ALGO:" or naming an algorithm not in `algos` is an error."""
        out = {}
        for entry in self.flags:
            algo, sep, flags = entry.partition(":")
            if not sep or algo.strip() not in self.algos:
                raise ValueError(f"--flags entry {entry!r} must be 'ALGO: FLAGS' with ALGO one of {list(self.algos)}")
            out[algo.strip()] = " ".join(part for part in (out.get(algo.strip(), ""), flags.strip()) if part)
        return out
    nproc: int = 1
    """Processes per run (torchrun --nproc_per_node); 1 runs plain python."""
    stop_after: int = 0
    """End a run once this many consecutive evaluations reach the threshold (0: every run plays the whole
    budget). Saves the compute past the crossing; the run's curve is held at its last evaluation, and
    RUN_DIR/study_stop.json records the stop so a rerun of the study does not resume it."""
    jobs: int = 1
    """Runs at once; each gets OMP_NUM_THREADS = cores // jobs (unless set) and writes its output to
    RUN_DIR/train.log when jobs > 1. Runs are independent, so the results do not depend on it."""
    dry_run: bool = False
    """Print the commands and summarise whatever runs exist, without running anything."""


def episodes_per_row(row: dict) -> float:
    """Training environment episodes one logged iteration played."""
    return row.get("count/rollout_episodes", 0.0) + row.get("count/rollout_dropped", 0.0) + \
        row.get("count/greedy_episodes", 0.0)


def success_curve(rows: list[dict]) -> list[tuple[float, float]]:
    """(episodes played so far, greedy success) at every logged evaluation, iteration order."""
    curve, played = [], 0.0
    for row in sorted(rows, key=lambda r: r["iteration"]):
        if row["iteration"] > 0:
            played += episodes_per_row(row)
        if "eval/success_rate" in row:
            curve.append((played, row["eval/success_rate"]))
    return curve


def episodes_to_threshold(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """Episodes at the first evaluation with success ≥ threshold (None: never within the budget)."""
    return next((episodes for episodes, success in curve if success >= threshold), None)


def summarize(curves: dict[str, dict[int, list[tuple[float, float]]]], threshold: float) -> list[dict]:
    """One row per algorithm: episodes to threshold per seed (median, min, max over the seeds that reached
    it, and how many did) and the final success (mean, std over seeds)."""
    rows = []
    for algo, by_seed in curves.items():
        reach = {seed: episodes_to_threshold(curve, threshold) for seed, curve in by_seed.items()}
        hit = sorted(v for v in reach.values() if v is not None)
        finals = [curve[-1][1] for curve in by_seed.values() if curve]
        rows.append({
            "algo": algo, "seeds": len(by_seed), "reached": len(hit),
            "episodes_median": statistics.median(hit) if hit else None,
            "episodes_min": hit[0] if hit else None, "episodes_max": hit[-1] if hit else None,
            "final_mean": statistics.fmean(finals) if finals else None,
            "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "per_seed": {str(seed): value for seed, value in sorted(reach.items())},
        })
    return rows


def table(rows: list[dict], threshold: float) -> str:
    def num(x):
        return "—" if x is None else f"{x:,.0f}"

    lines = [f"| algorithm | seeds reaching {threshold:g} | episodes to {threshold:g}: median [min, max] | "
             "final greedy success: mean ± std | per seed |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        final = "—" if r["final_mean"] is None else f"{r['final_mean']:.3f} ± {r['final_std']:.3f}"
        seeds = ", ".join(f"{s}: {num(v)}" for s, v in r["per_seed"].items())
        lines.append(f"| `{r['algo']}` | {r['reached']}/{r['seeds']} | {num(r['episodes_median'])} "
                     f"[{num(r['episodes_min'])}, {num(r['episodes_max'])}] | {final} | {seeds} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[tuple[float, float]]]], path: Path, title: str) -> None:
    """Mean greedy success over seeds against episodes, with the min–max band (seeds share evaluation points
    when they share the preset; a seed's curve is held at its last value past its end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo, by_seed in curves.items():
        points = sorted({e for curve in by_seed.values() for e, _ in curve})
        if not points:
            continue
        table_ = [[_value_at(curve, e) for e in points] for curve in by_seed.values() if curve]
        mean = [statistics.fmean(col) for col in zip(*table_)]
        ax.plot(points, mean, label=f"{algo} (n={len(table_)})")
        ax.fill_between(points, [min(c) for c in zip(*table_)], [max(c) for c in zip(*table_)], alpha=0.15)
    ax.set_xlabel("environment episodes (training)")
    ax.set_ylabel("greedy success rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value_at(curve: list[tuple[float, float]], episodes: float) -> float:
    value = curve[0][1]
    for e, v in curve:
        if e > episodes:
            break
        value = v
    return value


def read_rows(run_dir: Path, partial_ok: bool = False) -> list[dict]:
    """metrics.jsonl's rows; `partial_ok`: a run is writing it, so a last line cut mid-write is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not (partial_ok and k == len(lines) - 1):
                raise
    return rows


def train_command(cfg: StudyConfig, algo: str, seed: int, iterations: int, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m"] if cfg.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}", "-m"]
    return [*launcher, "fastarcher.train", "--config", cfg.preset, "--algo", algo, "--seed", str(seed),
            "--iterations", str(iterations), "--log.run-dir", str(run_dir), "--checkpoint.resume", "auto",
            "--log.no-progress", *shlex.split(cfg.common), *shlex.split(cfg.algo_flags().get(algo, ""))]


STOP_FILE = "study_stop.json"


def run_dir_of(out: Path, algo: str, seed: int) -> Path:
    return out / "runs" / f"{algo}_s{seed}"


def held_threshold(rows: list[dict], threshold: float, count: int) -> bool:
    """The last `count` evaluations (at least `count` after the one before training) all reach `threshold`."""
    successes = [success for _, success in success_curve(rows)][1:]
    return count > 0 and len(successes) >= count and all(v >= threshold for v in successes[-count:])


def run_all(pending: list[tuple[str, list[str], Path]], jobs: int, stop=None, poll_s: float = 5.0) -> None:
    """Run the commands, `jobs` at a time; the first failure stops the rest (runs already started finish).
    `stop(rows)`, polled every `poll_s` seconds on the run's metrics, ends a run early (SIGTERM) when true."""
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    lock = threading.Lock()

    def say(line: str) -> None:  # whole lines: the runs' threads print at the same moments
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def one(name: str, command: list[str], run_dir: Path) -> None:
        say(f"study: {name}: {shlex.join(command)}")
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") if jobs > 1 else contextlib.nullcontext() as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
            stopped = False
            while proc.poll() is None:
                try:
                    proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    if not stopped and stop is not None and stop(read_rows(run_dir, partial_ok=True)):
                        stopped = True  # SIGTERM: the trainer saves a checkpoint and exits
                        (run_dir / STOP_FILE).write_text(json.dumps({"reason": "threshold held"}))
                        proc.send_signal(signal.SIGTERM)
        if proc.returncode != 0 and not stopped:
            where = f"; its output is in {run_dir / 'train.log'}" if jobs > 1 else ""
            raise subprocess.CalledProcessError(proc.returncode, command, output=f"{name} failed{where}")
        say(f"study: {name}: {'stopped at the threshold' if stopped else 'done'}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, *item) for item in pending]
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()


def run_study(cfg: StudyConfig, argv: list[str] | None = None) -> list[dict]:
    if cfg.episodes <= 0 or not 0 < cfg.threshold <= 1 or not cfg.seeds or cfg.jobs < 1 or cfg.stop_after < 0:
        raise ValueError("--episodes must be positive, --threshold in (0, 1], --seeds not empty, --jobs ≥ 1, "
                         "--stop-after ≥ 0")
    flags = cfg.algo_flags()
    iterations_of = {}
    for algo in cfg.algos:  # every run's config is parsed and validated before any run starts
        train_cfg = parse_config(["--config", cfg.preset, "--algo", algo, *shlex.split(cfg.common),
                                  *shlex.split(flags.get(algo, ""))])
        train_cfg.validate(world_size=cfg.nproc)
        iterations_of[algo] = math.ceil(cfg.episodes / train_cfg.rollout.num_envs)
    out = Path(cfg.out)
    commands, pending = [], []
    for algo in cfg.algos:
        for seed in cfg.seeds:
            run_dir = run_dir_of(out, algo, seed)
            command = train_command(cfg, algo, seed, iterations_of[algo], run_dir)
            commands.append(shlex.join(command))
            complete = any(r["iteration"] >= iterations_of[algo] for r in read_rows(run_dir))
            if not complete and not (run_dir / STOP_FILE).is_file():
                pending.append((f"{algo} seed {seed}", command, run_dir))
    if not cfg.dry_run:
        stop = (lambda rows: held_threshold(rows, cfg.threshold, cfg.stop_after)) if cfg.stop_after else None
        run_all(pending, cfg.jobs, stop)
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {
        algo: {seed: success_curve(read_rows(run_dir_of(out, algo, seed))) for seed in cfg.seeds}
        for algo in cfg.algos}
    rows = summarize(curves, cfg.threshold)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(cfg.preset).stem}: {cfg.episodes:,} episodes per run"
    (out / "study.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "iterations": iterations_of,
                                                "rows": rows, "curves": curves}, indent=1))
    stopped = [run_dir.name for run_dir in (run_dir_of(out, algo, seed) for algo in cfg.algos for seed in cfg.seeds)
               if (run_dir / STOP_FILE).is_file()]
    note = (f"\n\nRuns ended once {cfg.stop_after} consecutive evaluations reached {cfg.threshold:g} "
            f"(`--stop-after {cfg.stop_after}`; their final success is their last logged evaluation, which can "
            f"come a few iterations after the stop signal): "
            f"{', '.join(stopped) or 'none'}." if cfg.stop_after else "")
    study = f"\n\nThe study: `{shlex.join(['python', '-m', 'fastarcher.study', *argv])}`" if argv is not None else ""
    (out / "study.md").write_text(f"# {title}\n\n{table(rows, cfg.threshold)}{note}{study}\n\nCommands:\n\n```\n"
                                  + "\n".join(commands) + "\n```\n")
    plot(curves, out / "study.png", title)
    print(table(rows, cfg.threshold))
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.cli(StudyConfig, args=argv)
    try:
        run_study(cfg, sys.argv[1:] if argv is None else argv)
    except (ValueError, subprocess.CalledProcessError) as error:
        print(f"study: {error}" + (f" ({error.output})" if getattr(error, "output", None) else ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
