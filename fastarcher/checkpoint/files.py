"""Checkpoint folders on disk: names, atomic writes, the manifest and its check, finding candidates."""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

from fastarcher.dist import all_gather_object, world

FORMAT_VERSION = 2
"""Bumped when the layout changes; older checkpoints are refused with a message."""
CHECKPOINT_RE = re.compile(r"^iter_(\d{6,})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
RUN_STATE = "state.json"
LATEST = "latest"
_CHUNK = 16 << 20

def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def iteration_of(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass


def write_atomic(path: Path, text: str) -> None:
    """Write text to `path` via a temp file + fsync + rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def describe_files(folder: Path, names: list[str], checksum: bool) -> dict[str, dict]:
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
    rank, ranks = world()
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
            if i % ranks != rank:
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
    for part in all_gather_object(problems):
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


def checkpoint_folder_of(path: Path) -> Path:
    """A run folder or a checkpoints folder → the folder holding iter_* checkpoints."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path



def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (single process; no checksum), or None."""
    for candidate in resume_candidates(checkpoint_folder_of(Path(run_dir))):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def read_run_state(path: str | Path) -> dict:
    """A checkpoint's state.json: format, world size, device, config, saved parts, run-wide states."""
    return json.loads((Path(path) / RUN_STATE).read_text())
