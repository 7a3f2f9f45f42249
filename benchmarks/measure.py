"""Helpers the benchmark files share: interleaved wall-clock medians and peak memory from a fresh process.

Imported as `measure` (the benchmark directory is on sys.path both under pytest and as a script); the
name does not start with `bench_`, so conftest does not collect it.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def interleaved_medians(fns: dict, rounds: int) -> dict[str, float]:
    """Median wall seconds of each callable over `rounds` in which they take turns (after one warm-up
    call each), so load from other processes on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def vm_hwm_mib() -> float:
    """High-water RSS of this process image (VmHWM; unlike ru_maxrss it does not inherit the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(script: str, *args: str) -> dict:
    """Run `python script *args` in a fresh process; returns the JSON object on its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
