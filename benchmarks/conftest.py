"""Benchmark configuration: collect `bench_*.py` files and print ratio tables at the end of the run.

    pytest benchmarks/ --benchmark-only              # CPU set (GPU set skipped without CUDA)
    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json

Each benchmark records its median time and peak memory under a group; the summary prints every
provider's ratio against the group's baseline measured in the same run.
"""
from __future__ import annotations

import fnmatch

import pytest

RATIOS_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a small shared machine,
    several threads make timings mostly contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py as test modules, unless pytest.ini's python_files already does (or the
    file was named on the command line, which pytest collects by itself)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern)
           for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


class RatioTable:
    """Per group: the baseline name and {provider: {"time_s", "peak_mib", "max_err", "note"}}."""

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}

    def record(self, group: str, provider: str, *, baseline: str, time_s: float | None,
               peak_mib: float | None, max_err: float | None = None, note: str = "") -> None:
        entry = self.groups.setdefault(group, {"baseline": baseline, "rows": {}})
        entry["rows"][provider] = {"time_s": time_s, "peak_mib": peak_mib, "max_err": max_err,
                                   "note": note}

    def lines(self) -> list[str]:
        out = [f"{'group':<44} {'provider':<14} {'time ms':>9} {'speedup':>8} {'peak MiB':>10} "
               f"{'mem ratio':>9} {'max err':>9}  note"]
        for group, entry in self.groups.items():
            base = entry["rows"].get(entry["baseline"], {})
            for provider, row in entry["rows"].items():
                speed = _ratio(base.get("time_s"), row["time_s"])
                mem = _ratio(base.get("peak_mib"), row["peak_mib"])
                out.append(f"{group:<44} {provider:<14} {_fmt(row['time_s'], 1e3):>9} {speed:>8} "
                           f"{_fmt(row['peak_mib']):>10} {mem:>9} "
                           f"{_fmt_err(row['max_err']):>9}  {row['note']}")
        return out


def _fmt(value, scale=1.0):
    return "-" if value is None else f"{value * scale:.1f}"


def _fmt_err(value):
    return "-" if value is None else f"{value:.1e}"


def _ratio(base, value):
    # Ratios are baseline / provider: > 1 means faster or leaner than the baseline.
    if base is None or value is None or value <= 0:
        return "-"
    return f"{base / value:.2f}x"


@pytest.fixture(scope="session")
def ratio_table(request) -> RatioTable:
    return request.config.stash.setdefault(RATIOS_KEY, RatioTable())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = config.stash.get(RATIOS_KEY, None)
    if table is None or not table.groups:
        return
    terminalreporter.section("ratios vs baseline, same run (baseline / provider)")
    for line in table.lines():
        terminalreporter.write_line(line)
