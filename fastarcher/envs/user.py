"""Environments of your own, named by import path: `--env.name my_pkg.my_module:MyEnv`.

The class is imported (the module must be importable: installed, or in the working directory) and
called with `env.options` as keyword arguments, plus `max_turns` when `--env.max-turns` is given. The
instance must follow the env protocol of `fastarcher/envs/base.py`; every problem is one ValueError
naming the field, raised when the config is checked, before any model loads. docs/custom_env.md has
a worked example.
"""
from __future__ import annotations

from typing import Any

from fastarcher.envs.base import Env, check_positive
from fastarcher.imports import is_import_path, load_object

PROTOCOL_METHODS = ("reset", "step", "action_choices", "oracle_action", "random_valid_action", "observation_texts")


def load_env_class(spec: str) -> type:
    """The class that `package.module:ClassName` names; ValueError when it cannot be had."""
    if not is_import_path(spec):
        raise ValueError(f"env.name ({spec!r}) must be a built-in env or an import path 'package.module:ClassName'")
    cls = load_object(spec, "env.name")
    if not isinstance(cls, type):
        raise ValueError(f"env.name ({spec!r}) must name a class, not a {type(cls).__name__}")
    return cls


def make_user_env(spec: str, options: dict[str, Any], max_turns: int | None = None) -> Env:
    """An instance of the class `spec` names, built with `options` (and `max_turns` if given), checked
    against the env protocol."""
    cls = load_env_class(spec)
    kwargs = dict(options)
    if max_turns is not None:
        if "max_turns" in kwargs:
            raise ValueError(f"env.max_turns ({max_turns}) and env.options.max_turns ({kwargs['max_turns']!r}) "
                             f"both set the turn limit: set one")
        kwargs["max_turns"] = max_turns
    try:
        env = cls(**kwargs)
    except Exception as error:  # a wrong option name or value: the user's constructor says which
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
        raise ValueError(f"env.name ({spec!r}): {cls.__name__}({shown}) raised {type(error).__name__}: "
                         f"{error} (constructor arguments come from env.options)") from None
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(env, m, None))]
    if missing:
        raise ValueError(f"env.name ({spec!r}): {cls.__name__} lacks the env protocol's "
                         f"{', '.join(missing)} (see fastarcher/envs/base.py, docs/custom_env.md)")
    if not isinstance(getattr(env, "name", None), str):
        raise ValueError(f"env.name ({spec!r}): {cls.__name__}.name must be a string")
    check_positive(f"env.name ({spec!r}): {cls.__name__}.max_turns", getattr(env, "max_turns", None))
    choices = env.action_choices()
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"env.name ({spec!r}): {cls.__name__}.action_choices() must return a non-empty list of "
                         f"strings")
    texts = env.observation_texts()
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"env.name ({spec!r}): {cls.__name__}.observation_texts() must return a non-empty list "
                         f"of strings (the longest observations step can answer)")
    return env
