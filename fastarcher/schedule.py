"""Learning-rate schedules: a multiplier of the base learning rate per optimizer step, and its LambdaLR.

    lr(step) = base_lr · lr_multiplier(step, total_steps=N, warmup_steps=W, kind=..., min_ratio=m)

    warm-up   step < W:       (step + 1) / W             (1/W at the first step, 1 at step W − 1)
    then, with progress u = (step − W) / (N − W) ∈ [0, 1] (u = 1 from step N on):
    constant                  1                          (min_ratio is not used)
    linear                    m + (1 − m)(1 − u)         (1 at step W, m at step N)
    cosine                    m + (1 − m)·½(1 + cos πu)  (half a cosine; Loshchilov & Hutter 2017, SGDR,
                                                          without restarts)
    linear and cosine stay at m from step N on. `step` counts optimizer steps from 0.

`scheduler` wraps it in a torch LambdaLR: the optimizer's step k (0-based) runs at f(k) when
`scheduler.step()` follows each `optimizer.step()`. Its state (`last_epoch`, `base_lrs`, `_last_lr`) is
plain JSON for float lrs; restoring it also sets the optimizer's lr (see `_LambdaLR`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")
"""Names accepted as `kind`."""


def _int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; True as a step count is a bug, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} ({value!r}) must be an int ≥ {minimum}")
    return int(value)


def _check(total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> None:
    _int("total_steps", total_steps, 1)
    _int("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind ({kind!r}) must be one of {SCHEDULE_KINDS}")
    if (isinstance(min_ratio, bool) or not isinstance(min_ratio, numbers.Real)
            or not 0.0 <= float(min_ratio) <= 1.0):  # also refuses nan
        raise ValueError(f"min_ratio ({min_ratio!r}) must be a number in [0, 1]")


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "constant",
    min_ratio: float = 0.0,
) -> float:
    """The base-lr multiplier at optimizer step `step` (0-based); see the module docstring for the formulas.

    total_steps ≥ 1; 0 ≤ warmup_steps ≤ total_steps; kind in SCHEDULE_KINDS; min_ratio in [0, 1]
    (the floor that linear and cosine reach at total_steps). Raises ValueError otherwise, or for step < 0.
    """
    _check(total_steps, warmup_steps, kind, min_ratio)
    step = _int("step", step, 0)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if step >= total_steps:  # also the case warmup_steps == total_steps, where the decay span is empty
        return float(min_ratio)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


class _LambdaLR(LambdaLR):
    """LambdaLR whose restore also sets the optimizer's lr to the restored schedule's.

    Building a LambdaLR sets each group's lr to base·f(0); torch's `load_state_dict` then restores the
    step count but leaves that lr, so the first step after a resume would run at f(0) unless the
    optimizer's own state is loaded afterwards. Setting it here makes the order irrelevant.
    """

    checkpoint_scope = "run"  # a run-wide checkpoint part: the schedule is the same on every rank

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)  # a tensor lr (capturable/compiled optimizers) is updated in place
            else:
                group["lr"] = lr


def scheduler(
    optimizer: Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "constant",
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A LambdaLR on `optimizer` applying `lr_multiplier` with these arguments (checked now, not at step 0).

    Call `.step()` after each `optimizer.step()`. Its `state_dict()`/`load_state_dict()` carry the step
    count and base lrs (the multiplier itself is rebuilt from configuration); restoring sets the
    optimizer's lr too, so a restored scheduler continues exactly where the saved one was.
    """
    _check(total_steps, warmup_steps, kind, min_ratio)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind,
                             min_ratio=min_ratio)

    return _LambdaLR(optimizer, multiplier)
