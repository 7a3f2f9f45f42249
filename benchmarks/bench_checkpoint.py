"""Checkpoint size and save / load / verify seconds: the tiny CPU preset and a Qwen2-0.5B-shaped policy
with a full 100k-transition replay buffer.

    pytest benchmarks/bench_checkpoint.py --benchmark-only                       # both shapes
    pytest benchmarks/bench_checkpoint.py --benchmark-only -k tiny               # seconds
    FASTARCHER_BENCH_CKPT_DTYPE=float32 pytest benchmarks/bench_checkpoint.py --benchmark-only -k qwen

What is timed is `Checkpointer.save` (DCP for policy / critic / target / both AdamW states, the replay
shard and RNG in safetensors, fsync, CRC-32 manifest, atomic rename), `Checkpointer.load` (the same
back into live modules, in place) and `check_checkpoint` (the CRC-32 pass a resume runs first).
Baseline, measured in the same run: one `torch.save` of the same state into one file, and
`torch.load(weights_only=True)` of it (no fsync, no checksum, no atomic rename, not shardable).

The 0.5B shape is Qwen2-0.5B's (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, vocabulary
151,936, tied embeddings: 494M parameters), random init, bf16 by default (fp32 doubles every figure
but the buffer's). The replay buffer uses the default ReplayConfig (capacity 100,000; states 512, actions
16, observations 128 tokens, int32). Peak memory stays near 3 × the model + optimizer bytes (live state
plus the baseline's loaded copy); bf16 keeps it under 8 GiB. Loads read from the page cache (the files
were just written); a cold read is bounded by the disk instead.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastarcher.checkpoint import Checkpointer, ModelState, OptimizerState, check_checkpoint
from fastarcher.config import CheckpointConfig, GuardConfig, ReplayConfig, TrainConfig
from fastarcher.critic import CriticConfig, DoubleCritic, make_target
from fastarcher.guards import StepGuard
from fastarcher.random_streams import RandomStreams
from fastarcher.replay import ReplayBuffer, TransitionBatch

DTYPE = getattr(torch, os.environ.get("FASTARCHER_BENCH_CKPT_DTYPE", "bfloat16"))
BASELINE = "torch_save"
ROUNDS = {"tiny": 5, "qwen0.5b": 1}
"""Timed rounds per shape (the 0.5B round writes about 3 GiB)."""

SHAPES = {
    "tiny": dict(replay=ReplayConfig(capacity=20_000, max_state_len=64, max_action_len=4, max_obs_len=8)),
    "qwen0.5b": dict(replay=ReplayConfig()),  # capacity 100k, 512 / 16 / 128
}


def _policy(shape: str):
    if shape == "tiny":
        from fastarcher.model import ModelConfig, load_policy

        policy, tokenizer = load_policy(ModelConfig())
        return policy, len(tokenizer)
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=DTYPE), config.vocab_size


def _initialise_adam(module, optimizer) -> None:
    """One zero-gradient, zero-lr step: Adam moments exist (as after real training), parameters unchanged."""
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.param_groups[0]["lr"] = 0.0
    optimizer.step()
    optimizer.param_groups[0]["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _full_buffer(cfg: ReplayConfig, vocab: int) -> ReplayBuffer:
    buffer = ReplayBuffer(cfg.capacity, cfg.max_state_len, cfg.max_action_len, cfg.max_obs_len, pad_id=0)
    g = torch.Generator().manual_seed(0)
    for start in range(0, cfg.capacity, 10_000):
        b = min(10_000, cfg.capacity - start)
        buffer.add(TransitionBatch(
            state_ids=torch.randint(vocab, (b, cfg.max_state_len), generator=g),
            state_len=torch.randint(1, cfg.max_state_len + 1, (b,), generator=g),
            action_ids=torch.randint(vocab, (b, cfg.max_action_len), generator=g),
            action_len=torch.randint(1, cfg.max_action_len + 1, (b,), generator=g),
            next_obs_ids=torch.randint(vocab, (b, cfg.max_obs_len), generator=g),
            next_obs_len=torch.randint(0, cfg.max_obs_len + 1, (b,), generator=g),
            reward=torch.rand(b, generator=g), done=(torch.rand(b, generator=g) < 0.2).float(),
            mc_return=torch.rand(b, generator=g)))
    return buffer


def build_state(shape: str):
    """The trainer's checkpoint parts, without the rollout machinery (`parts` is what Checkpointer gets)."""
    torch.manual_seed(0)
    policy, vocab = _policy(shape)
    critic = DoubleCritic(CriticConfig(), vocab_size=vocab, pad_id=0)
    actor_opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    _initialise_adam(policy, actor_opt)
    _initialise_adam(critic, critic_opt)
    cfg = replace(TrainConfig(), replay=SHAPES[shape]["replay"])
    state = SimpleNamespace(cfg=cfg, policy=policy, critic=critic, target=make_target(critic), actor_opt=actor_opt,
                            critic_opt=critic_opt, buffer=_full_buffer(cfg.replay, vocab), iteration=1)
    state.parts = {
        "policy": ModelState(policy), "critic": ModelState(critic), "target": ModelState(state.target),
        "actor_opt": OptimizerState(policy, actor_opt, "actor_opt"),
        "critic_opt": OptimizerState(critic, critic_opt, "critic_opt"),
        "replay": state.buffer, "rng": RandomStreams(seed=0, rank=0), "guard": StepGuard(GuardConfig()),
    }
    return state


