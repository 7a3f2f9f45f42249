"""The memory planner (fastarcher/plan.py): resident parts from exact parameter counts, and the actor step's
peak (measured on fake tensors) against the resident-set growth of the same step run for real in a fresh
process (large allocations mmapped, so freed tensors leave the resident set)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from dist_helpers import REPO, subprocess_env
from fastarcher.plan import plan_memory
from fastarcher.train import parse_config

MODEL = ["--model.hidden-size", "256", "--model.num-layers", "4", "--model.intermediate-size", "512",
         "--model.num-heads", "4", "--archer.batch-size", "32", "--replay.max-state-len", "96",
         "--replay.max-action-len", "8", "--rollout.max-new-tokens", "7", "--rollout.no-constrain-actions"]


def plan(*flags, world_size=1):
    cfg = parse_config(["--config", "configs/tiny_cpu.yaml", *MODEL, *flags])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_memory(cfg, world_size), cfg


def test_resident_parts_are_exact_counts():
    result, cfg = plan()
    from fastarcher.model import load_policy
    from fastarcher.critic import DoubleCritic
    from fastarcher.replay import ReplayBuffer

    policy, tok = load_policy(cfg.model)
    p_bytes = sum(p.numel() * 4 for p in policy.parameters())
    critic = DoubleCritic(cfg.critic, vocab_size=len(tok), pad_id=tok.pad_token_id)
    c_bytes = sum(p.numel() * 4 for p in critic.parameters())
    r = cfg.replay
    buffer = ReplayBuffer(r.capacity, r.max_state_len, r.max_action_len, r.max_obs_len, pad_id=0)
    assert result.resident["policy weights (FSDP2 shard)"] == p_bytes
    assert result.resident["policy AdamW state (2 per trainable weight)"] == 2 * p_bytes
    assert result.resident["rollout engine: full policy copy (hf)"] == p_bytes
    assert result.resident["critic weights + target (shards)"] == 2 * c_bytes
    assert result.resident["replay buffer"] == buffer.nbytes
    two, _ = plan(world_size=2)
    assert two.resident["policy weights (FSDP2 shard)"] == p_bytes // 2
    assert two.resident["rollout engine: full policy copy (hf)"] == p_bytes  # every rank's engine is whole
    assert two.resident["FSDP2 all-gathered blocks (2)"] > 0


def test_lora_plans_adapter_state_only():
    full, _ = plan()
    lora, _ = plan("--model.lora.rank", "4")
    assert lora.resident["policy AdamW state (2 per trainable weight)"] < full.resident["policy AdamW state (2 per trainable weight)"] / 10


MEASURE = textwrap.dedent('''
    import gc, json, sys, torch
    from fastarcher.train import parse_config
    from fastarcher.model import enable_activation_checkpointing, load_policy
    from fastarcher.policy import action_logprobs

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    cfg = parse_config(sys.argv[1:])
    policy, tok = load_policy(cfg.model)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    b, s, a = cfg.archer.batch_size, cfg.replay.max_state_len, cfg.replay.max_action_len
    g = torch.Generator().manual_seed(0)
    def step():
        sid = torch.randint(3, len(tok), (b, s), generator=g)
        aid = torch.randint(3, len(tok), (b, a), generator=g)
        lp, ent, _ = action_logprobs(policy, sid, torch.full((b,), s), aid, torch.full((b,), a),
                                     pad_id=tok.pad_token_id, constraint=None, fused_head=cfg.model.fused_head)
        (lp.sum() + ent.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # AdamW state exists from here on, as in a run
    peaks = []
    for _ in range(3):
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
        before = status("VmRSS:")
        step()
        peaks.append(status("VmHWM:") - before)
    print(json.dumps({"measured": min(peaks)}))
''')


@pytest.mark.parametrize("flags", [[], ["--model.activation-checkpointing"]], ids=["plain", "activation_checkpointing"])
def test_actor_step_peak_within_20_percent_of_a_real_step(flags):
    result, _ = plan(*flags)
    predicted = result.phases["actor step (activations, gradients)"]
    env = subprocess_env()
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # large blocks leave RSS when freed
    out = subprocess.run([sys.executable, "-c", MEASURE, "--config", "configs/tiny_cpu.yaml", *MODEL, *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    assert predicted > 8 * 2**20  # activations, not noise
    print(f"actor step peak: planned {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted - measured) <= 0.2 * measured, (predicted / 2**20, measured / 2**20)


def test_cli_prints_the_plan_and_json():
    out = subprocess.run([sys.executable, "-m", "fastarcher.plan", "--config", "configs/tiny_cpu.yaml", "--json"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["peak"] == sum(data["resident"].values()) + max(data["phases"].values())
    out = subprocess.run([sys.executable, "-m", "fastarcher.plan", "--config", "configs/tiny_cpu.yaml", "--nproc", "2"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert "memory per rank (2 processes)" in out.stdout and "expected peak" in out.stdout, out.stderr[-2000:]


QWEN_SHAPES = {  # config.json of the public models (no weights, no tokenizer: the planner needs neither)
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset, shape, nproc", [("qwen05b_1gpu", "qwen2.5-0.5b", 1),
                                                  ("qwen7b_8gpu_lora", "qwen2.5-7b", 8),
                                                  ("multinode_2x8", "qwen2.5-7b", 16)])
def test_gpu_preset_headers_state_the_planned_peak(tmp_path, preset, shape, nproc):
    import re

    from transformers import Qwen2Config

    Qwen2Config(**QWEN_SHAPES[shape], max_position_embeddings=32768, architectures=["Qwen2ForCausalLM"]).save_pretrained(tmp_path)
    cfg = parse_config(["--config", preset, "--model.path", str(tmp_path)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = plan_memory(cfg, nproc).peak / 2**30
    header = (REPO / "configs" / f"{preset}.yaml").read_text()
    stated = float(re.search(r"expected\s+#?\s*peak ([0-9.]+) GiB", header).group(1))
    assert abs(stated - peak) < 0.1, (stated, peak)
