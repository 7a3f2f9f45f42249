"""A planted checkpoint must never run code (fastarcher/checkpoint.py load path, fastarcher/export.py).

Reference: a real checkpoint written by the trainer's own save path (both AdamW optimizers stepped, so
the DCP files hold non-tensor `param_groups` items). Each attack rewrites its files the way anyone with
write access could: payload bytes in place, or a `.metadata` rebuilt from DCP's own classes, then the
manifest's sizes and CRC-32 recomputed. A payload's side effect is a marker file that must never appear.
"""

import copy
import io
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from fastarcher.checkpoint import (
    CheckpointError,
    Checkpointer,
    SafeFileSystemReader,
    check_checkpoint,
    load_dcp,
)
from fastarcher.config import CheckpointConfig
from fastarcher.export import main as export_main

from dist_helpers import describe, run_python, run_torchrun
from test_checkpoint import TINY, run_trainer

LR = "actor_opt.param_groups.0.lr"
TENSOR_KEY = "policy.model.norm.weight"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """2 iterations saving every iteration: iter_000001 (critic optimizer only), iter_000002 (both)."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("ckpt_security") / "run"
    trainer = run_trainer(run_dir, "--iterations", "2", "--checkpoint.save-every", "1")
    ckpt = run_dir / "checkpoints" / "iter_000002"
    assert {"actor_opt", "critic_opt"} <= set(json.loads((ckpt / "state.json").read_text())["sharded"])
    return SimpleNamespace(run_dir=run_dir, ckpt=ckpt, trainer=trainer)


@pytest.fixture
def run_copy(saved_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved_run.run_dir, dst)
    return dst


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------
# planting, as an attacker with write access to the folder would


def _metadata(ckpt: Path):
    return SafeFileSystemReader(str(ckpt / "model")).read_metadata()


def _reseal(ckpt: Path) -> None:
    """Recompute every manifest entry (size and CRC-32), including files the attacker added."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for path in ckpt.rglob("*"):
        if path.is_file() and path.name != "manifest.json":
            data = path.read_bytes()
            manifest["files"][str(path.relative_to(ckpt))] = {"size": len(data), "crc32": zlib.crc32(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert check_checkpoint(ckpt) == []


def plant_in_place(ckpt: Path, fqn: str, blob: bytes) -> None:
    """Overwrite the byte range of item `fqn` in its .distcp file (padded with zeros; pickle stops at STOP)."""
    info = _metadata(ckpt).storage_data[MetadataIndex(fqn)]
    assert len(blob) <= info.length
    path = ckpt / "model" / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset:info.offset + info.length] = blob.ljust(info.length, b"\0")
    path.write_bytes(bytes(data))
    _reseal(ckpt)


def plant_as_bytes_item(ckpt: Path, fqn: str, blob: bytes) -> None:
    """A new `.metadata`, built only from DCP's own classes, declaring `fqn` a non-tensor item stored in
    a new file holding `blob`."""
    metadata = _metadata(ckpt)
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != fqn}
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(relative_path="__9_0.distcp", offset=0,
                                                             length=len(blob))
    (ckpt / "model" / "__9_0.distcp").write_bytes(blob)
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(ckpt)


def _attack_in_place(ckpt: Path, marker: Path) -> str:
    plant_in_place(ckpt, LR, pickle.dumps(_Payload(marker), protocol=2))
    return f"{LR} cannot be read as a plain value (Trying to load unsupported GLOBAL posix.system"


def _attack_tensor_as_bytes(ckpt: Path, marker: Path) -> str:
    plant_as_bytes_item(ckpt, TENSOR_KEY, pickle.dumps(_Payload(marker), protocol=2))
    return f"declares {TENSOR_KEY} a non-tensor item, but it is a tensor"


def _resume_auto(run_dir: Path, ckpt: Path, out: Path):
    return run_trainer(run_dir, "--iterations", "3", "--checkpoint.resume", "auto")


def _resume_path(run_dir: Path, ckpt: Path, out: Path):
    return run_trainer(run_dir, "--iterations", "3", "--checkpoint.resume", str(ckpt))


def _export(run_dir: Path, ckpt: Path, out: Path):
    try:
        export_main([str(ckpt), str(out)])
    except SystemExit as error:  # the CLI's one-line error: the same text a CheckpointError carries
        raise CheckpointError(str(error)) from None


# the export reads only the policy's tensors: an optimizer item is never read there (tested below)
CASES = [(_attack_in_place, _resume_auto), (_attack_in_place, _resume_path),
         (_attack_tensor_as_bytes, _resume_auto), (_attack_tensor_as_bytes, _resume_path),
         (_attack_tensor_as_bytes, _export)]


@pytest.mark.parametrize("attack, entry", CASES, ids=[f"{a.__name__.strip('_')}-{e.__name__.strip('_')}"
                                                      for a, e in CASES])
def test_planted_pickle_is_refused_without_running_code(run_copy, tmp_path, attack, entry):
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "iter_000002"
    reason = attack(ckpt, marker)
    with pytest.raises(CheckpointError) as error:
        entry(run_copy, ckpt, tmp_path / "exported")
    assert not marker.exists(), "the planted pickle ran"
    message = str(error.value)
    assert f"cannot load the model state in {ckpt / 'model'}: " in message and reason in message, message
    assert "\n" not in message
    assert "FrameSummary" not in message and "Traceback" not in message
    assert not (tmp_path / "exported").exists()


