"""Checkpoint layout, atomicity, validation and fallback (fastarcher/checkpoint.py).

References: the manifest written at save time (sizes, CRC-32 via zlib), hand-built replay buffers whose
rows carry their own ids, and the RNG streams' own outputs before and after a restore.
"""

import json
import os
import pickle
import random
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastarcher.checkpoint import (
    CheckpointError,
    Checkpointer,
    RankFile,
    check_checkpoint,
    config_differences,
    load_dcp,
    load_rank_file,
    resume_candidates,
    save_rank_file,
    tied_aliases,
)
from fastarcher.config import CheckpointConfig
from fastarcher.random_streams import RandomStreams
from fastarcher.replay import ReplayBuffer, TransitionBatch

REPO = Path(__file__).resolve().parents[1]
TINY = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.every 0 "
        "--eval.no-random-baseline --archer.batch-size 8 --archer.warmup-iterations 1 --replay.capacity 256 "
        "--log.no-progress --checkpoint.no-export-hf --checkpoint.no-save-on-sigterm").split()


def run_trainer(run_dir: Path, *flags: str):
    """Build, fit and finish a one-process trainer with the tiny settings; returns it."""
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    torch.set_num_threads(1)
    try:
        cfg = parse_config([*TINY, "--log.run-dir", str(run_dir), *flags])
        cfg.validate(world_size=1)
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        trainer.fit()
        trainer.save_final()
        trainer.logger.close()
        return trainer
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """3 iterations saving every iteration with keep_last 2 → iter_000002 and iter_000003 remain."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = run_trainer(run_dir, "--iterations", "3", "--checkpoint.save-every", "1", "--checkpoint.keep-last", "2")
    return SimpleNamespace(run_dir=run_dir, folder=run_dir / "checkpoints", trainer=trainer)


@pytest.fixture
def run_copy(saved_run, tmp_path):
    """A private copy of the saved run folder to damage."""
    dst = tmp_path / "run"
    shutil.copytree(saved_run.run_dir, dst)
    return dst


def _checkpointer(run_dir: Path, **cfg) -> Checkpointer:
    messages = []
    ck = Checkpointer(CheckpointConfig(save_on_sigterm=False, **cfg), run_dir, log=messages.append)
    ck.messages = messages
    return ck


# ------------------------------------------------------------------------------------------------------
# layout and manifest


def test_save_writes_complete_layout_latest_pointer_and_prunes_to_keep_last(saved_run):
    folder = saved_run.folder
    assert sorted(p.name for p in folder.iterdir()) == ["iter_000002", "iter_000003", "latest"]
    assert (folder / "latest").read_text().strip() == "iter_000003"
    ckpt = folder / "iter_000003"
    for name in ("manifest.json", "state.json", "model/.metadata", "model/__0_0.distcp",
                 "replay/rank_00000.safetensors", "rng/rank_00000.safetensors", "runner/rank_00000.safetensors",
                 "eval_runner/rank_00000.safetensors"):
        assert (ckpt / name).is_file(), name
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["iteration"] == 3 and manifest["world_size"] == 1
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry["size"] == len(data) and entry["crc32"] == zlib.crc32(data)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["iteration"] == 3 and state["parts"]["progress"]["iteration"] == 3
    assert [row["iteration"] for row in state["parts"]["logger"]["history"]] == [0, 1, 2, 3]
    # the actor stepped at iteration 2 (warm-up 1)
    assert sorted(state["sharded"]) == ["actor_opt", "critic", "critic_opt", "policy", "target"]
    assert sorted(state["parts"]) == ["guard", "logger", "progress"]
    assert check_checkpoint(ckpt) == []


def test_optimizer_that_never_stepped_is_not_saved(saved_run, tmp_path):
    # iteration 1 of a warm-up-1 run: the actor has not stepped yet, so its AdamW must stay uninitialised
    run_dir = tmp_path / "run"
    trainer = run_trainer(run_dir, "--iterations", "1")
    state = json.loads((run_dir / "checkpoints" / "iter_000001" / "state.json").read_text())
    assert sorted(state["sharded"]) == ["critic", "critic_opt", "policy", "target"]
    assert not trainer.actor_opt.state  # saving did not initialise it either


# ------------------------------------------------------------------------------------------------------
# damaged checkpoints


def _truncate(ckpt: Path):
    path = ckpt / "model" / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-100])
    return "truncated or replaced"


def _flip_byte(ckpt: Path):
    path = ckpt / "replay" / "rank_00000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "fails its CRC-32 check"


def _delete_file(ckpt: Path):
    (ckpt / "rng" / "rank_00000.safetensors").unlink()
    return "is missing"


def _no_manifest(ckpt: Path):
    (ckpt / "manifest.json").unlink()
    return "has no manifest.json (the save did not finish)"


def _garbage_manifest(ckpt: Path):
    (ckpt / "manifest.json").write_text("{not json")
    return "is unreadable"


def _future_format(ckpt: Path):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format"] = 99
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return "checkpoint format 99"


DAMAGE = [_truncate, _flip_byte, _delete_file, _no_manifest, _garbage_manifest, _future_format]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_damaged_checkpoint_is_detected_and_auto_falls_back_to_the_previous_one(run_copy, damage):
    newest = run_copy / "checkpoints" / "iter_000003"
    reason = damage(newest)
    problems = check_checkpoint(newest)
    assert problems and reason in " ".join(problems)
    ck = _checkpointer(run_copy, resume="auto")
    assert ck.resolve() == run_copy / "checkpoints" / "iter_000002"
    log = "\n".join(ck.messages)
    assert "skipping" in log and str(newest) in log and reason in log and "falling back" in log


def test_size_only_verification_misses_a_flipped_byte_but_crc_catches_it(run_copy):
    newest = run_copy / "checkpoints" / "iter_000003"
    _flip_byte(newest)
    assert check_checkpoint(newest, verify="size") == []
    assert check_checkpoint(newest, verify="crc32") != []


def test_auto_refuses_when_every_checkpoint_is_damaged_and_deletes_nothing(run_copy):
    for name in ("iter_000002", "iter_000003"):
        _truncate(run_copy / "checkpoints" / name)
    with pytest.raises(CheckpointError, match=r"found 2 checkpoint\(s\).*none is usable.*--checkpoint.resume none"):
        _checkpointer(run_copy, resume="auto").resolve()
    assert (run_copy / "checkpoints" / "iter_000002").is_dir() and (run_copy / "checkpoints" / "iter_000003").is_dir()


def test_explicit_damaged_checkpoint_is_an_error_without_fallback(run_copy):
    newest = run_copy / "checkpoints" / "iter_000003"
    _delete_file(newest)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume .*iter_000003.* cannot be used: .* is missing"):
        _checkpointer(run_copy, resume=str(newest)).resolve()


def test_explicit_run_folder_resolves_to_its_newest_valid_checkpoint(run_copy):
    assert _checkpointer(run_copy, resume=str(run_copy)).resolve() == run_copy / "checkpoints" / "iter_000003"


def test_half_written_tmp_folder_is_never_a_candidate(run_copy):
    folder = run_copy / "checkpoints"
    shutil.copytree(folder / "iter_000003", folder / ".tmp-iter_000004")  # a crash mid-save
    (folder / "iter_000002").rename(folder / ".tmp-iter_000002-old")
    shutil.rmtree(folder / "iter_000003")
    (folder / "latest").unlink()
    assert resume_candidates(folder) == []
    assert _checkpointer(run_copy, resume="auto").resolve() is None  # nothing valid: a fresh start


def test_broken_latest_pointer_falls_back_to_the_newest_folder(run_copy):
    folder = run_copy / "checkpoints"
    (folder / "latest").write_text("../../etc\n")
    assert resume_candidates(folder)[0] == folder / "iter_000003"
    (folder / "latest").write_text("iter_000002\n")  # the pointer wins over the folder order
    assert resume_candidates(folder)[0] == folder / "iter_000002"


def test_resume_none_moves_existing_checkpoints_aside(run_copy):
    ck = _checkpointer(run_copy, resume="none")
    assert ck.restore() is None
    folder = run_copy / "checkpoints"
    aside = [p for p in folder.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["iter_000002", "iter_000003"]
    assert not (folder / "latest").exists() and "moved to" in ck.messages[0]


def test_tampered_dcp_metadata_is_refused_without_running_code(run_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = run_copy / "checkpoints" / "iter_000003"
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dcp({"policy": {}}, ckpt / "model")
    assert not marker.exists()


def test_model_state_loads_through_the_safe_reader_and_tied_weights_are_stored_once(saved_run):
    policy = saved_run.trainer.policy
    aliases = tied_aliases(policy)
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    state = {"policy": {k: torch.zeros_like(v) for k, v in policy.state_dict().items() if k not in aliases}}
    load_dcp(state, saved_run.folder / "iter_000003" / "model")
    assert all(torch.equal(state["policy"][k], v) for k, v in policy.state_dict().items() if k not in aliases)
    with pytest.raises(CheckpointError, match="Missing key in checkpoint state_dict: policy.lm_head.weight"):
        load_dcp({"policy": {"lm_head.weight": torch.zeros(1)}}, saved_run.folder / "iter_000003" / "model")


# ------------------------------------------------------------------------------------------------------
# pieces


def test_random_streams_round_trip_through_a_rank_file_reproduces_every_stream(tmp_path):
    streams = RandomStreams(seed=3, rank=1)
    torch.manual_seed(5), np.random.seed(6), random.seed(7)

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), streams.py_rng.random(),
                *(torch.rand(2, generator=getattr(streams, g)).tolist()
                  for g in ("sample_gen", "buffer_gen", "cpu_gen")))

    save_rank_file(streams.state_dict(), tmp_path / "rng.safetensors")  # as on disk
    first = draw()
    streams.load_state_dict(load_rank_file(tmp_path / "rng.safetensors"))
    assert draw() == first
    streams.load_resharded([], rank=1, world_size=2, iteration=4)  # another world size: derived again
    again = draw()
    streams.load_resharded([], rank=1, world_size=2, iteration=4)
    assert draw() == again != first


def _save_shard(buf: ReplayBuffer, path: Path) -> None:
    save_rank_file(buf.state_dict(), path)


def _redistribute(buf: ReplayBuffer, paths: list[Path], rank: int, world_size: int) -> int:
    return buf.load_resharded([RankFile(p) for p in paths], rank, world_size)


def _buffer_with_ids(n_rows: int, first_id: int, capacity: int) -> ReplayBuffer:
    """Rows whose reward is their id; added in chunks so the write pointer wraps."""
    buf = ReplayBuffer(capacity, 4, 2, 2, pad_id=0)
    ids = torch.arange(first_id, first_id + n_rows, dtype=torch.float32)
    for chunk in ids.split(3):
        b = len(chunk)
        buf.add(TransitionBatch(state_ids=torch.ones(b, 4, dtype=torch.long), state_len=torch.full((b,), 4),
                                action_ids=torch.ones(b, 2, dtype=torch.long), action_len=torch.full((b,), 2),
                                next_obs_ids=torch.ones(b, 2, dtype=torch.long), next_obs_len=torch.full((b,), 1),
                                reward=chunk, done=torch.zeros(b), mc_return=chunk * 2))
    return buf


def _rows_oldest_first(buf: ReplayBuffer) -> list[float]:
    sd = buf.state_dict()
    ptr, size = int(sd["meta"][5]), int(sd["meta"][6])
    slots = (ptr - size + torch.arange(size)) % buf.capacity
    return sd["reward"][slots].tolist()


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_replay_shards_are_pooled_and_dealt_out_oldest_first(tmp_path, old_world, new_world):
    # old shard k holds rows k*100 + 0..9 (capacity 8: the oldest two were overwritten → 2..9 remain)
    paths = []
    for k in range(old_world):
        path = tmp_path / f"rank_{k}.safetensors"
        _save_shard(_buffer_with_ids(10, 100 * k, capacity=8), path)
        paths.append(path)
    expected = sorted((age, k, 100 * k + 2 + age) for k in range(old_world) for age in range(8))  # by age, rank
    pooled = [row for _, _, row in expected]
    got = []
    for rank in range(new_world):
        buf = ReplayBuffer(64, 4, 2, 2, pad_id=0)
        added = _redistribute(buf, paths, rank, new_world)
        rows = _rows_oldest_first(buf)
        assert added == len(rows) == len(pooled[rank::new_world])
        assert rows == pooled[rank::new_world]  # round-robin over the pooled order, oldest first
        assert buf.state_dict()["mc_return"][: len(rows)].tolist() == [2 * r for r in rows]
        got.extend(rows)
    assert sorted(got) == sorted(pooled)


def test_redistributing_into_a_smaller_buffer_keeps_the_newest_rows(tmp_path):
    paths = []
    for k in range(2):
        path = tmp_path / f"rank_{k}.safetensors"
        _save_shard(_buffer_with_ids(6, 100 * k, capacity=8), path)
        paths.append(path)
    buf = ReplayBuffer(4, 4, 2, 2, pad_id=0)
    _redistribute(buf, paths, 0, 1)
    assert _rows_oldest_first(buf) == [4.0, 104.0, 5.0, 105.0]


def test_two_saves_of_the_same_state_write_byte_identical_replay_and_rng_files(saved_run, tmp_path):
    parts = saved_run.trainer.checkpointer.parts
    saved = [Checkpointer(CheckpointConfig(save_on_sigterm=False), tmp_path / f"run_{k}", parts).save(3)
             for k in range(4)]
    for part in ("replay/rank_00000.safetensors", "rng/rank_00000.safetensors", "state.json"):
        assert len({(path / part).read_bytes() for path in saved}) == 1, part


def test_replay_shard_with_inconsistent_counters_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    config = CheckpointConfig(save_on_sigterm=False)
    ckpt = Checkpointer(config, tmp_path / "run", {"replay": _buffer_with_ids(5, 0, capacity=8)}).save(1)
    path = ckpt / "replay" / "rank_00000.safetensors"
    tensors = load_file(str(path))
    tensors["meta"][6] = 7  # claims 7 filled rows; the file holds 5 and the write pointer says 5
    save_file(tensors, str(path))
    fresh = Checkpointer(config, tmp_path / "run", {"replay": ReplayBuffer(8, 4, 2, 2, pad_id=0)})
    with pytest.raises(CheckpointError, match=r"replay/rank_00000.safetensors cannot be loaded: replay meta is "
                                              r"inconsistent"):
        fresh.load(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if saved by two ranks
    shutil.copy(path, path.with_name("rank_00001.safetensors"))
    with pytest.raises(CheckpointError, match="replay shards of .* cannot be redistributed: replay meta is "
                                              "inconsistent"):
        fresh.load(ckpt)


def test_config_differences_lists_dotted_fields():
    saved = {"model": {"hidden_size": 64, "dtype": "float32"}, "iterations": 10, "seed": 0}
    current = {"model": {"hidden_size": 128, "dtype": "float32"}, "iterations": 20, "seed": 0}
    assert config_differences(saved, current) == [("iterations", 10, 20), ("model.hidden_size", 64, 128)]


def test_config_check_refuses_shape_changes_but_not_unused_envs_or_new_fields(tmp_path):
    ck = _checkpointer(tmp_path)
    saved = {"env": {"name": "guess_number", "guess_number": {"high": 16}, "frozenlake": {"size": 4}},
             "model": {"hidden_size": 64}, "optim": {"actor_lr": 1e-5}}
    current = {"env": {"name": "guess_number", "guess_number": {"high": 16}, "frozenlake": {"size": 8}},
               "model": {"hidden_size": 64, "new_field": 1}, "optim": {"actor_lr": 2e-5}}
    ck.config = current
    ck._check_config(tmp_path, saved)  # another env's setting, a field the old version lacked: fine
    assert "env.frozenlake.size 4 → 8" in ck.messages[-1] and "optim.actor_lr 1e-05 → 2e-05" in ck.messages[-1]
    assert "model.new_field '<absent>' → 1" in ck.messages[-1]
    current["env"]["guess_number"]["high"] = 32
    with pytest.raises(CheckpointError, match=r"env.guess_number.high=16 in the checkpoint but 32 now"):
        ck._check_config(tmp_path, saved)


# ------------------------------------------------------------------------------------------------------
# the state contract: the checkpointer saves whatever parts it is handed


class _Counter:
    checkpoint_scope = "run"

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_any_parts_round_trip_through_save_and_load_by_their_scope(tmp_path):
    from fastarcher.checkpoint import ModelState, OptimizerState

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    buf, counter = _buffer_with_ids(5, 0, capacity=8), _Counter(7)
    parts = {"net": ModelState(model), "net_opt": OptimizerState(model, opt, "net_opt"), "replay": buf,
             "counter": counter}
    config = CheckpointConfig(save_on_sigterm=False)
    ckpt = Checkpointer(config, tmp_path / "run", parts, config={"seed": 1}).save(4)
    assert {p.name for p in ckpt.iterdir()} == {"model", "replay", "state.json", "manifest.json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["sharded"] == ["net", "net_opt"] and state["parts"] == {"counter": {"value": 7}}
    saved_weight, saved_moment = model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone()

    with torch.no_grad():
        model.weight.zero_()
    opt.state[model.weight]["exp_avg"].zero_()
    counter.value = 0
    fresh_buf = ReplayBuffer(8, 4, 2, 2, pad_id=0)
    parts["replay"] = fresh_buf
    loader = Checkpointer(config, tmp_path / "run", parts, config={"seed": 1})
    assert loader.load(ckpt) == 4
    assert torch.equal(model.weight, saved_weight) and torch.equal(opt.state[model.weight]["exp_avg"], saved_moment)
    assert counter.value == 7 and _rows_oldest_first(fresh_buf) == _rows_oldest_first(buf)

    parts["other"] = _Counter()  # a part this checkpoint never held
    with pytest.raises(CheckpointError, match="holds no state for other"):
        Checkpointer(config, tmp_path / "run", parts, config={"seed": 1}).load(ckpt)


def test_a_part_without_the_contract_is_refused_when_the_checkpointer_is_built(tmp_path):
    with pytest.raises(TypeError, match=r"part 'counter' .* lacks \['a valid checkpoint_scope'\]"):
        Checkpointer(CheckpointConfig(), tmp_path, {"counter": SimpleNamespace(state_dict=dict, load_state_dict=print)})
    with pytest.raises(TypeError, match=r"lacks \['load_state_dict'\]"):
        Checkpointer(CheckpointConfig(), tmp_path, {"x": SimpleNamespace(checkpoint_scope="run", state_dict=dict)})
