"""Trace artifacts on disk: `summary.json`, `manifest.jsonl` and `steps/step_NNNNNN.npz`, written atomically.

Layout of one trace folder (`<run>/influence_trace/` or `<run>/entropy_trace/`):

    summary.json          schema version, kind, config, static facts (e.g. modules), steps written, last record
    manifest.jsonl        one JSON object per traced step (step, file, counts, statistics, timings)
    steps/step_NNNNNN.npz the per-token arrays of one step (schema in docs/traces.md)

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed over the
target (`os.replace`), so a reader never sees a half-written file, and a crash leaves the previous
version. The manifest is rewritten whole on each step (a step written again replaces its line),
which keeps it valid after a resume. Step files hold no Python objects: `np.load(path)` works with
the default `allow_pickle=False`.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "INFLUENCE_STEP_ARRAYS",
    "ENTROPY_STEP_ARRAYS",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_npz_atomic",
    "step_filename",
    "TraceWriter",
    "read_summary",
    "read_manifest",
    "load_step",
]

SCHEMA_VERSION = 1

# Arrays of one influence step file (docs/traces.md describes each). N traced tokens, R responses,
# K contrast units, M modules. With save_factors, factor_u_{m} (N, k_out), factor_v_{m} (N, k_in)
# and factor_context_{m} (R, k_out, k_in) are added for every module m.
INFLUENCE_STEP_ARRAYS = (
    "step", "response_offsets", "token_ids", "token_positions", "token_scores", "token_grad_norm", "token_text",
    "text_offsets", "response_text", "response_scores", "response_context_scores", "response_grad_norm", "rewards",
    "advantages", "objective_weight", "accepted", "group_ids", "unit_ids", "rank", "row", "n_response_tokens",
    "unit_n_accepted", "unit_n_rejected", "damping", "module_names", "module_k_in", "module_k_out",
)
# Arrays of one entropy step file.
ENTROPY_STEP_ARRAYS = (
    "step", "response_offsets", "token_ids", "token_positions", "token_entropy", "token_text", "text_offsets",
    "response_text", "rewards", "advantages", "group_ids", "rank", "row", "n_response_tokens", "quantile_levels",
    "quantile_values",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename; the old file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, default=_json_default) + "\n").encode())


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez_compressed into memory, then an atomic write. Refuses object arrays (they need pickle)."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise TypeError(f"step array {name!r} has dtype object; store strings as a numpy unicode array")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def step_filename(step: int) -> str:
    return f"steps/step_{int(step):06d}.npz"


class TraceWriter:
    """Writes one trace folder; `write_step` adds a step file, its manifest line and refreshes the summary."""

    def __init__(self, root: Path, kind: str, config: Mapping[str, Any], static: Mapping[str, Any] | None = None):
        self.root = Path(root)
        self.kind = kind
        self.config = dict(config)
        self.static = dict(static or {})
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "steps").mkdir(exist_ok=True)
        self.records: dict[int, dict] = {int(r["step"]): r for r in read_manifest(self.root)}

    def write_step(self, step: int, arrays: Mapping[str, np.ndarray], record: Mapping[str, Any]) -> Path:
        path = self.root / step_filename(step)
        save_npz_atomic(path, arrays)
        line = {"step": int(step), "file": step_filename(step), "wall_time": time.time(), **record}
        self.records[int(step)] = _clean(line)
        body = "".join(json.dumps(self.records[s], default=_json_default) + "\n" for s in sorted(self.records))
        atomic_write_bytes(self.root / "manifest.jsonl", body.encode())
        self.write_summary()
        return path

    def write_summary(self) -> None:
        steps = sorted(self.records)
        atomic_write_json(self.root / "summary.json", {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "config": self.config,
            **self.static,
            "steps": steps,
            "n_steps": len(steps),
            "last_step": steps[-1] if steps else None,
            "last": self.records[steps[-1]] if steps else None,
        })


def read_summary(root: Path) -> dict:
    return json.loads((Path(root) / "summary.json").read_text())


def read_manifest(root: Path) -> list[dict]:
    """Manifest records sorted by step ([] when the folder has none yet)."""
    path = Path(root) / "manifest.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["step"])


def load_step(root: Path, step: int) -> dict[str, np.ndarray]:
    """All arrays of one step file, loaded eagerly (no pickle)."""
    with np.load(Path(root) / step_filename(step), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
