"""LoRA on the policy (fastarcher/lora.py, `--model.lora.*`): only the adapters train, the merged weights that
reach the engine and the export compute exactly what the adapted policy computes, checkpoints hold the adapters
alone, and a run under torchrun trains, resumes and exports with them."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import REPO, describe, run_torchrun, subprocess_env, tiny_policy
from fastarcher.lora import LoraSettings, apply_lora, has_lora, merged_tensors
from fastarcher.rollout.hf_engine import HFEngine
from fastarcher.rollout.weight_sync import sync_weights

SETTINGS = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))


def trained_lora_policy():
    policy, tokenizer = tiny_policy(torch.float64, seed=0, init_std=0.3)
    plain = {n: p.detach().clone() for n, p in policy.named_parameters()}
    apply_lora(policy, SETTINGS)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return policy.eval(), tokenizer, plain


def test_only_the_adapters_train_and_start_as_the_plain_model():
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        apply_lora(policy, SETTINGS)
        after = policy(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # B starts at zero
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj", "down_proj"}
    assert has_lora(policy)


def test_merged_weights_compute_what_the_adapted_policy_computes():
    policy, _, plain = trained_lora_policy()
    merged = {name: gather() for name, _, gather in merged_tensors(policy)}
    assert list(merged) == list(plain)  # the plain architecture's names, in its order
    changed = {n for n in plain if not torch.equal(merged[n], plain[n])}
    assert changed == {n for n in plain if n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))}
    fresh, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    fresh.load_state_dict(merged, strict=False)
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_weight_sync_sends_the_merged_weights_to_the_engine():
    base, tokenizer = tiny_policy(torch.float64, seed=0, init_std=0.3)
    engine = HFEngine(base, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    policy, _, _ = trained_lora_policy()
    sync_weights(policy, engine, bucket_bytes=4096)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=-1)
    with pytest.raises(ValueError, match="alpha"):
        LoraSettings(rank=4, alpha=0)
    policy, _ = tiny_policy(torch.float64)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(policy, LoraSettings(rank=2, target_modules=("no_such_layer",)))


FLAGS = ["-m", "fastarcher.train", "--config", "configs/tiny_cpu.yaml", "--device", "cpu", "--rollout.num-envs", "4",
         "--eval.episodes", "4", "--eval.no-random-baseline", "--archer.warmup-iterations", "1", "--archer.batch-size", "4",
         "--archer.critic-epochs", "1", "--archer.actor-epochs", "2", "--optim.actor-lr", "1e-2", "--log.no-progress",
         "--model.lora.rank", "4", "--checkpoint.save-every", "1", "--checkpoint.resume", "auto"]


def test_a_torchrun_run_trains_resumes_and_exports_the_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    from fastarcher.model import ModelConfig, build_builtin_model, build_builtin_tokenizer

    run_dir = tmp_path / "run"
    first = run_torchrun([*FLAGS, "--iterations", "2", "--log.run-dir", str(run_dir)], timeout=300)
    assert first.returncode == 0, describe(first)
    second = run_torchrun([*FLAGS, "--iterations", "3", "--log.run-dir", str(run_dir)], timeout=300)
    assert second.returncode == 0 and "resumed" in (second.stdout + second.stderr).lower(), describe(second)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]

    # the checkpoint's model part holds the adapters only (a few KiB), never the frozen base
    checkpoint = sorted((run_dir / "checkpoints").glob("iter_*"))[-1]
    metadata = (checkpoint / "model" / ".metadata").read_bytes()
    assert b"policy.model.layers.0.self_attn.q_proj.lora_A" in metadata and b"policy.model.embed_tokens" not in metadata
    assert b"policy.model.layers.0.self_attn.q_proj.base_layer" not in metadata

    # the export is the plain architecture with merged weights: it differs from the (seeded) base where the
    # adapters act, and loads in plain transformers without missing or unexpected keys
    exported = load_file(run_dir / "hf_policy" / "model.safetensors")
    assert not any("lora" in k for k in exported)
    tokenizer = build_builtin_tokenizer()
    torch.manual_seed(0)  # the trainer's seed_everything(cfg.seed) before building the policy
    base = build_builtin_model(ModelConfig(), len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    base_state = base.state_dict()
    assert torch.equal(exported["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"],
                           base_state["model.layers.0.self_attn.q_proj.weight"])
    model, info = AutoModelForCausalLM.from_pretrained(run_dir / "hf_policy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # the export command rebuilds the same folder from the checkpoint (base from the seed, adapters from DCP)
    out = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "fastarcher.export", str(checkpoint), str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, describe(done)
    again = load_file(out / "model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
