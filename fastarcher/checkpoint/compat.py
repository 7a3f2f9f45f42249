"""Whether a checkpoint's config fits this run's: which fields must match, which may change."""

from __future__ import annotations

from typing import Any

MUST_MATCH = ("algo", "model", "critic", "replay", "env")
"""Config sections that shape the saved tensors or the data: a resume with other values is refused."""
FREE_TO_CHANGE = ("iterations", "config", "device", "log", "checkpoint", "eval", "guard")
"""Config sections a resume may change silently (anything else changed is reported)."""

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



def must_match(diff: tuple[str, Any, Any], saved: dict) -> bool:
    """A difference that makes the checkpoint unusable: a MUST_MATCH section, except fields only one
    side has (another version's defaults) and the settings of environments the run does not use."""
    key, old, new = diff
    parts = key.split(".")
    if parts[0] not in MUST_MATCH or ABSENT in (old, new):
        return False
    env = saved.get("env", {}).get("name")
    return not (parts[0] == "env" and len(parts) > 2 and parts[1] != env)


def compare_configs(saved: dict, current: dict) -> tuple[list, list]:
    """(differences that forbid the resume, other reportable differences), each as (field, saved, current)."""
    diffs = config_differences(saved, current)
    fatal = [d for d in diffs if must_match(d, saved)]
    changed = [d for d in diffs if d not in fatal and d[0].split(".")[0] not in FREE_TO_CHANGE]
    return fatal, changed
