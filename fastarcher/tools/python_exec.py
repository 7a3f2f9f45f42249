"""A Python executor tool: the agent's code runs in a separate, short-lived interpreter with limits.

Each call writes the code to `main.py` in a fresh temporary folder and runs it there with `python -I -S`
(isolated: no user site, no PYTHON* variables, no site-packages) and an empty environment; before the
code runs the child:
- caps CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE), open files and
  process count (no fork bombs), and makes no core dumps;
- replaces socket creation and connection with a function that raises, so code that tries the network
  fails with an error it can read.
The parent kills the child's whole process group at the wall-clock timeout, and cuts stdout and stderr.

What it is: a guard against an agent's mistakes (a loop that never ends, a huge allocation, a stray
download) on a machine you trust. What it is not: a security boundary against deliberately hostile
code (ctypes or an extension module can undo the Python-level network block); run untrusted code in a
container or VM with networking off.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from fastarcher.tools.base import ToolError

_PRELUDE = r"""
import resource, socket
def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
_limit(resource.RLIMIT_CPU, {cpu_s})
_limit(resource.RLIMIT_AS, {memory_bytes})
_limit(resource.RLIMIT_FSIZE, {file_bytes})
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NOFILE, 64)
_limit(resource.RLIMIT_NPROC, {nproc})
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in this sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
del _limit, resource  # _no_network stays: the replaced socket functions call it
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str
    returncode: int | None
    """None when the wall-clock timeout killed it."""
    timed_out: bool


def _keep_head(text: str, limit: int) -> str:
    """The first `limit` characters (stdout: what was printed first)."""
    return text if len(text) <= limit else text[:limit] + f"\n...[{len(text) - limit} more characters cut]"


def _keep_tail(text: str, limit: int) -> str:
    """The last `limit` characters (stderr: a traceback ends with the error)."""
    return text if len(text) <= limit else f"[{len(text) - limit} characters cut]...\n" + text[-limit:]


def run_python_code(code: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
                    max_output_chars: int = 2000) -> ExecResult:
    """Run `code` under the limits above; never raises for what the code does."""
    if not isinstance(code, str):
        raise ToolError("code must be a string")
    prelude = _PRELUDE.format(cpu_s=int(cpu_s), memory_bytes=int(memory_mb) << 20, file_bytes=1 << 20,
                              nproc=_process_limit())
    with tempfile.TemporaryDirectory(prefix="fastarcher_exec_") as folder:
        with open(os.path.join(folder, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", prelude], cwd=folder, env={"LANG": "C.UTF-8"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, text=True, errors="replace")
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            timed_out = True
    return ExecResult(_keep_head(stdout, max_output_chars), _keep_tail(stderr, max_output_chars),
                      None if timed_out else proc.returncode, timed_out)


def _process_limit() -> int:
    """RLIMIT_NPROC counts every process of the user: allow what already runs plus a few, so the child can
    start no fork bomb but the limit does not stop the child itself."""
    try:
        running = sum(1 for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        running = 256
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    wanted = running + 16
    return wanted if soft == resource.RLIM_INFINITY else min(wanted, soft)


def describe(result: ExecResult, timeout_s: float) -> str:
    """The observation an agent reads."""
    if result.timed_out:
        return f"error: the code ran past the {timeout_s:g} s limit and was stopped\n{result.stdout}".rstrip()
    if result.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"error: the code used too much CPU time and was stopped\n{result.stdout}".rstrip()
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        if "MemoryError" in result.stderr:
            last = "MemoryError: the code used more memory than allowed"
        return f"{result.stdout}error: {last}".strip()
    return result.stdout.rstrip() or "(no output)"


class PythonExecutor:
    """`python` tool: runs the code and answers with what it printed (or the last line of its error)."""

    name = "python"
    description = "Run Python code and see what it prints (no network, limited time and memory)."
    parameters = {"code": "string"}

    def __init__(self, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512, max_output_chars: int = 2000):
        self.timeout_s, self.cpu_s, self.memory_mb, self.max_output_chars = timeout_s, cpu_s, memory_mb, max_output_chars

    def call(self, arguments: dict[str, Any]) -> str:
        result = run_python_code(arguments["code"], timeout_s=self.timeout_s, cpu_s=self.cpu_s,
                                 memory_mb=self.memory_mb, max_output_chars=self.max_output_chars)
        return describe(result, self.timeout_s)
