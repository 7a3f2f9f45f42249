"""Checkpointer: save / maybe_save / restore of a dict of checkpoint parts in one run folder.

Every method is collective (all ranks call it); a failure on any rank is raised as the same
CheckpointError on every rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from fastarcher.checkpoint.compat import compare_configs
from fastarcher.checkpoint.files import (
    FORMAT_VERSION, LATEST, MANIFEST, RUN_STATE, TMP_PREFIX, check_checkpoint, checkpoint_folder_of, checkpoint_name,
    describe_files, fsync_dir, fsync_file, iteration_of, list_checkpoints, relative_files, resume_candidates,
    write_atomic,
)
from fastarcher.checkpoint.parts import check_parts
from fastarcher.checkpoint.safe_load import SINGLE_PROCESS_WARNING, CheckpointError, load_dcp
from fastarcher.dist import (
    all_gather_object, any_rank, barrier, broadcast_object, failure_reason, fault_point, on_every_rank, on_main,
    raise_first,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that save at the end of the iteration and stop (checkpoint.save_on_sigterm)."""


class RankFile(Mapping):
    """One rank's file of a per-rank part as a read-only mapping: tensors are read on access (pooling
    many large replay shards then holds one field at a time), JSON values come from the metadata."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._tensors = list(f.keys())
            self._values = _json_values(f, self.path)

    def __getitem__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no entry {name!r}")
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter([*self._tensors, *self._values])

    def __len__(self) -> int:
        return len(self._tensors) + len(self._values)


def save_rank_file(state: Mapping[str, Any], path: Path) -> None:
    """Tensors into safetensors, everything else as one sorted JSON metadata entry: the bytes depend only
    on the state (safetensors writes several metadata entries in hash order, which changes per save)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    save_file(tensors, str(path), metadata={"json": json.dumps(values, sort_keys=True)})


