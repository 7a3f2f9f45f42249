"""Objects of the user's own named by import path, `package.module:name` (envs, rewards)."""
from __future__ import annotations

import importlib
import re
from typing import Any

IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
"""`package.module:name`: dotted identifiers, one colon, one identifier."""


def is_import_path(text: Any) -> bool:
    return isinstance(text, str) and IMPORT_PATH.match(text) is not None


def load_object(spec: str, field: str) -> Any:
    """The attribute that `package.module:name` names; ValueError naming `field` when it cannot be had
    (the module does not import, raises while importing, or lacks the name)."""
    module_name, name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{field} ({spec!r}): cannot import module {module_name!r}: {error} (is it installed, "
                         f"or in the working directory?)") from None
    except Exception as error:  # the user's module failed while running
        raise ValueError(f"{field} ({spec!r}): importing {module_name!r} raised {type(error).__name__}: "
                         f"{error}") from None
    if not hasattr(module, name):
        raise ValueError(f"{field} ({spec!r}): module {module_name!r} has no attribute {name!r}")
    return getattr(module, name)
