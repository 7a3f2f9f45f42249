"""Activation checkpointing and FSDP2 mixed precision (`--model.activation-checkpointing`,
`--model.mixed-precision`): the same gradients with fewer saved activations, bf16 compute over fp32 master
weights under two processes, and which policy each setting picks."""
import torch

from dist_helpers import dist_check_results, tiny_policy
from fastarcher.model import enable_activation_checkpointing
from fastarcher.parallel import mixed_precision_policy


def gradients_and_saved(checkpointing: bool):
    policy, _ = tiny_policy(torch.float64, seed=0, init_std=0.3)
    if checkpointing:
        enable_activation_checkpointing(policy)
    policy.train()
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = policy(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return {n: p.grad for n, p in policy.named_parameters()}, sum(saved)


def test_activation_checkpointing_keeps_the_gradients_and_saves_less():
    plain, plain_saved = gradients_and_saved(False)
    ckpt, ckpt_saved = gradients_and_saved(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-12)
    assert ckpt_saved < 0.6 * plain_saved


def test_mixed_precision_policy_is_bf16_on_cuda_by_default_and_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mixed_precision_policy("auto", cpu) is None and mixed_precision_policy("off", cuda) is None
    for mode, device in (("auto", cuda), ("bf16", cpu)):
        policy = mixed_precision_policy(mode, device)
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_two_processes_compute_in_bf16_over_fp32_master_weights():
    for rank in dist_check_results():
        check = rank["precision"]
        assert check["fp32"]["block_dtypes"] == ["torch.float32"]
        assert check["bf16"]["block_dtypes"] == ["torch.bfloat16"]  # the blocks ran in bf16
        for run in ("fp32", "ckpt", "bf16"):
            # sharded parameters, their gradients and AdamW's moments stay fp32 (the master weights)
            assert check[run]["param_dtypes"] == check[run]["grad_dtypes"] == ["torch.float32"], run
            assert check[run]["state_dtypes"] == ["torch.float32"], run
        assert check["ckpt_grad_max_diff"] < 1e-6  # checkpointing under FSDP2 changes nothing
        assert check["bf16_grad_cosine"] > 0.98 and check["bf16_grad_max_diff"] > 0  # close, yet really bf16


def test_the_hf_engine_copy_is_bf16_under_mixed_precision_and_synced_from_the_fp32_master():
    """2 processes: the engine holds bf16 weights (what the policy computes in) while the FSDP2 shards stay
    fp32; a sync sends bf16 buckets (half the bytes) equal to the master weights cast to bf16."""
    for rank in dist_check_results():
        check = rank["bf16_engine"]
        assert check["weight_dtype"] == "torch.bfloat16" and check["engine_dtypes"] == ["torch.bfloat16"]
        assert check["master_dtypes"] == ["torch.float32"]
        assert check["synced_bytes"] == check["bf16_bytes"] > 0
        assert check["max_diff_to_master_in_bf16"] == 0.0
        assert check["tokens"] == 3


def test_the_planner_counts_the_engine_copy_in_bf16_under_mixed_precision():
    from fastarcher.plan import plan_memory
    from fastarcher.train import parse_config

    base = ["--config", "configs/tiny_cpu.yaml", "--device", "cpu"]
    fp32 = plan_memory(parse_config(base + ["--model.mixed-precision", "off"])).resident
    bf16 = plan_memory(parse_config(base + ["--model.mixed-precision", "bf16"])).resident
    assert "rollout engine: full policy copy (hf)" in fp32
    assert bf16["rollout engine: full policy copy (hf, bf16)"] * 2 == fp32["rollout engine: full policy copy (hf)"]