def _nbytes(module_or_opt) -> int:
    if isinstance(module_or_opt, torch.optim.Optimizer):
        return sum(t.numel() * t.element_size() for s in module_or_opt.state.values() for t in s.values()
                   if torch.is_tensor(t))
    return sum(p.numel() * p.element_size() for p in module_or_opt.parameters())


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    shape = request.param
    t0 = time.perf_counter()
    state = build_state(shape)
    root = tmp_path_factory.mktemp(f"bench_{shape}")
    parts = {name: _nbytes(getattr(state, name)) for name in ("policy", "critic", "actor_opt", "critic_opt")}
    parts["replay"] = state.buffer.nbytes
    print(f"\n[{shape}] built in {time.perf_counter() - t0:.1f} s; bytes: "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in parts.items()))
    yield SimpleNamespace(shape=shape, state=state, root=root, parts=parts, saved=None)
    shutil.rmtree(root, ignore_errors=True)


def _record(ratio_table, case, op: str, provider: str, seconds: float, note: str = "") -> None:
    ratio_table.record(f"checkpoint_{op}[{case.shape}]", provider, baseline=BASELINE, time_s=seconds, peak_mib=None,
                       note=note)


def _torch_save_state(state) -> dict:
    return {"policy": state.policy.state_dict(), "critic": state.critic.state_dict(),
            "target": state.target.state_dict(), "actor_opt": state.actor_opt.state_dict(),
            "critic_opt": state.critic_opt.state_dict(), "replay": state.buffer.state_dict()}


def test_save_torch_save_baseline(benchmark, case, ratio_table):
    path = case.root / "baseline.pt"
    benchmark.pedantic(lambda: torch.save(_torch_save_state(case.state), path), rounds=ROUNDS[case.shape], iterations=1)
    size = path.stat().st_size
    benchmark.extra_info.update(bytes=size)
    _record(ratio_table, case, "save", BASELINE, benchmark.stats.stats.median, f"{size / 2**20:.0f} MiB, one file")


def test_load_torch_load_baseline(benchmark, case, ratio_table):
    path = case.root / "baseline.pt"
    if not path.exists():
        torch.save(_torch_save_state(case.state), path)
    result = benchmark.pedantic(lambda: torch.load(path, weights_only=True), rounds=ROUNDS[case.shape], iterations=1)
    del result
    _record(ratio_table, case, "load", BASELINE, benchmark.stats.stats.median, "into new tensors")
    path.unlink()


def test_save_checkpointer(benchmark, case, ratio_table):
    ck = Checkpointer(CheckpointConfig(save_on_sigterm=False, keep_last=1), case.root / "run", case.state.parts,
                      log=lambda m: None)

    def save():
        case.state.iteration += 1  # a new checkpoint folder every round
        return ck.save(case.state.iteration)

    case.saved = benchmark.pedantic(save, rounds=ROUNDS[case.shape], iterations=1)
    size = _folder_bytes(case.saved)
    parts = {p: _folder_bytes(case.saved / p) for p in ("model", "replay", "rng")}
    benchmark.extra_info.update(bytes=size, **{f"bytes_{k}": v for k, v in parts.items()})
    note = f"{size / 2**20:.0f} MiB: model+optim {parts['model'] / 2**20:.0f}, replay {parts['replay'] / 2**20:.0f}"
    _record(ratio_table, case, "save", "checkpointer", benchmark.stats.stats.median, note)
    assert check_checkpoint(case.saved) == []


def test_verify_crc32(benchmark, case, ratio_table):
    if case.saved is None:
        pytest.skip("needs test_save_checkpointer first")
    problems = benchmark.pedantic(lambda: check_checkpoint(case.saved, verify="crc32"), rounds=ROUNDS[case.shape],
                                  iterations=1)
    assert problems == []
    _record(ratio_table, case, "load", "crc32_verify", benchmark.stats.stats.median, "resume runs this before load")


def test_load_checkpointer(benchmark, case, ratio_table):
    if case.saved is None:
        pytest.skip("needs test_save_checkpointer first")
    ck = Checkpointer(CheckpointConfig(save_on_sigterm=False), case.root / "run", case.state.parts, log=lambda m: None)
    before = next(case.state.policy.parameters()).detach().clone()
    with torch.no_grad():
        next(case.state.policy.parameters()).zero_()  # so the load has something to restore
    benchmark.pedantic(lambda: ck.load(case.saved), rounds=ROUNDS[case.shape], iterations=1)
    assert torch.equal(next(case.state.policy.parameters()), before)
    _record(ratio_table, case, "load", "checkpointer", benchmark.stats.stats.median, "in place into live modules")
