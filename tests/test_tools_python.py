"""The sandboxed Python executor (fastarcher/tools/python_exec.py): output, errors, and the limits that stop
a loop that never ends, an allocation that is too large and an attempt at the network."""
import time

from fastarcher.tools import ToolCall, run_tool
from fastarcher.tools.python_exec import PythonExecutor, run_python_code

TOOLS = {"python": PythonExecutor(timeout_s=5.0, cpu_s=2, memory_mb=256, max_output_chars=300)}


def call(code: str) -> str:
    return run_tool(TOOLS, ToolCall("python", {"code": code}), max_chars=1000)


def test_prints_come_back():
    assert call("print(sum(range(10)))\nprint('ok')") == "45\nok"
    assert call("x = 1") == "(no output)"


def test_errors_come_back_as_their_last_line():
    assert call("print('before')\n1 / 0") == "before\nerror: ZeroDivisionError: division by zero"
    assert call("def f(:\n  pass") .startswith("error: SyntaxError")


def test_runs_in_an_empty_folder_with_an_empty_environment():
    out = call("import os\nprint(os.listdir('.'), sorted(k for k in os.environ if k != 'LC_CTYPE'))")
    assert out == "['main.py'] ['LANG']"


def test_a_loop_that_never_ends_is_stopped():
    start = time.monotonic()
    out = call("while True:\n    pass")
    assert out == "error: the code used too much CPU time and was stopped"
    assert time.monotonic() - start < 5.0  # the 2 s CPU limit, before the 5 s wall clock


def test_sleeping_past_the_wall_clock_is_stopped():
    result = run_python_code("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout_s=1.0)
    assert result.timed_out and result.returncode is None and result.stdout == "started\n"


def test_too_much_memory_is_stopped():
    assert call("x = bytearray(2 * 1024 ** 3)\nprint('allocated')") == \
        "error: MemoryError: the code used more memory than allowed"


def test_the_network_is_refused():
    out = call("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert out == "error: PermissionError: network access is disabled in this sandbox"
    out = call("import socket\ns = socket.socket()")
    assert out == "error: PermissionError: network access is disabled in this sandbox"
    out = call("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')")
    assert "network access is disabled in this sandbox" in out


def test_output_is_cut():
    out = call("print('x' * 5000)")
    assert out.startswith("x" * 300 + "\n...[4701 more characters cut]")


def test_large_files_are_refused():
    out = call("print('writing')\nopen('big', 'wb').write(b'0' * (2 << 20))")
    assert out == "writing\nerror: OSError: [Errno 27] File too large"  # the 1 MiB file size limit
