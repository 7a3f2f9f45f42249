"""Numerical guards: an optimizer step whose loss or gradient is not finite is skipped, counted and
logged; after `guard.max_consecutive_skips` skips in a row of one optimizer the run stops with a message
naming the loss, its value and the step.

    guard = StepGuard(cfg.guard, log=print)
    for micro_batch in ...:
        loss.backward(); guard.track("critic", loss)
    grad_norm = guard.check_and_step("critic", critic_opt, max_norm=1.0, iteration=it)

`check_and_step` replaces "clip, step, zero": it clips to `max_norm` (0 = no clipping), and steps only
when the tracked loss (summed over the micro-batches since the last step) and the global gradient norm
are finite on every rank. The decision is all-reduced, so all ranks skip together and FSDP shards never
drift apart. This is one host sync per optimizer step (the flag is read on the host to decide); set
`guard.skip_nonfinite false` to step unconditionally without it.

The skipped step leaves parameters and optimizer state (Adam moments, step counter) untouched and
drops the gradients.

A finite gradient can still wreck the weights (a learning rate of inf or 1e30): after every step taken,
the optimizer's parameters are checked (their global 2-norm bounds every |w|: one fused foreach
reduction, one tiny all-reduce, one host sync; the exact max |w| only when that bound is exceeded);
NaN/Inf or |w| above `guard.max_param_abs` stops the run at once with
`NonFiniteParametersError`, before the weights reach the target critic, the rollout engine or a
checkpoint. Stopping rather than rolling back: a rollback needs a copy of every parameter and Adam moment
before each step (3× the parameter memory), and a step that diverges with a finite gradient will diverge
again with the same settings, so the useful outcome is a clear stop and a resume with other settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class NonFiniteParametersError(NonFiniteLossError):
    """An optimizer step left NaN/Inf or diverged (beyond guard.max_param_abs) parameters."""


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _all_reduce(values: Tensor, op) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=op)
    return values


def parameter_norm(params: list[Tensor]) -> float:
    """Global 2-norm of the parameters on every rank: one fused foreach reduction per device and dtype,
    squares summed over the local FSDP2 shards, one all-reduce(SUM), one host sync. NaN/Inf propagate;
    it also reads inf once the squares overflow fp32 (|w| beyond ~1e19)."""
    local = [t for t in map(_local, params) if t.numel()]
    device = params[0].device if params else torch.device("cpu")
    squares = torch.zeros((), device=device)
    if local:
        squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).square().sum()
    return float(_all_reduce(squares, dist.ReduceOp.SUM).sqrt())  # sync point


def largest_parameter(params: list[Tensor]) -> float:
    """max |w| over the parameters on every rank: NaN if any is NaN, inf if any is ±inf. Exact where the
    2-norm overflows, but ~5× slower on CPU than `parameter_norm`, so only the slow path of the check.
    One all-reduce(MAX) of (max |w|, NaN flag): MAX does not reliably carry a NaN, hence the flag."""
    local = [t for t in map(_local, params) if t.numel()]
    device = params[0].device if params else torch.device("cpu")
    values = torch.zeros(2, device=device)  # (max |w|, any NaN)
    if local:
        norms = torch.stack([n.float() for n in torch._foreach_norm(local, math.inf)])
        values = torch.stack([norms.masked_fill(norms.isnan(), math.inf).max(), norms.isnan().any().float()])
    largest, has_nan = _all_reduce(values, dist.ReduceOp.MAX).tolist()  # sync point
    return math.nan if has_nan else largest


def parameters_within(params: Iterable[Tensor], limit: float) -> tuple[bool, float]:
    """(every parameter finite and |w| ≤ limit (0 = finite only), a value for the message).

    max |w| ≤ ‖w‖₂, so a finite 2-norm within the limit settles it with one cheap reduction (the usual
    case); only otherwise is the exact max |w| taken, which also tells overflow of the norm from Inf."""
    params = [p.detach() for p in params]
    norm = parameter_norm(params)
    if math.isfinite(norm) and (not limit or norm <= limit):
        return True, norm
    largest = largest_parameter(params)
    return math.isfinite(largest) and (not limit or largest <= limit), largest


@dataclass
class _Counters:
    steps: int = 0
    """Guarded optimizer steps so far (taken or skipped)."""
    skipped: int = 0
    """Steps skipped for a non-finite loss or gradient."""
    consecutive: int = 0
    """Skips since the last step that was taken."""


@dataclass
class StepGuard:
    """Guards the optimizer steps of named optimizers ('critic', 'actor')."""

    cfg: "GuardConfig"  # noqa: F821 - fastarcher.config.GuardConfig (not imported: config imports lots)
    log: Callable[[str], None] = print
    counters: dict[str, _Counters] = field(default_factory=dict)
    _pending: dict[str, Tensor] = field(default_factory=dict)

    def track(self, name: str, loss: Tensor) -> None:
        """Add a micro-batch loss (no sync) to the total that the next `check_and_step(name)` checks."""
        loss = loss.detach().float()
        self._pending[name] = loss if name not in self._pending else self._pending[name] + loss

    def check_and_step(self, name: str, optimizer: torch.optim.Optimizer, *,
                       max_norm: float, iteration: int, loss: Tensor | None = None) -> Tensor:
        """Clip, then step if everything is finite, then zero the gradients; returns the pre-clip
        global grad norm (0-d). Raises NonFiniteLossError after too many consecutive skips."""
        # what the optimizer steps (a critic's optimizer may also own a shared policy backbone)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = norm.detach()
        pending = self._pending.pop(name, None)
        if loss is not None:
            pending = loss.detach().float() if pending is None else pending + loss.detach().float()
        counters = self.counters.setdefault(name, _Counters())
        counters.steps += 1
        if not self.cfg.skip_nonfinite:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return norm
        loss_value = pending if pending is not None else torch.zeros((), device=norm.device)
        values = torch.stack([loss_value.to(norm.device, torch.float32), norm.float()])  # (2,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NaN and Inf survive a sum: one rank's bad loss makes every rank skip
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / dist.get_world_size()
        finite = bool(torch.isfinite(values).all())  # sync point: the host decides whether to step
        if finite:
            optimizer.step()
            counters.consecutive = 0
            self._check_parameters(name, optimizer, counters, iteration)
        else:
            counters.skipped += 1
            counters.consecutive += 1
            self._on_skip(name, counters, float(values[0]), float(values[1]), iteration)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _check_parameters(self, name: str, optimizer: torch.optim.Optimizer, counters: _Counters,
                          iteration: int) -> None:
        limit = self.cfg.max_param_abs
        ok, largest = parameters_within((p for group in optimizer.param_groups for p in group["params"]), limit)
        if ok:
            return
        bound = f"beyond guard.max_param_abs = {limit:.3g}" if math.isfinite(largest) else "not finite"
        raise NonFiniteParametersError(
            f"stopping: {name} parameters reach |w| = {largest:.3g} ({bound}) after the {name} optimizer step at "
            f"iteration {iteration} ({name} step {counters.steps}); the step diverged although loss and gradient "
            f"were finite, and nothing from it was saved. Lower optim.{name}_lr or set optim.{name}_grad_clip, "
            f"then resume from the last checkpoint with --checkpoint.resume auto")

    def _on_skip(self, name: str, counters: _Counters, loss: float, norm: float, iteration: int) -> None:
        limit = self.cfg.max_consecutive_skips
        what = f"{name} loss {loss:.6g}, grad norm {norm:.6g} at iteration {iteration} ({name} step {counters.steps})"
        if limit and counters.consecutive >= limit:
            raise NonFiniteLossError(
                f"stopping: {counters.consecutive} consecutive {name} optimizer steps were skipped because the loss "
                f"or gradient was not finite; the last one: {what}. Lower optim.{name}_lr, set or tighten "
                f"optim.{name}_grad_clip, or check the inputs; then resume from the last checkpoint with "
                f"--checkpoint.resume auto (guard.max_consecutive_skips is {limit}, 0 never stops)")
        self.log(f"guard: skipped the {name} optimizer step: {what}; {counters.consecutive} in a row"
                 + (f", the run stops at {limit}" if limit else ""))

    def metrics(self) -> dict[str, float]:
        """Cumulative counts, identical on every rank: guard/skipped_steps and one key per optimizer."""
        out = {"guard/skipped_steps": float(sum(c.skipped for c in self.counters.values()))}
        for name in ("critic", "actor", *sorted(set(self.counters) - {"critic", "actor"})):
            out[f"guard/skipped_{name}_steps"] = float(self.counters[name].skipped if name in self.counters else 0)
        return out

    checkpoint_scope = "run"  # a run-wide checkpoint part: the counters are the same on every rank

    def state_dict(self) -> dict:
        return {name: vars(c).copy() for name, c in self.counters.items()}

    def load_state_dict(self, state: dict) -> None:
        """Totals carry over; the run of consecutive skips starts again at 0. A resume is a new attempt
        (usually after a stop, with other settings): a count carried over from just before the stop
        would end it again within a step or two, before the new settings could show anything."""
        self.counters = {name: _Counters(**{**values, "consecutive": 0}) for name, values in state.items()}