def test_export_never_reads_the_optimizer_items(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "iter_000002"
    _attack_in_place(ckpt, marker)
    export_main([str(ckpt), str(tmp_path / "exported")])
    assert not marker.exists() and (tmp_path / "exported" / "config.json").is_file()


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_cli_stops_with_one_line_error_and_never_runs_the_payload(run_copy, tmp_path, nproc):
    # with 2 processes every rank reads the optimizer items: both must refuse, and neither may hang
    marker = tmp_path / "pwned"
    ckpt = run_copy / "checkpoints" / "iter_000002"
    _attack_in_place(ckpt, marker)
    args = ["-m", "fastarcher.train", *TINY, "--log.run-dir", str(run_copy), "--iterations", "3",
            "--checkpoint.resume", "auto"]
    done = run_python(args) if nproc == 1 else run_torchrun(args, nproc=nproc, timeout=120)
    assert not marker.exists(), "the planted pickle ran"
    assert done.returncode != 0, describe(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("checkpoint error: ")]
    assert 1 <= len(errors) <= nproc and len(set(errors)) == 1, describe(done)  # every rank says the same
    assert errors[0].startswith("checkpoint error: cannot load the model state in") and LR in errors[0]
    if nproc == 1:  # under torchrun the launcher adds its own traceback
        assert done.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in done.stderr, describe(done)


# ------------------------------------------------------------------------------------------------------
# what loads, and only as what the state being loaded into expects


def _private_state(trainer) -> dict:
    """The DCP state dict of the trainer, detached from its live tensors (a load must not touch them)."""
    parts = trainer.checkpointer.parts
    return copy.deepcopy({name: parts[name].state_dict()
                          for name in ("policy", "critic", "target", "actor_opt", "critic_opt")})


def test_normal_checkpoint_loads_every_tensor_and_plain_value_exactly(saved_run):
    expected = _private_state(saved_run.trainer)  # the trainer's state is what it saved last
    state = _private_state(saved_run.trainer)
    for name in ("actor_opt", "critic_opt"):  # every leaf must come back from the file
        for group in state[name]["param_groups"]:
            group.update(lr=0.5, betas=(0.0, 0.0), eps=1.0, amsgrad=True, foreach=True, params=[])
    with torch.no_grad():
        for part in ("policy", "critic", "target"):
            for tensor in state[part].values():
                tensor.zero_()
    load_dcp(state, saved_run.ckpt / "model")
    flat_state, flat_expected = _leaves(state), _leaves(expected)
    assert flat_state.keys() == flat_expected.keys()
    for key, want in flat_expected.items():
        got = flat_state[key]
        if torch.is_tensor(want):
            assert torch.equal(got, want), key
        else:
            assert got == want and type(got) is type(want), (key, got, want)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{name}.").items()}
    return {prefix: tree}


def test_plain_value_declared_where_a_tensor_is_expected_is_refused(run_copy, saved_run):
    # a harmless pickle, but it would silently replace a weight of the policy with a float
    ckpt = run_copy / "checkpoints" / "iter_000002"
    plant_as_bytes_item(ckpt, TENSOR_KEY, _torch_saved(3.0))
    state = _private_state(saved_run.trainer)
    with pytest.raises(CheckpointError, match=f"{TENSOR_KEY}.*tensor"):
        load_dcp(state, ckpt / "model")


@pytest.mark.parametrize("value, kind", [(torch.ones(3), "Tensor"), ("fast", "str"), ([0.1, 0.2], "list"),
                                         ({"a": 1}, "dict")])
def test_non_tensor_item_of_the_wrong_kind_is_refused(run_copy, saved_run, value, kind):
    ckpt = run_copy / "checkpoints" / "iter_000002"
    blob = _torch_saved(value)
    plant_as_bytes_item(ckpt, LR, blob)
    state = _private_state(saved_run.trainer)
    with pytest.raises(CheckpointError, match=f"{LR}.* {kind} where a number"):
        load_dcp(state, ckpt / "model")


def test_metadata_pointing_outside_the_checkpoint_folder_is_refused(run_copy, saved_run):
    ckpt = run_copy / "checkpoints" / "iter_000002"
    metadata = _metadata(ckpt)
    index = MetadataIndex(LR)
    metadata.storage_data[index] = _StorageInfo(relative_path="../../state.json", offset=0, length=10)
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"\.\./\.\./state\.json.*outside"):
        load_dcp(_private_state(saved_run.trainer), ckpt / "model")


# ------------------------------------------------------------------------------------------------------
# clean reasons


def test_dcp_load_failure_is_one_clean_line(saved_run):
    with pytest.raises(CheckpointError) as error:
        load_dcp({"policy": {"no.such.weight": torch.zeros(1)}}, saved_run.ckpt / "model")
    assert str(error.value) == (f"cannot load the model state in {saved_run.ckpt / 'model'}: "
                                f"Missing key in checkpoint state_dict: policy.no.such.weight.")


@pytest.mark.parametrize("text, reason", [
    ("[]", "is not a JSON object"), ("3", "is not a JSON object"), ('"iter"', "is not a JSON object"),
    ('{"format": 1, "files": []}', "'files' is not an object"),
    ('{"format": 1, "files": {"trainer.json": 3}}', "trainer.json has no integer size"),
    ('{"format": 1, "files": {"../iter_000001/trainer.json": {"size": 1}}}', "outside"),
])
def test_manifest_that_is_json_but_not_a_manifest_is_reported_and_skipped(run_copy, text, reason):
    newest = run_copy / "checkpoints" / "iter_000002"
    (newest / "manifest.json").write_text(text)
    problems = check_checkpoint(newest)
    assert len(problems) == 1 and reason in problems[0] and "manifest.json" in problems[0], problems
    messages = []
    ck = Checkpointer(CheckpointConfig(resume="auto", save_on_sigterm=False), run_copy, log=messages.append)
    assert ck.resolve() == run_copy / "checkpoints" / "iter_000001"
    assert any("skipping" in m and reason in m for m in messages), messages
