"""Loading DCP files without running code from them.

DCP's `.metadata` file is a pickle that torch reads with plain `pickle.load`, and its default load
planner unpickles every non-tensor item with `torch.load(weights_only=False)`. Both are replaced here,
so a planted checkpoint cannot run code: the metadata through an allow-list of DCP's own classes, the
non-tensor items by SafeLoadPlanner. DCP itself reads tensors with torch.load(weights_only=True).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from fastarcher.dist import SharedFailure

SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process.*"


class CheckpointError(SharedFailure):
    """A checkpoint that cannot be used or written; the message names it, says why, and what to do."""


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
            warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)
            dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner())
    except dcp.CheckpointException as error:  # one failure per rank, each wrapping the real exception
        reasons = {_failure_reason(f) for f in error.failures.values()}
        raise CheckpointError(f"cannot load the model state in {folder}: {'; '.join(sorted(reasons))}") from error

