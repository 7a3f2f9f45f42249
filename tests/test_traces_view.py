"""Trace viewer: a self-contained HTML page (no external resources) with both token columns and the plot."""
import base64
import re
import subprocess
import sys

import numpy as np
import pytest

from fastarcher.traces import view
from fastarcher.traces.artifacts import load_step
from fastarcher.traces.testing import write_demo_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    write_demo_run(path, steps=3, batch=6, length=14)
    return path


def test_page_is_self_contained_and_shows_both_traces(run_dir, tmp_path):
    out = tmp_path / "page.html"
    assert view.main([str(run_dir), "--step", "1", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing fetched from anywhere
    assert "<script" not in page
    png = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    ent, inf = load_step(run_dir / "entropy_trace", 1), load_step(run_dir / "influence_trace", 1)
    assert page.count('class="tok"') == ent["token_ids"].size + inf["token_ids"].size
    assert page.count('class="resp"') == 6
    assert page.count("<h3>entropy</h3>") == 6 and page.count("<h3>influence</h3>") == 6
    # every token's tooltip carries its values: check the largest influence score is shown
    n = int(np.argmax(np.abs(inf["token_scores"])))
    assert f"score={float(inf['token_scores'][n]):+.4g}" in page


def test_default_step_and_output_path_via_module_cli(run_dir):
    result = subprocess.run([sys.executable, "-m", "fastarcher.traces.view", str(run_dir)], capture_output=True,
                            text=True, check=True)
    out = run_dir / "trace_view_step_000002.html"
    assert result.stdout.strip() == str(out) and out.exists()


def test_unknown_step_is_reported(run_dir):
    with pytest.raises(ValueError, match=r"--step 9 was not traced; traced steps: \[0, 1, 2\]"):
        view.build_page(run_dir, 9)


def test_token_colours_follow_values():
    assert view._mix((230, 85, 13), 0.0) == "rgb(255,255,255)"
    assert view._mix((230, 85, 13), 1.0) == "rgb(230,85,13)"
    assert view._mix((230, 85, 13), 7.0) == "rgb(230,85,13)"  # clipped
    assert view._mix((0, 0, 0), 0.5) == "rgb(128,128,128)"
