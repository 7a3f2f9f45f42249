"""Checkpoints that resume a run exactly: sharded model and optimizer state (DCP), each rank's replay
shard, every random stream, the iteration counter and the metric history.

    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --config configs/tiny_cpu.yaml \
        --checkpoint.save-every 5 --checkpoint.resume auto

Layout of `<log.run_dir>/checkpoints/` (see docs/checkpointing.md):

    iter_000010/
      model/                       torch.distributed.checkpoint: policy, critic, target critic and
                                   both optimizers, one .distcp file per rank plus .metadata
      replay/rank_00000.safetensors  each rank's replay shard (storage tensors + write pointer)
      rng/rank_00000.safetensors     torch / numpy / python global RNG, the trainer's generators
      trainer.json                 iteration, config, metric history, random baseline, guard counters
      manifest.json                written last: every file with its size and CRC-32
    latest                         text file naming the newest complete checkpoint

A save writes everything into `.tmp-iter_000010/`, fsyncs it, writes the manifest and then renames
the folder: a crash mid-write leaves only a hidden `.tmp-*` folder, which is never a resume candidate
and is removed by the next save. A checkpoint is untrusted input and loading it never runs code: DCP's
`.metadata` is unpickled through an allow-list of DCP's own classes, its non-tensor items (optimizer
hyperparameters) only where the state being loaded into expects one, with `weights_only=True` and a
type check; safetensors for the rest, JSON for metadata (docs/checkpointing.md, "Threat model").

`checkpoint.resume`:
- `auto`: the checkpoint named by `latest`, else the newest other one; a checkpoint that fails its
  manifest check (missing/truncated/corrupt file) is reported and the previous one is tried. With no
  checkpoint the run starts fresh; with checkpoints but none valid the run stops (nothing is deleted).
- `PATH`: a checkpoint folder, or a run folder / checkpoints folder (then as `auto` inside it);
  a bad checkpoint is an error, no fallback.
- `none`: start fresh; checkpoints already in the run folder are moved aside, never deleted.

Resuming with another world size works but is not bit-exact: DCP reshards the models and optimizers,
the replay shards are pooled and dealt out again (oldest first, so a full buffer keeps the newest
rows), and the per-rank random streams are re-derived from (seed, rank, iteration).

The trainer is read through these attributes: policy, critic, target, actor_opt, critic_opt, buffer,
sample_gen, buffer_gen, cpu_gen, py_rng, iteration, cfg, and optionally random_baseline,
start_metrics, last_eval, logger (history, print), guard (state_dict), runner, eval_runner and
sync_engine() (called after a restore so the rollout engine holds the restored policy).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import warnings
import zlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastarcher.dist import fault_point
from fastarcher.guards import parameters_within
from fastarcher.logging import set_aside_metrics
from fastarcher.replay import ShardFile, load_shard, redistribute, save_shard

FORMAT_VERSION = 1
"""Bumped when the layout changes; older checkpoints are refused with a message."""
CHECKPOINT_RE = re.compile(r"^iter_(\d{6,})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
LATEST = "latest"
_CHUNK = 16 << 20
_SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process.*"

MUST_MATCH = ("algo", "model", "critic", "replay", "env")
"""Config sections that shape the saved tensors or the data: a resume with other values is refused."""
FREE_TO_CHANGE = ("iterations", "config", "device", "log", "checkpoint", "eval", "guard")
"""Config sections a resume may change silently (anything else changed is reported)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""Signals that save at the end of the iteration and stop (checkpoint.save_on_sigterm)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it, says why, and what to do."""


# --------------------------------------------------------------------------------------------------
# DCP's `.metadata` file is a pickle that torch reads with plain `pickle.load`, and its default load
# planner unpickles every non-tensor item with `torch.load(weights_only=False)`. Both are replaced here,
# so a planted checkpoint cannot run code: the metadata through an allow-list of DCP's own classes, the
# non-tensor items by SafeLoadPlanner. DCP itself reads tensors with torch.load(weights_only=True).


def _metadata_globals() -> set[tuple[str, str]]:
    import torch.distributed.checkpoint.metadata as meta_module

    allowed = {(meta_module.__name__, name) for name, obj in vars(meta_module).items()
               if isinstance(obj, type) and obj.__module__ == meta_module.__name__}
    allowed |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
                ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        raise CheckpointError(f"DCP metadata asks for {module}.{name}, which no checkpoint needs; refusing to load it "
                              f"(the file may have been tampered with)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled with an allow-list of DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if not _MetadataUnpickler.allowed:
            _MetadataUnpickler.allowed = _metadata_globals()
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        for info in getattr(metadata, "storage_data", {}).values():  # DCP writes plain file names
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"DCP metadata points at {name!r}, outside the checkpoint folder; refusing "
                                      f"to load it (the file may have been tampered with)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_PLAIN = (type(None), bool, int, float, str, list, tuple, dict)


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return "sequence" if isinstance(value, (list, tuple)) else type(value).__name__


def _is_plain(value: Any) -> bool:
    """Only None, bools, numbers, strings and lists/tuples/dicts of those (what optimizers keep)."""
    if isinstance(value, (list, tuple)):
        return type(value) in (list, tuple) and all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value) is dict and all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return type(value) in _PLAIN


def plain_value_problem(loaded: Any, expected: Any) -> str | None:
    """Why `loaded` cannot replace `expected` (None when it can): it must be plain and, unless either side
    is None (an optional setting), of the same kind (a number for a number, a sequence for a sequence)."""
    optional = loaded is None or expected is None
    if not _is_plain(loaded) or (not optional and _kind(loaded) != _kind(expected)):
        return f"holds a {type(loaded).__name__} where a {_kind(expected)} is expected"
    return None


def _unpickling_reason(error: Exception) -> str:
    """The one line of torch's weights-only refusal that names what was refused (the rest is boilerplate)."""
    lines = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "unsupported" in line.lower()), lines[-1] if lines else repr(error))


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads a non-tensor item only where the state being loaded into holds a
    non-tensor, with `torch.load(weights_only=True)`, and keeps it only if it is a plain value of the
    expected kind. (torch's own planner unpickles whatever the metadata declares with weights_only=False.)"""

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                self._expected(item)  # refused before a single byte is read
        return plan

    def _expected(self, item: ReadItem) -> Any:
        fqn = item.dest_index.fqn
        expected = self.state_dict[fqn]
        if isinstance(expected, Tensor):
            raise CheckpointError(f"the checkpoint declares {fqn} a non-tensor item, but it is a tensor; refusing "
                                  f"to read it (the file may have been tampered with)")
        return expected

    def load_bytes(self, read_item: ReadItem, value) -> None:
        fqn = read_item.dest_index.fqn
        expected = self._expected(read_item)
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as error:  # the weights-only unpickler's refusal, or bytes that are no pickle at all
            raise CheckpointError(f"{fqn} cannot be read as a plain value ({_unpickling_reason(error)}); refusing "
                                  f"to load it (the file may have been tampered with)") from None
        problem = plain_value_problem(loaded, expected)
        if problem:
            raise CheckpointError(f"{fqn} {problem}; refusing to load it (the file may have been tampered with)")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _failure_reason(failure: Any) -> str:
    """The last line of what one rank raised (DCP records each failure as (exception, traceback))."""
    exception = failure[0] if isinstance(failure, tuple) else failure
    lines = str(exception).strip().splitlines()
    return lines[-1].strip() if lines else type(exception).__name__


def load_dcp(state: dict, folder: str | Path) -> None:
    """dcp.load into `state` (in place) through the allow-listed metadata reader and the safe planner."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner())
    except dcp.CheckpointException as error:  # one failure per rank, each wrapping the real exception
        reasons = {_failure_reason(f) for f in error.failures.values()}
        raise CheckpointError(f"cannot load the model state in {folder}: {'; '.join(sorted(reasons))}") from error


# --------------------------------------------------------------------------------------------------
# small distributed helpers (identity when there is no process group)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one tiny all-reduce)."""
    if _world()[1] == 1:
        return flag
    return any(_all_gather(bool(flag)))


# A rank that raises while its peers wait in a collective would leave them waiting: file operations that
# can fail on one rank only run through these two, which share the outcome and raise the same
# CheckpointError on every rank.


def _reason(error: BaseException) -> str:
    # safetensors reports I/O errors as its own type, with the OS message in the text
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
        return ("the disk is full (No space left on device); free space there or lower checkpoint.keep_last, "
                "then resume with --checkpoint.resume auto")
    if isinstance(error, (OSError, CheckpointError)):
        return str(error)
    return f"{type(error).__name__}: {error}"  # e.g. a file that is not UTF-8 or not JSON


def _outcome(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 - every local failure must reach the other ranks
        return None, _reason(error)


def _raise_if(errors: list[str | None], context: str) -> None:
    errors = [e for e in errors if e is not None]
    if errors:
        raise CheckpointError(f"{context}: {errors[0]}")


def _on_main(fn: Callable[[], Any], context: str) -> Any:
    """fn() on rank 0 only; every rank returns its result, or raises the same CheckpointError."""
    result, error = _outcome(fn) if _world()[0] == 0 else (None, None)
    result, error = _broadcast((result, error))
    _raise_if([error], context)
    return result


def _on_every_rank(fn: Callable[[], Any], context: str) -> Any:
    """fn() on every rank; if it fails on any, every rank raises the same CheckpointError."""
    result, error = _outcome(fn)
    _raise_if(_all_gather(error), context)
    return result


# --------------------------------------------------------------------------------------------------
# files


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def iteration_of(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass


def _write_atomic(path: Path, text: str) -> None:
    """Write text to `path` via a temp file + fsync + rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _describe_files(folder: Path, names: list[str], checksum: bool) -> dict[str, dict]:
    out = {}
    for name in names:
        path = folder / name
        out[name] = {"size": path.stat().st_size, **({"crc32": file_crc32(path)} if checksum else {})}
    return out


def check_checkpoint(path: str | Path, *, verify: str = "crc32") -> list[str]:
    """Problems that make `path` unusable (empty list = usable), checked against its manifest.

    Collective when a process group exists: each rank checksums a share of the files and every rank
    returns the same list. verify: 'crc32' (sizes and checksums) or 'size'.
    """
    path = Path(path)
    rank, world = _world()
    problems: list[str] = []
    manifest = None
    try:
        if not path.is_dir():
            problems.append(f"{path} is not a folder")
        elif not (path / MANIFEST).is_file():
            problems.append(f"{path} has no {MANIFEST} (the save did not finish)")
        else:
            manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path / MANIFEST} is unreadable ({error})")
    if manifest is not None and (shape := _manifest_shape_problem(manifest)):
        problems.append(f"{path / MANIFEST} {shape} (damaged or not written by fastarcher)")
    elif manifest is not None:
        if manifest.get("format") != FORMAT_VERSION:
            problems.append(f"{path} has checkpoint format {manifest.get('format')!r}; this fastarcher reads "
                            f"format {FORMAT_VERSION}")
        files = manifest.get("files", {})
        for i, name in enumerate(sorted(files)):
            if i % world != rank:
                continue
            want, file = files[name], path / name
            try:
                if not file.is_file():
                    problems.append(f"{file} is missing")
                    continue
                size = file.stat().st_size
                if size != want["size"]:
                    problems.append(f"{file} has {size} bytes, the manifest says {want['size']} "
                                    f"(truncated or replaced)")
                elif verify == "crc32" and "crc32" in want and file_crc32(file) != want["crc32"]:
                    problems.append(f"{file} fails its CRC-32 check (corrupted)")
            except OSError as error:  # on this rank only, perhaps: reported, never raised, so all ranks agree
                problems.append(f"{file} cannot be read ({error.strerror})")
    merged: list[str] = []
    for part in _all_gather(problems):
        merged.extend(p for p in part if p not in merged)
    return merged


def _manifest_shape_problem(manifest: Any) -> str | None:
    """What makes parsed manifest JSON unusable as a manifest (None when its shape is right)."""
    if not isinstance(manifest, dict):
        return f"is not a JSON object (it holds a {type(manifest).__name__})"
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return "is not a manifest: 'files' is not an object"
    for name, entry in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"names {name}, outside the checkpoint folder"
        if not isinstance(entry, dict) or type(entry.get("size")) is not int:
            return f"is not a manifest: {name} has no integer size"
    return None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """`iter_*` folders in `folder`, newest iteration first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=lambda p: iteration_of(p), reverse=True)


def read_latest(folder: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, or None when there is no usable pointer."""
    pointer = Path(folder) / LATEST
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):  # missing, unreadable or not text: like a garbage pointer
        return None
    return Path(folder) / name if CHECKPOINT_RE.match(name) else None


def resume_candidates(folder: str | Path) -> list[Path]:
    """Order in which `auto` tries checkpoints: the `latest` pointer's target, then the rest, newest first."""
    ordered = list_checkpoints(folder)
    latest = read_latest(folder)
    if latest is not None and latest in ordered:
        ordered.remove(latest)
        ordered.insert(0, latest)
    return ordered


def _checkpoint_folder_of(path: Path) -> Path:
    """A run folder or a checkpoints folder → the folder holding iter_* checkpoints."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


# --------------------------------------------------------------------------------------------------
# state pieces


def tied_aliases(module) -> dict[str, str]:
    """Second names of shared parameters (tied embeddings) → the first name; the same on every rank."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def model_state_without_aliases(module) -> dict[str, Any]:
    """get_model_state_dict minus tied duplicates (a tied 152k-vocabulary embedding is stored once)."""
    state = get_model_state_dict(module)
    for alias in tied_aliases(module):
        state.pop(alias, None)
    return state


def _set_model_state(module, state: dict[str, Any]) -> None:
    for alias, source in tied_aliases(module).items():
        state[alias] = state[source]
    set_model_state_dict(module, state)


def _model_state(trainer, optimizers: list[str]) -> dict[str, Any]:
    """DCP state dict: the three models and the named optimizers.

    An optimizer that has not stepped yet is left out: reading its state would make torch initialise it
    with a zero step (AdamW's step counter would then be one ahead of a run that never saved).
    """
    state: dict[str, Any] = {
        "policy": model_state_without_aliases(trainer.policy),
        "critic": model_state_without_aliases(trainer.critic),
        "target": model_state_without_aliases(trainer.target),
    }
    modules = {"actor_opt": (trainer.policy, trainer.actor_opt), "critic_opt": (trainer.critic, trainer.critic_opt)}
    for name in optimizers:
        module, optimizer = modules[name]
        state[name] = get_optimizer_state_dict(module, optimizer)
    return state


def _refuse_non_finite(trainer, folder: Path, iteration: int) -> None:
    """The guards stop a run before diverged weights get here; this is the last line (collective)."""
    bad = [name for name in ("policy", "critic", "target")
           if not parameters_within(getattr(trainer, name).parameters(), 0.0)[0]]
    if bad:
        raise CheckpointError(f"refusing to save iteration {iteration}: the {', '.join(bad)} weights are not finite "
                              f"(NaN/Inf); the checkpoints already in {folder} are untouched, resume from the last "
                              f"one with --checkpoint.resume auto and a lower learning rate")


def _stepped_optimizers(trainer) -> list[str]:
    return [name for name in ("actor_opt", "critic_opt") if getattr(trainer, name).state]


GENERATORS = ("sample_gen", "buffer_gen", "cpu_gen")
"""The trainer's torch.Generators (fresh-action sampling, replay sampling, minibatch orders)."""


def capture_rng(trainer) -> tuple[dict[str, Tensor], dict]:
    """This rank's random streams: tensors (torch states) and JSON (python / numpy / counters)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name in GENERATORS:
        tensors[f"gen_{name}"] = getattr(trainer, name).get_state()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "python": _py_state_to_json(random.getstate()),
        "py_rng": _py_state_to_json(trainer.py_rng.getstate()),
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "generator_devices": {name: getattr(trainer, name).device.type for name in GENERATORS},
        # the runners number their episodes (for the dropped-episode message); keep that numbering going
        "episode_counters": {name: getattr(getattr(trainer, name, None), "_episode_counter", None)
                             for name in ("runner", "eval_runner")},
    }
    return tensors, meta


def restore_rng(trainer, tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    for name in GENERATORS:
        getattr(trainer, name).set_state(tensors[f"gen_{name}"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_py_state_from_json(meta["python"]))
    trainer.py_rng.setstate(_py_state_from_json(meta["py_rng"]))
    for runner, count in meta.get("episode_counters", {}).items():
        if count is not None and hasattr(getattr(trainer, runner, None), "_episode_counter"):
            getattr(trainer, runner)._episode_counter = count


def reseed_rng(trainer, seed: int, rank: int, iteration: int) -> None:
    """Fresh per-rank streams for a resume that cannot restore them (other world size or device)."""
    base = (seed * 1_000_003 + 7919 * rank + 104_729 * (iteration + 1)) % 2**63
    torch.manual_seed(base)
    np.random.seed(base % 2**32)
    random.seed(base)
    for k, name in enumerate(GENERATORS):
        getattr(trainer, name).manual_seed(base + 1 + k)
    trainer.py_rng.seed(base + 5)


def _py_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]


def trainer_state(trainer) -> dict:
    """Rank-independent run state (JSON): counters, config, metric history, baselines, guard counters."""
    logger = getattr(trainer, "logger", None)
    guard = getattr(trainer, "guard", None)
    return {
        "format": FORMAT_VERSION,
        "iteration": int(trainer.iteration),
        "config": _config_dict(trainer.cfg),
        "random_baseline": getattr(trainer, "random_baseline", None),
        "start_metrics": getattr(trainer, "start_metrics", None),
        "last_eval": getattr(trainer, "last_eval", None),
        "history": list(getattr(logger, "history", []) or []),
        "guard": guard.state_dict() if guard is not None else None,
    }


def _config_dict(cfg) -> dict:
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


ABSENT = "<absent>"
"""Stands for a field one of the two configs does not have (written by another fastarcher version)."""


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, current value) for every leaf that differs (ABSENT if missing)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, ABSENT), current.get(key, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


# --------------------------------------------------------------------------------------------------
# replay shards


def save_replay_shard(buffer, path: Path, *, rank: int, world_size: int) -> None:
    save_shard(buffer, path, metadata={"rank": rank, "world_size": world_size})


def load_replay_shard(buffer, path: Path) -> None:
    try:
        load_shard(buffer, path)
    except ValueError as error:
        raise CheckpointError(f"replay shard {path} cannot be loaded: {error}") from error


def redistribute_replay(buffer, shard_paths: list[Path], rank: int, world_size: int) -> int:
    """Fill `buffer` with this rank's share of the rows of all old shards (see replay.redistribute);
    returns the rows added."""
    try:
        batch = redistribute([ShardFile(path) for path in shard_paths], rank, world_size)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"replay shards {shard_paths[0].parent} cannot be redistributed: {error.args[0]}") from error
    buffer.add(batch)
    return len(batch)


# --------------------------------------------------------------------------------------------------
# the manager


class Checkpointer:
    """save / maybe_save / restore / save_final for one run folder; every method is collective."""

    def __init__(self, cfg, run_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
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

    # ------------------------------------------------------------------ save

    def maybe_save(self, trainer) -> Path | None:
        """Save when the iteration is a multiple of save_every or the last one; on SIGTERM, save and stop."""
        fault_point("iteration")
        it = trainer.iteration
        due = (self.cfg.save_every and it % self.cfg.save_every == 0) or it >= trainer.cfg.iterations
        stop = self.cfg.save_on_sigterm and _any_rank(self._stop_requested)
        path = self.save(trainer) if (due or stop) and self.last_saved_iteration != it else None
        if stop:
            self._uninstall_sigterm()
            where = path or self.folder / checkpoint_name(it)
            name = self._stop_requested or "a signal on another rank"
            raise SystemExit(f"stopped by {name} after saving {where}; run the same command with "
                             f"--checkpoint.resume auto to continue from iteration {it}")
        return path

    def save(self, trainer) -> Path:
        """Write a complete checkpoint of the current iteration and point `latest` at it."""
        t0 = time.perf_counter()
        it = trainer.iteration
        _refuse_non_finite(trainer, self.folder, it)
        final = self.folder / checkpoint_name(it)
        tmp = self.folder / f"{TMP_PREFIX}{checkpoint_name(it)}"
        failed = f"cannot save {final}"  # every failure below is raised alike on every rank

        def prepare() -> None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "replay").mkdir(parents=True)
            (tmp / "rng").mkdir()

        _on_main(prepare, failed)
        optimizers = _stepped_optimizers(trainer)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
                dcp.save(_model_state(trainer, optimizers), checkpoint_id=str(tmp / "model"))
        except (dcp.CheckpointException, OSError) as error:  # DCP gathers every rank's failure
            failures = getattr(error, "failures", {}).values() or [error]
            _raise_if(sorted({_reason(f[0] if isinstance(f, tuple) else f) for f in failures}), failed)
        t_model = time.perf_counter()

        def write_rank_files() -> None:
            shard = tmp / "replay" / f"rank_{self.rank:05d}.safetensors"
            save_replay_shard(trainer.buffer, shard, rank=self.rank, world_size=self.world_size)
            rng_tensors, rng_meta = capture_rng(trainer)
            rng_path = tmp / "rng" / f"rank_{self.rank:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(rng_path),
                      metadata={"json": json.dumps(rng_meta, sort_keys=True)})
            for path in (shard, rng_path):
                _fsync_file(path)
            if self.is_main:
                state = trainer_state(trainer)
                state.update(optimizers=optimizers, world_size=self.world_size,
                             device=str(trainer.buffer.device.type))
                _write_atomic(tmp / TRAINER_STATE, json.dumps(state))

        _on_every_rank(write_rank_files, failed)
        # every rank checksums a share of the files; rank 0 writes the manifest and renames
        names = _broadcast(_relative_files(tmp) if self.is_main else None)
        described = {}
        for part in _all_gather(_describe_files(tmp, names[self.rank::self.world_size],
                                                checksum=self.cfg.verify == "crc32")):
            described.update(part)

        def publish() -> None:
            manifest = {"format": FORMAT_VERSION, "iteration": it, "world_size": self.world_size,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": described}
            _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
            old = self.folder / f"{TMP_PREFIX}replaced-{final.name}"
            if final.exists():  # an older save of the same iteration: moved out first, deleted once replaced
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            shutil.rmtree(old, ignore_errors=True)
            _write_atomic(self.folder / LATEST, final.name + "\n")
            self._prune()

        _on_main(publish, failed)
        self.last_saved_iteration = it
        total = time.perf_counter() - t0
        self.timings = {"save_s": total, "save_model_s": t_model - t0}
        size = sum(d["size"] for d in described.values())
        self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB, {total:.2f} s)")
        return final

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (rank 0 only)."""
        complete = [p for p in list_checkpoints(self.folder) if (p / MANIFEST).is_file()]
        for old in complete[self.cfg.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self, trainer) -> None:
        """The end of a run: a checkpoint of the last iteration (if not saved already) and the HF export."""
        if self.last_saved_iteration != trainer.iteration:
            self.save(trainer)
        if self.cfg.export_hf:
            from fastarcher.export import export_policy

            out = export_policy(trainer.policy, trainer.tokenizer, self.run_dir / "hf_policy")
            self.log(f"export: policy saved as a Hugging Face folder in {out}")
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
        explicit = _on_main(lambda: (path / MANIFEST).exists() or iteration_of(path) is not None,
                            f"checkpoint.resume {mode!r} cannot be read")
        if explicit:
            problems = check_checkpoint(path, verify=self.cfg.verify)
            if problems:
                raise CheckpointError(f"checkpoint.resume {str(path)!r} cannot be used: " + "; ".join(problems)
                                      + ". Pick another checkpoint or use --checkpoint.resume auto")
            return path
        folder = _on_main(lambda: _checkpoint_folder_of(path), f"checkpoint.resume {mode!r} cannot be read")
        return self._first_valid(folder, required=True)

    def _first_valid(self, folder: Path, *, required: bool) -> Path | None:
        candidates = _on_main(lambda: resume_candidates(folder), f"cannot list the checkpoints in {folder}")
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

    def restore(self, trainer) -> Path | None:
        """Resume according to cfg.resume; returns the checkpoint used, or None for a fresh start.

        Called once at the start of `fit()` (before anything is logged). Also installs the SIGTERM handler.
        """
        fault_point("resume")
        path = self.resolve()
        if path is None:
            self._fresh_start(trainer)
            self._install_sigterm()
            return None
        t0 = time.perf_counter()
        self.load(trainer, path)
        self._set_aside_newer(path, trainer.iteration)
        self.resumed_from = path
        self.last_saved_iteration = trainer.iteration
        self.timings["load_s"] = time.perf_counter() - t0
        self.log(f"checkpoint: resumed from {path} at iteration {trainer.iteration} "
                 f"({self.timings['load_s']:.2f} s)")
        self._install_sigterm()
        return path

    def _fresh_start(self, trainer) -> None:
        _on_main(self._set_aside_earlier_run, f"cannot start fresh in {self.run_dir}")

    def _set_aside_earlier_run(self) -> None:
        """Rank 0: move an earlier run's checkpoints (and, with `none`, its metrics) aside; delete nothing."""
        existing = list_checkpoints(self.folder)
        if existing:
            aside = self.folder / time.strftime("replaced-%Y%m%d-%H%M%S")
            aside.mkdir()
            for path in existing:
                os.replace(path, aside / path.name)
            (self.folder / LATEST).unlink(missing_ok=True)
            self.log(f"checkpoint: starting fresh (checkpoint.resume {self.cfg.resume}); the {len(existing)} "
                     f"checkpoint(s) already in {self.folder} were moved to {aside}")
        metrics = self.run_dir / "metrics.jsonl"
        if self.cfg.resume == "auto":  # rows of an attempt that died before its first checkpoint
            _rewrite_metrics(metrics, [])
        elif (kept := set_aside_metrics(metrics)) is not None:
            self.log(f"checkpoint: starting fresh; the earlier run's metrics were moved to {kept}")

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
                _write_atomic(self.folder / LATEST, path.name + "\n")
                self.log(f"checkpoint: moved {len(newer)} checkpoint(s) newer than {path.name} to {aside}")

        _on_main(move_newer, f"cannot set aside the checkpoints newer than {path}")

    def load(self, trainer, path: Path) -> None:
        """Load checkpoint `path` into `trainer` (no validation, no pointer changes; restore() does those)."""
        state = _on_every_rank(lambda: json.loads((path / TRAINER_STATE).read_text()),
                               f"cannot read {path / TRAINER_STATE}")
        current = json.loads(json.dumps(_config_dict(trainer.cfg)))  # tuples → lists, as in the saved copy
        self._check_config(path, state["config"], current)
        saved_world = int(state["world_size"])
        same_world = saved_world == self.world_size
        same_device = state.get("device") == trainer.buffer.device.type
        if not same_world:
            self.log(f"checkpoint: {path} was written by {saved_world} process(es), this run has "
                     f"{self.world_size}: models and optimizers are resharded, replay shards are pooled and "
                     f"dealt out again, per-rank random streams are re-derived; the run continues but is not "
                     f"bit-identical to an uninterrupted one")
        # models and optimizers
        hyper = {name: [(g["lr"], g.get("weight_decay")) for g in getattr(trainer, name).param_groups]
                 for name in ("actor_opt", "critic_opt")}
        model_state = _model_state(trainer, state["optimizers"])
        load_dcp(model_state, path / "model")
        for name in ("policy", "critic", "target"):
            _set_model_state(getattr(trainer, name), model_state[name])
        modules = {"actor_opt": trainer.policy, "critic_opt": trainer.critic}
        for name in state["optimizers"]:
            set_optimizer_state_dict(modules[name], getattr(trainer, name), model_state[name])
        self._apply_hyperparameters(trainer, hyper)
        _on_every_rank(lambda: self._load_rank_files(trainer, path, saved_world, same_device, state),
                       f"cannot load the replay or random-state files of {path}")
        # counters, baselines, metric history
        trainer.iteration = int(state["iteration"])
        trainer.random_baseline = state.get("random_baseline")
        trainer.start_metrics = state.get("start_metrics")
        trainer.last_eval = state.get("last_eval")
        if getattr(trainer, "guard", None) is not None and state.get("guard") is not None:
            trainer.guard.load_state_dict(state["guard"])
        logger = getattr(trainer, "logger", None)
        if logger is not None:
            logger.history = list(state["history"])
            _on_main(lambda: _rewrite_metrics(self.run_dir / "metrics.jsonl", logger.history),
                     f"cannot rewrite {self.run_dir / 'metrics.jsonl'}")
        if hasattr(trainer, "sync_engine"):
            trainer.sync_engine()  # the rollout engine's copy of the policy
        _barrier()

    def _load_rank_files(self, trainer, path: Path, saved_world: int, same_device: bool, state: dict) -> None:
        """This rank's replay shard (or its share of all of them) and random streams."""
        if saved_world == self.world_size:
            load_replay_shard(trainer.buffer, path / "replay" / f"rank_{self.rank:05d}.safetensors")
        else:
            shards = [path / "replay" / f"rank_{k:05d}.safetensors" for k in range(saved_world)]
            redistribute_replay(trainer.buffer, shards, self.rank, self.world_size)
        if saved_world == self.world_size and same_device:
            rng_file = path / "rng" / f"rank_{self.rank:05d}.safetensors"
            with safe_open(str(rng_file), framework="pt") as f:
                meta = json.loads(f.metadata()["json"])
            restore_rng(trainer, load_file(str(rng_file)), meta)
        else:
            reseed_rng(trainer, trainer.cfg.seed, self.rank, int(state["iteration"]))

    def _apply_hyperparameters(self, trainer, before: dict) -> None:
        """Keep this run's learning rate and weight decay (a resume may lower the lr on purpose)."""
        for name, values in before.items():
            for group, (lr, wd) in zip(getattr(trainer, name).param_groups, values):
                if group["lr"] != lr:
                    self.log(f"checkpoint: {name} lr {group['lr']} in the checkpoint, {lr} from this run's "
                             f"config: using {lr}")
                group["lr"] = lr
                if wd is not None:
                    group["weight_decay"] = wd

    def _check_config(self, path: Path, saved: dict, current: dict) -> None:
        diffs = config_differences(saved, current)
        fatal = [d for d in diffs if _must_match(d, saved)]
        if fatal:
            listing = ", ".join(f"{k}={a!r} in the checkpoint but {b!r} now" for k, a, b in fatal[:6])
            raise CheckpointError(f"cannot resume from {path}: {listing}. These fields shape the saved model or "
                                  f"replay data; resume with the checkpoint's values or start a new run folder "
                                  f"(--log.run-dir)")
        changed = [d for d in diffs if d[0].split(".")[0] not in FREE_TO_CHANGE]
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


def _must_match(diff: tuple[str, Any, Any], saved: dict) -> bool:
    """A difference that makes the checkpoint unusable: a MUST_MATCH section, except fields only one
    side has (another version's defaults) and the settings of environments the run does not use."""
    key, old, new = diff
    parts = key.split(".")
    if parts[0] not in MUST_MATCH or ABSENT in (old, new):
        return False
    env = saved.get("env", {}).get("name")
    return not (parts[0] == "env" and len(parts) > 2 and parts[1] != env)


def _rewrite_metrics(path: Path, rows: list[dict]) -> None:
    """Make metrics.jsonl hold exactly `rows`, in place (the logger keeps an append handle open on it)."""
    if not path.parent.is_dir():
        return
    mode = "r+" if path.exists() else "w"
    with open(path, mode) as f:
        f.seek(0)
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (single process; no checksum), or None."""
    for candidate in resume_candidates(_checkpoint_folder_of(Path(run_dir))):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


__all__ = [
    "Checkpointer", "CheckpointError", "check_checkpoint", "list_checkpoints", "resume_candidates",
    "latest_checkpoint", "read_trainer_state", "capture_rng", "restore_rng", "trainer_state",
    "config_differences", "redistribute_replay", "checkpoint_name",
]