def load_rank_file(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        values = _json_values(f, path)
    return {**load_file(str(path), device="cpu"), **values}


def _json_values(f, path) -> dict[str, Any]:
    """The non-tensor values `save_rank_file` keeps in the file's metadata (an object, or the file is refused)."""
    values = json.loads((f.metadata() or {}).get("json", "{}"))
    if not isinstance(values, dict):
        raise ValueError(f"{path}: its JSON metadata is not an object")
    return values


def rank_file(folder: Path, part: str, rank: int) -> Path:
    return folder / part / f"rank_{rank:05d}.safetensors"


class Checkpointer:
    """Saves and restores `parts` (see fastarcher/checkpoint/parts.py for the contract) in `run_dir`.

    `config` (a JSON-able dict of the run's config) is stored with every checkpoint and compared on
    resume; `device` ('cpu', 'cuda') decides whether per-rank random streams can be restored.
    """

    def __init__(self, cfg, run_dir: str | Path, parts: Mapping[str, Any] | None = None, *, config: dict | None = None,
                 device: str = "cpu", rank: int = 0, world_size: int = 1, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.parts = dict(parts or {})
        check_parts(self.parts)
        self.config = json.loads(json.dumps(config or {}))  # tuples → lists, as in the saved copy
        self.device = device
        self.rank, self.world_size = rank, world_size
        self._log = log or (lambda message: print(message, flush=True) if rank == 0 else None)
        self.last_saved_iteration: int | None = None
        self.resumed_from: Path | None = None
        self._stop_requested: str | None = None  # the name of the signal that asked to stop
        self._previous_handler = None
        self.timings: dict[str, float] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.is_main:
            self._log(message)

    def _scope(self, scope: str) -> dict[str, Any]:
        return {name: part for name, part in self.parts.items() if part.checkpoint_scope == scope}

    # ------------------------------------------------------------------ save

    def maybe_save(self, iteration: int, *, last: bool = False) -> Path | None:
        """Save when the iteration is a multiple of save_every or the last one; on SIGTERM, save and stop."""
        fault_point("iteration")
        due = (self.cfg.save_every and iteration % self.cfg.save_every == 0) or last
        stop = self.cfg.save_on_sigterm and any_rank(self._stop_requested)
        path = self.save(iteration) if (due or stop) and self.last_saved_iteration != iteration else None
        if stop:
            self._uninstall_sigterm()
            where = path or self.folder / checkpoint_name(iteration)
            name = self._stop_requested or "a signal on another rank"
            raise SystemExit(f"stopped by {name} after saving {where}; run the same command with "
                             f"--checkpoint.resume auto to continue from iteration {iteration}")
        return path

    def save(self, iteration: int) -> Path:
        """Write a complete checkpoint of `iteration` and point `latest` at it."""
        t0 = time.perf_counter()
        it = iteration
        self._refuse_unsaveable(it)
        final = self.folder / checkpoint_name(it)
        tmp = self.folder / f"{TMP_PREFIX}{checkpoint_name(it)}"
        failed = f"cannot save {final}"  # every failure below is raised alike on every rank
        per_rank = self._scope("rank")

        def prepare() -> None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            for name in per_rank:
                (tmp / name).mkdir()

        on_main(prepare, failed, CheckpointError)
        sharded = {name: part for name, part in self._scope("sharded").items()
                   if not hasattr(part, "has_state") or part.has_state()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
                dcp.save({name: part.state_dict() for name, part in sharded.items()}, checkpoint_id=str(tmp / "model"))
        except (dcp.CheckpointException, OSError) as error:  # DCP gathers every rank's failure
            failures = getattr(error, "failures", {}).values() or [error]
            raise_first(sorted({failure_reason(f[0] if isinstance(f, tuple) else f) for f in failures}), failed,
                        CheckpointError)
        t_model = time.perf_counter()

        def write_rank_files() -> None:
            for name, part in per_rank.items():
                path = rank_file(tmp, name, self.rank)
                save_rank_file(part.state_dict(), path)
                fsync_file(path)
            if self.is_main:
                state = {"format": FORMAT_VERSION, "iteration": it, "world_size": self.world_size,
                         "device": self.device, "config": self.config, "sharded": list(sharded),
                         "parts": {name: part.state_dict() for name, part in self._scope("run").items()}}
                write_atomic(tmp / RUN_STATE, json.dumps(state))

        on_every_rank(write_rank_files, failed, CheckpointError)
        # every rank checksums a share of the files; rank 0 writes the manifest and renames
        names = broadcast_object(relative_files(tmp) if self.is_main else None)
        described = {}
        for part in all_gather_object(describe_files(tmp, names[self.rank::self.world_size],
                                                     checksum=self.cfg.verify == "crc32")):
            described.update(part)

        def publish() -> None:
            manifest = {"format": FORMAT_VERSION, "iteration": it, "world_size": self.world_size,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": described}
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            old = self.folder / f"{TMP_PREFIX}replaced-{final.name}"
            if final.exists():  # an older save of the same iteration: moved out first, deleted once replaced
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.folder)
            shutil.rmtree(old, ignore_errors=True)
            write_atomic(self.folder / LATEST, final.name + "\n")
            self._prune()

        on_main(publish, failed, CheckpointError)
        self.last_saved_iteration = it
        total = time.perf_counter() - t0
        self.timings = {"save_s": total, "save_model_s": t_model - t0}
        size = sum(d["size"] for d in described.values())
        self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB, {total:.2f} s)")
        return final

    def _refuse_unsaveable(self, iteration: int) -> None:
        """A part that must not be saved (non-finite weights) stops the save before anything is written."""
        problems = [f"the {name} {problem}" for name, part in self._scope("sharded").items()
                    if hasattr(part, "save_problem") and (problem := part.save_problem())]
        if problems:
            raise CheckpointError(f"refusing to save iteration {iteration}: {'; '.join(problems)}; the checkpoints "
                                  f"already in {self.folder} are untouched, resume from the last one with "
                                  f"--checkpoint.resume auto and a lower learning rate")

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (rank 0 only)."""
        complete = [p for p in list_checkpoints(self.folder) if (p / MANIFEST).is_file()]
        for old in complete[self.cfg.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self, iteration: int) -> None:
        """The end of a run: a checkpoint of the last iteration, if not saved already."""
        if self.last_saved_iteration != iteration:
            self.save(iteration)
        self._uninstall_sigterm()

    # ------------------------------------------------------------------ resume

    def resolve(self) -> Path | None:
        """The checkpoint to resume from according to cfg.resume (collective; same answer on all ranks)."""
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            return self._first_valid(self.folder, required=False)
        path = Path(mode)
        explicit = on_main(lambda: (path / MANIFEST).exists() or iteration_of(path) is not None,
                           f"checkpoint.resume {mode!r} cannot be read", CheckpointError)
        if explicit:
            problems = check_checkpoint(path, verify=self.cfg.verify)
            if problems:
                raise CheckpointError(f"checkpoint.resume {str(path)!r} cannot be used: " + "; ".join(problems)
                                      + ". Pick another checkpoint or use --checkpoint.resume auto")
            return path
        folder = on_main(lambda: checkpoint_folder_of(path), f"checkpoint.resume {mode!r} cannot be read",
                         CheckpointError)
        return self._first_valid(folder, required=True)

    def _first_valid(self, folder: Path, *, required: bool) -> Path | None:
        candidates = on_main(lambda: resume_candidates(folder), f"cannot list the checkpoints in {folder}",
                             CheckpointError)
        rejected = []
        for candidate in candidates:
            problems = check_checkpoint(candidate, verify=self.cfg.verify)
            if not problems:
                if rejected:
                    self.log(f"checkpoint: falling back to {candidate} (newer ones unusable: see above)")
                return candidate
            rejected.append(candidate)
            self.log(f"checkpoint: skipping {candidate}: " + "; ".join(problems))
        if rejected:
            raise CheckpointError(
                f"found {len(rejected)} checkpoint(s) in {folder} and none is usable (reasons above). Nothing was "
                f"deleted. Move the broken folders away to start over from an older one, or pass "
                f"--checkpoint.resume none to start fresh")
        if required:
            raise CheckpointError(f"checkpoint.resume {self.cfg.resume!r}: no checkpoint (iter_* folder) found in "
                                  f"{folder}")
        return None

    def restore(self) -> int | None:
        """Resume according to cfg.resume: the iteration resumed at, or None for a fresh start (earlier
        checkpoints in the run folder are then moved aside). Also installs the SIGTERM/SIGINT handler."""
        fault_point("resume")
        path = self.resolve()
        if path is None:
            on_main(self._set_aside_earlier_run, f"cannot start fresh in {self.run_dir}", CheckpointError)
            self._install_sigterm()
            return None
        t0 = time.perf_counter()
        iteration = self.load(path)
        self._set_aside_newer(path, iteration)
        self.resumed_from = path
        self.last_saved_iteration = iteration
        self.timings["load_s"] = time.perf_counter() - t0
        self.log(f"checkpoint: resumed from {path} at iteration {iteration} ({self.timings['load_s']:.2f} s)")
        self._install_sigterm()
        return iteration

    def _set_aside_earlier_run(self) -> None:
        """Rank 0: move an earlier run's checkpoints aside; delete nothing."""
        existing = list_checkpoints(self.folder)
        if existing:
            aside = self.folder / time.strftime("replaced-%Y%m%d-%H%M%S")
            aside.mkdir()
            for path in existing:
                os.replace(path, aside / path.name)
            (self.folder / LATEST).unlink(missing_ok=True)
            self.log(f"checkpoint: starting fresh (checkpoint.resume {self.cfg.resume}); the {len(existing)} "
                     f"checkpoint(s) already in {self.folder} were moved to {aside}")

    def _set_aside_newer(self, path: Path, iteration: int) -> None:
        """Checkpoints in this run folder newer than the one resumed from belong to an abandoned
        stretch of the run (or were unusable): move them aside so saves and `auto` never mix them in."""

        def move_newer() -> None:
            if path.parent.resolve() != self.folder.resolve():
                return
            newer = [p for p in list_checkpoints(self.folder) if iteration_of(p) > iteration]
            if newer:
                aside = self.folder / time.strftime("set-aside-%Y%m%d-%H%M%S")
                aside.mkdir()
                for p in newer:
                    os.replace(p, aside / p.name)
                write_atomic(self.folder / LATEST, path.name + "\n")
                self.log(f"checkpoint: moved {len(newer)} checkpoint(s) newer than {path.name} to {aside}")

        on_main(move_newer, f"cannot set aside the checkpoints newer than {path}", CheckpointError)

    def load(self, path: Path) -> int:
        """Load checkpoint `path` into the parts (no validation, no pointer changes; restore() does those);
        returns its iteration."""
        state = on_every_rank(lambda: _run_state(path), f"cannot read {path / RUN_STATE}", CheckpointError)
        self._check_config(path, state["config"])
        iteration, saved_world = int(state["iteration"]), int(state["world_size"])
        same_layout = saved_world == self.world_size and state["device"] == self.device
        if saved_world != self.world_size:
            self.log(f"checkpoint: {path} was written by {saved_world} process(es), this run has "
                     f"{self.world_size}: models and optimizers are resharded, per-rank state (replay shards, "
                     f"random streams) is pooled or derived again; the run continues but is not bit-identical "
                     f"to an uninterrupted one")
        missing = [name for name in self._scope("run") if name not in state["parts"]]
        missing += [name for name, part in self._scope("sharded").items()
                    if name not in state["sharded"] and not hasattr(part, "has_state")]
        if missing:
            raise CheckpointError(f"cannot resume from {path}: it holds no state for {', '.join(missing)}")
        sharded = {name: part for name, part in self._scope("sharded").items() if name in state["sharded"]}
        dcp_state = {name: part.state_dict() for name, part in sharded.items()}
        load_dcp(dcp_state, path / "model")
        for name, part in sharded.items():
            part.load_state_dict(dcp_state[name])

        def load_rank_parts() -> None:
            for name, part in self._scope("rank").items():
                try:
                    if same_layout:
                        file = rank_file(path, name, self.rank)
                        what = f"{file} cannot be loaded"
                        part.load_state_dict(load_rank_file(file))
                    elif hasattr(part, "load_resharded"):
                        what = f"the {name} shards of {path} cannot be redistributed"
                        shards = [RankFile(rank_file(path, name, k)) for k in range(saved_world)]
                        part.load_resharded(shards, self.rank, self.world_size, iteration)
                except (ValueError, KeyError, TypeError) as error:  # a damaged or foreign file
                    raise CheckpointError(f"{what}: {error.args[0] if error.args else error}") from error

        on_every_rank(load_rank_parts, f"cannot load the per-rank state of {path}", CheckpointError)
        run_parts = self._scope("run")
        on_every_rank(lambda: [part.load_state_dict(state["parts"][name]) for name, part in run_parts.items()],
                      f"cannot load the run state of {path}", CheckpointError)
        barrier()
        return iteration

    def _check_config(self, path: Path, saved: dict) -> None:
        fatal, changed = compare_configs(saved, self.config)
        if fatal:
            listing = ", ".join(f"{k}={a!r} in the checkpoint but {b!r} now" for k, a, b in fatal[:6])
            raise CheckpointError(f"cannot resume from {path}: {listing}. These fields shape the saved model or "
                                  f"replay data; resume with the checkpoint's values or start a new run folder "
                                  f"(--log.run-dir)")
        if changed:
            self.log("checkpoint: resuming with changed settings: " +
                     ", ".join(f"{k} {a!r} → {b!r}" for k, a, b in changed))

    # ------------------------------------------------------------------ SIGTERM and SIGINT

    def _install_sigterm(self) -> None:
        """SIGTERM (preemption, torchrun stopping the group, the launcher's death) and SIGINT (Ctrl-C, which
        torchrun passes on) both save at the end of the iteration and stop."""
        if not self.cfg.save_on_sigterm or self._previous_handler is not None:
            return
        try:
            self._previous_handler = {sig: signal.signal(sig, self._on_sigterm) for sig in STOP_SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous_handler = None

    def _uninstall_sigterm(self) -> None:
        if self._previous_handler is not None:
            for sig, handler in self._previous_handler.items():
                signal.signal(sig, handler)
            self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now, unsaved
            raise KeyboardInterrupt
        self._stop_requested = self._stop_requested or name
        print(f"[rank {self.rank}] {name}: saving a checkpoint at the end of this iteration, then stopping",
              flush=True)


def _run_state(path: Path) -> dict:
    """state.json, checked for the keys the load reads (the file is untrusted input)."""
    state = json.loads((path / RUN_STATE).read_text())
    if not isinstance(state, dict):
        raise ValueError(f"{RUN_STATE} is not a JSON object")
    kinds = {"iteration": int, "world_size": int, "device": str, "config": dict, "sharded": list, "parts": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise ValueError(f"{RUN_STATE} lacks or mistypes {', '.join(wrong)}")
    return state
