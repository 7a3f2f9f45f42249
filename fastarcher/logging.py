"""Run outputs: console progress (rich), metrics.jsonl, optional wandb, and the learning-curve plot.

Only rank 0 writes. `metrics.jsonl` holds one JSON object per line: {"iteration": i, key: value, ...};
evaluation rows carry `eval/*` keys. It is opened at the first row, after the checkpointer has decided
what the run continues (a resume rewrites it, a fresh start moves an earlier run's file aside).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

CONSOLE_KEYS = (
    ("rollout/success_rate", "succ", "{:.2f}"),
    ("rollout/return_mean", "ret", "{:+.2f}"),
    ("rollout/invalid_rate", "inv", "{:.2f}"),
    ("critic/q_loss", "qL", "{:.3f}"),
    ("critic/v_loss", "vL", "{:.3f}"),
    ("actor/advantage_mean", "adv", "{:+.3f}"),
    ("actor/entropy", "ent", "{:.2f}"),
    ("eval/success_rate", "EVAL", "{:.2f}"),
    ("perf/tokens_per_s", "tok/s", "{:.0f}"),
)


WANDB_ID_FILE = "wandb_run_id"
"""Run folder file holding the W&B run id, so that a resumed run (same run folder) continues the same W&B run."""


def _init_wandb(run_dir: Path, config: dict, project: str):
    """`wandb.init` for this run folder: a new run the first time, the same run (resume='allow') after."""
    import secrets

    import wandb

    log = config.get("log", {})
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not re.fullmatch(r"[a-z0-9]{8,32}", run_id):  # absent, or not an id this code wrote: start a new run
        run_id = secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, entity=log.get("wandb_entity"), name=log.get("wandb_name") or run_dir.name,
                      group=log.get("wandb_group"), tags=list(log.get("wandb_tags") or ()) or None, config=config,
                      dir=str(run_dir), mode=mode, id=run_id, resume="allow")


class RunLogger:
    def __init__(self, run_dir: str | Path, *, is_main: bool, total_iterations: int, progress: bool = True,
                 wandb_config: dict | None = None, wandb_project: str = "fastarcher"):
        """wandb_config: the run's config as a dict, or None for no W&B; its `log.wandb_*` fields name the run."""
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.console = Console(stderr=True)
        self.history: list[dict] = []
        self._progress = None
        self._wandb = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = None  # opened at the first row
        if progress:
            self._progress = Progress(
                TextColumn("[bold]iteration"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_iterations)
            self._progress.start()
        if wandb_config is not None:
            self._wandb = _init_wandb(self.run_dir, wandb_config, wandb_project)

    def print(self, message: str) -> None:
        if self.is_main:
            self.console.print(message, soft_wrap=True)  # one line per message, also in a log file

    def log(self, iteration: int, metrics: dict[str, float], advance: bool = True) -> None:
        if not self.is_main:
            return
        row = {"iteration": iteration, **metrics}
        self.history.append(row)
        if self._file is None:
            self._file = open(self.run_dir / "metrics.jsonl", "a")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=iteration)
        parts = [f"it {iteration:4d}"]
        for key, short, fmt in CONSOLE_KEYS:
            if key in metrics:
                parts.append(f"{short} {fmt.format(metrics[key])}")
        self.console.print("  ".join(parts), soft_wrap=True)
        if self._progress is not None and advance:
            self._progress.advance(self._task)

    # a run-wide checkpoint part: the metric history, and metrics.jsonl rewritten to match it on resume
    checkpoint_scope = "run"

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
            raise ValueError("the metric history is not a list of objects")
        self.history = list(history)
        self._rewrite(self.history)

    def start_fresh(self, *, keep_earlier: bool) -> None:
        """A run that starts from iteration 0: keep an earlier run's metrics beside the new file
        (`keep_earlier`), or drop the rows of an attempt that died before its first checkpoint."""
        if not self.is_main:
            return
        if not keep_earlier:
            self._rewrite([])
        elif (kept := set_aside_metrics(self.run_dir / "metrics.jsonl")) is not None:
            self.print(f"starting fresh; the earlier run's metrics were moved to {kept}")

    def _rewrite(self, rows: list[dict]) -> None:
        """Make metrics.jsonl hold exactly `rows` (rank 0; the logger appends to it afterwards)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.parent.is_dir():
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()


def set_aside_metrics(path: str | Path) -> Path | None:
    """Rename a non-empty metrics file to metrics.<time>.jsonl beside it (a fresh start keeps the old rows);
    returns the new path, or None when there was nothing to keep."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}.jsonl"), 1
    while kept.exists():  # two fresh starts within a second
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}.jsonl"), n + 1
    os.replace(path, kept)
    return kept


def plot_learning_curves(history: list[dict], path: str | Path, *, random_success: float | None = None,
                         random_return: float | None = None, title: str = "") -> None:
    """PNG with eval success rate and eval return per iteration (training rollouts dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label, ref in (
        (axes[0], "success_rate", "success rate", random_success),
        (axes[1], "return_mean", "return", random_return),
    ):
        evals = [(r["iteration"], r[f"eval/{key}"]) for r in history if f"eval/{key}" in r]
        trains = [(r["iteration"], r[f"rollout/{key}"]) for r in history if f"rollout/{key}" in r]
        if evals:
            ax.plot(*zip(*evals), "o-", label="greedy eval")
        if trains:
            ax.plot(*zip(*trains), "--", alpha=0.6, label="training rollouts (sampled)")
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle=":", label="random valid actions")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
