"""Process group set-up and small rank helpers.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run
is a single process and no process group is created. gloo on CPU, nccl on CUDA.

Failure handling (docs/checkpointing.md): `exit_with_launcher()` makes a worker stop when torchrun dies,
and `exit_now()` ends a failed rank without a barrier, so peers blocked in a collective fail at once
instead of waiting for it forever.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def wants_cuda(device: str) -> bool:
    """Whether the `--device` choice trains on CUDA ('auto': when a GPU is visible)."""
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (if launched by torchrun) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = wants_cuda(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is visible: pass --device cpu (or auto)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        store = _attempt_store(world_size)
        where = {"store": store, "rank": rank, "world_size": world_size} if store is not None else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None, **where)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _attempt_store(world_size: int):
    """torchrun's shared rendezvous store seen through a key prefix of this restart attempt, or None.

    Under `torchrun --max-restarts` the agent's store outlives the workers and still holds the first
    attempt's keys (the gloo addresses of dead processes): a restarted group that reads them cannot
    connect and hangs. torch's own workaround, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, must be set in the
    agent's environment; a prefix per attempt works from the worker side with no variable at all.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
    return dist.PrefixStore(f"fastarcher/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown_distributed() -> None:
    """End of a successful run only: the error path must not wait for peers (see exit_now)."""
    if dist.is_initialized():
        # A barrier first: gloo can abort at exit when one rank tears down while the other still talks.
        dist.barrier()
        dist.destroy_process_group()


def exit_now(status: int) -> None:
    """End this process at once: no barrier, no process-group teardown, no exit handlers.

    A peer blocked in a collective with this rank then gets a connection error within seconds (gloo; NCCL
    through its watchdog) instead of waiting for the collective timeout.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def let_rank0_report_first(limit_s: float = 30.0) -> None:
    """Under torchrun, on a rank other than 0 with an error every rank finds alike (config, run folder): wait,
    at most `limit_s`, for torchrun to stop this worker once rank 0 has printed the error and exited.

    Exiting first would make torchrun SIGTERM rank 0 before it prints, and the user would see only
    torchrun's report. SIGTERM goes back to its default so that stop is immediate; a launcher that is gone
    ends the wait.
    """
    if _LAUNCHER_PID is None or int(os.environ.get("RANK", "0")) == 0:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    deadline = time.monotonic() + limit_s
    while os.getppid() == _LAUNCHER_PID and time.monotonic() < deadline:
        time.sleep(0.1)


def peer_failure(error: BaseException) -> bool:
    """True when `error` is a collective failing because another rank went away (its own message says why)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "Connection refused", "gloo/transport")))


PR_SET_PDEATHSIG = 1
"""prctl option: the signal this process gets when its parent ends (linux/prctl.h)."""


_LAUNCHER_PID: int | None = None
"""torchrun's pid, recorded by `exit_with_launcher` (None outside torchrun)."""


def exit_with_launcher() -> None:
    """Under torchrun, get SIGTERM when the launcher dies (Linux), so no orphan keeps writing the run folder.

    SIGTERM then takes the save-and-stop path (or ends the process before the handler is installed). A
    launcher that died before this call is caught by the parent-pid check.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    global _LAUNCHER_PID
    parent = _LAUNCHER_PID = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not allowed here (seccomp): run on without it
    if os.getppid() != parent:
        raise SystemExit("launcher error: torchrun exited while this worker was starting; not starting the run")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed); returns the same tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


FAULT_ENV = "FASTARCHER_TEST_FAULT"
"""Test hook: '<rank>:<point>' makes that rank raise at that point (first torchrun attempt only)."""


def fault_point(point: str) -> None:
    """Raise here if FASTARCHER_TEST_FAULT asks for it; lets tests fail one rank while its peers run on."""
    spec = os.environ.get(FAULT_ENV)
    rank = os.environ.get("RANK", "0")
    if spec == f"{rank}:{point}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        raise RuntimeError(f"injected fault at {point!r} on rank {rank} ({FAULT_ENV})")


# --------------------------------------------------------------------------------------------------
# Collectives with a shared outcome. A rank that raises while its peers wait in a collective would leave
# them waiting: work that can fail on one rank only runs through `on_main` / `on_every_rank`, which share
# the outcome and raise the same error on every rank.


class SharedFailure(RuntimeError):
    """Raised alike on every rank by `on_main` / `on_every_rank`; the message says what failed and why."""


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_object(obj):
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return flag if world()[1] == 1 else any(all_gather_object(bool(flag)))


def failure_reason(error: BaseException) -> str:
    """One line for a failure: the OS message, or the exception type and text (a full disk says so)."""
    # safetensors reports I/O errors as its own type, with the OS message in the text
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
        return ("the disk is full (No space left on device); free space there or lower checkpoint.keep_last, "
                "then resume with --checkpoint.resume auto")
    if isinstance(error, (OSError, SharedFailure)):
        return str(error)
    return f"{type(error).__name__}: {error}"  # e.g. a file that is not UTF-8 or not JSON


def _outcome(fn):
    try:
        return fn(), None
    except Exception as error:  # noqa: BLE001 - every local failure must reach the other ranks
        return None, failure_reason(error)


def raise_first(errors, context: str, error_type: type[SharedFailure] = SharedFailure) -> None:
    """Raise `error_type("context: first error")` when any entry of `errors` is not None."""
    errors = [e for e in errors if e is not None]
    if errors:
        raise error_type(f"{context}: {errors[0]}")


def on_main(fn, context: str, error_type: type[SharedFailure] = SharedFailure):
    """fn() on rank 0 only; every rank returns its result, or raises the same `error_type`."""
    result, error = _outcome(fn) if world()[0] == 0 else (None, None)
    result, error = broadcast_object((result, error))
    raise_first([error], context, error_type)
    return result


def on_every_rank(fn, context: str, error_type: type[SharedFailure] = SharedFailure):
    """fn() on every rank; if it fails on any, every rank raises the same `error_type`."""
    result, error = _outcome(fn)
    raise_first(all_gather_object(error), context, error_type)
    return result
