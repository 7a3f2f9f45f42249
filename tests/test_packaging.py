"""Packaging (setup.py): `kernels/` installs as `fastarcher.kernels`, never as a top-level `kernels` module
that would shadow PyPI's `kernels` package (required by sglang, probed by transformers).

Run in a subprocess whose working directory is outside the repository, so the repository root is not on
sys.path the way it is for pytest.
"""
import json
from pathlib import Path

import pytest

from dist_helpers import REPO, describe, run_python

PROBE = r"""
import importlib.util, json, sys
import fastarcher, fastarcher.kernels
from fastarcher.kernels import reference
try:
    import kernels
    top = getattr(kernels, "__file__", None) or str(list(getattr(kernels, "__path__", [])))
except ImportError:
    top = None
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "fastarcher": fastarcher.__file__,
    "fastarcher_kernels": fastarcher.kernels.__file__,
    "reference": reference.__file__,
    "top_level_kernels": top,
    "top_level_spec": None if spec is None else str(spec.origin or list(spec.submodule_search_locations or [])),
    "path": sys.path,
}))
"""


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    proc = run_python(["-c", PROBE], cwd=tmp_path_factory.mktemp("outside_repo"), timeout=120)
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fastarcher_kernels_resolves_to_the_repository_kernels_folder(found):
    assert Path(found["fastarcher_kernels"]).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert Path(found["reference"]).resolve() == (REPO / "kernels" / "reference.py").resolve()
    assert Path(found["fastarcher"]).resolve() == (REPO / "fastarcher" / "__init__.py").resolve()


def test_import_kernels_is_not_our_folder(found):
    assert str(REPO) not in found["path"]  # the probe really ran outside the repository
    ours = str((REPO / "kernels").resolve())
    for where in (found["top_level_kernels"], found["top_level_spec"]):
        assert where is None or ours not in where, where


def test_setup_maps_kernels_under_fastarcher_only():
    text = (REPO / "setup.py").read_text()
    assert '"fastarcher.kernels": "kernels"' in text
    assert '"kernels"' not in text.replace('"fastarcher.kernels": "kernels"', "")


def test_setup_lists_every_subpackage_of_fastarcher():
    # a subpackage missing from setup.py works in an editable install and is absent from a wheel
    text = (REPO / "setup.py").read_text()
    found = sorted("fastarcher." + ".".join(p.parent.relative_to(REPO / "fastarcher").parts)
                   for p in (REPO / "fastarcher").rglob("__init__.py") if p.parent != REPO / "fastarcher")
    assert found and all(f'"{name}"' in text for name in found), found
