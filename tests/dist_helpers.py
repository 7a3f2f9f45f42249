"""Shared test helpers: a tiny built-in policy, subprocess launchers, and the 2-process checks.

The 2-process checks (FSDP2 weight sync into the engine, cross-rank metric reduction) run in one
`torchrun --standalone --nproc_per_node=2` launch per pytest session, shared by
tests/test_weight_sync.py and tests/test_metrics.py through `dist_check_results()`:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_helpers.py OUT_DIR

Each rank records what it measured in OUT_DIR/rank{r}.json (the tests assert on those numbers, so a
failure shows the values rather than a bare traceback from a worker).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SYNC_BUCKET_BYTES = 20_000
"""Bucket cap of the weight-sync check: several tensors per bucket, and some tensors larger than it."""


def tiny_policy(dtype: torch.dtype = torch.float64, seed: int = 0, init_std: float | None = None, **overrides):
    """(model, tokenizer): the built-in Llama, small, in eval mode, identical for a given seed.

    `init_std` re-draws every weight matrix from N(0, init_std²): the default init (std 0.02) with tied
    embeddings makes a random model repeat its last input token, which hides context bugs (padding,
    positions); std 0.3 gives context-dependent, still smooth outputs.
    """
    from fastarcher.model import ModelConfig, build_builtin_model, build_builtin_tokenizer

    tokenizer = build_builtin_tokenizer()
    settings = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=128)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = build_builtin_model(ModelConfig(**settings), len(tokenizer), tokenizer.pad_token_id,
                                tokenizer.eos_token_id)
    if init_std is not None:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, init_std)
    return model.to(dtype).eval(), tokenizer


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread each (2 shared cores), no wandb, no torchrun leftovers,
    no PYTHONPATH (children import the installed package, as a user's would)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", COLUMNS="100")
    return env


def run_python(args: list[str], *, cwd: str | Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_torchrun(args: list[str], *, nproc: int = 2, cwd: str | Path = REPO,
                 timeout: float = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS` (args: a script path or `-m module`, then flags)."""
    return run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
                      cwd=cwd, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@functools.cache
def dist_check_results() -> list[dict]:
    """Launch the 2-process checks once per session; returns each rank's recorded results."""
    out = Path(tempfile.mkdtemp(prefix="fastarcher_dist_"))
    proc = run_torchrun([str(Path(__file__).resolve()), str(out)], timeout=240)
    if proc.returncode != 0:
        raise AssertionError("2-process checks failed:\n" + describe(proc))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


# --------------------------------------------------------------------------------------------------
# What each rank runs under torchrun.


def _expected_bucket_count(sizes: list[int], cap: int) -> int:
    """Greedy packing in order: a bucket closes before the tensor that would overflow it."""
    count, current = 0, 0
    for size in sizes:
        if current and current + size > cap:
            count, current = count + 1, 0
        current += size
    return count + (current > 0)


def _weight_sync_check(rank: int, world_size: int) -> dict:
    from torch.distributed.tensor import DTensor

    from fastarcher.model import transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, parallelize
    from fastarcher.rollout.hf_engine import HFEngine
    from fastarcher.rollout.weight_sync import sync_weights

    device = torch.device("cpu")
    policy, tokenizer = tiny_policy(torch.float32, seed=0)  # identical init on every rank
    engine = HFEngine(copy.deepcopy(policy), pad_id=tokenizer.pad_token_id, device=device)
    initial = {n: p.detach().clone() for n, p in engine.named_parameters()}

    parallelize(policy, transformer_blocks(policy), data_parallel_mesh(device, world_size))
    policy.train()
    sharded = {n: isinstance(p, DTensor) and p.to_local().numel() < p.numel() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1000 + rank)  # different data per rank: gradients are averaged
    for _ in range(3):
        ids = torch.randint(3, len(tokenizer), (2, 8), generator=data)  # (B, T)
        loss = policy(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    buckets: list[list[tuple[str, int]]] = []
    update = engine.update_weights

    def recording_update(named):
        named = list(named)
        buckets.append([(n, t.numel() * t.element_size()) for n, t in named])
        update(named)

    engine.update_weights = recording_update
    stats = sync_weights(policy, engine, bucket_bytes=SYNC_BUCKET_BYTES)

    full = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in policy.named_parameters()}
    engine_params = dict(engine.named_parameters())
    probe = torch.randint(3, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        policy.eval()
        train_logits = policy(input_ids=probe).logits
        engine_logits = engine.model(input_ids=probe).logits
    sizes = [t.numel() * t.element_size() for t in full.values()]
    return {
        "names_train": sorted(full),
        "names_engine": sorted(engine_params),
        "equal_after_sync": {n: bool(torch.equal(engine_params[n], full[n])) for n in full if n in engine_params},
        "changed_from_init": {n: not torch.equal(full[n], initial[n]) for n in full if n in initial},
        "sharded": sharded,
        "buckets": buckets,
        "bucket_order": [name for bucket in buckets for name, _ in bucket],
        "train_order": list(full),
        "expected_buckets": _expected_bucket_count(sizes, SYNC_BUCKET_BYTES),
        "stats": stats,
        "total_bytes": sum(sizes),
        "logits_max_diff": float((train_logits - engine_logits).abs().max()),
        "engine_checksum": float(sum(p.double().sum() for p in engine_params.values())),
    }


def _fused_head_check(rank: int, world_size: int) -> dict:
    """Unconstrained utterance log-probs on an FSDP2-sharded policy: the fused LM head (run inside the
    root forward, head unsharded by FSDP2) against the materialised logits, values and gradients."""
    from torch.distributed.tensor import DTensor

    import fastarcher.policy as policy_module
    from fastarcher.model import transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, parallelize

    device = torch.device("cpu")
    mesh = data_parallel_mesh(device, world_size)
    data = torch.Generator().manual_seed(2000 + rank)
    state_ids, state_len = torch.randint(3, 200, (3, 6), generator=data), torch.tensor([6, 2, 4])
    action_ids, action_len = torch.randint(3, 200, (3, 4), generator=data), torch.tensor([4, 1, 3])
    calls = []
    real = policy_module.linear_token_logprobs_and_entropy
    policy_module.linear_token_logprobs_and_entropy = lambda *a, **k: calls.append(1) or real(*a, **k)
    out = {}
    try:
        for fused in (True, False):
            policy, tokenizer = tiny_policy(torch.float64, seed=0, init_std=0.3)
            parallelize(policy, transformer_blocks(policy), mesh)
            logp_sum, entropy, _ = policy_module.action_logprobs(policy, state_ids, state_len, action_ids, action_len,
                                                                 pad_id=tokenizer.pad_token_id, fused_head=fused)
            (logp_sum.sum() + 0.1 * entropy.sum()).backward()
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in policy.named_parameters()}
            out[fused] = (logp_sum.detach(), entropy.detach(), grads, type(policy.lm_head).__name__)
    finally:
        policy_module.linear_token_logprobs_and_entropy = real
    (f_sum, f_ent, f_grads, head_type), (u_sum, u_ent, u_grads, _) = out[True], out[False]
    return {
        "fused_calls": len(calls),
        "head_type_after": head_type,
        "logp_max_diff": float((f_sum - u_sum).abs().max()),
        "entropy_max_diff": float((f_ent - u_ent).abs().max()),
        "grad_max_diff": max(float((f_grads[n] - u_grads[n]).abs().max()) for n in u_grads),
        "grad_min_norm": min(float(u_grads[n].norm()) for n in u_grads),
    }


def _precision_check(rank: int, world_size: int) -> dict:
    """FSDP2 with the bf16 mixed-precision policy and activation checkpointing: blocks compute in bf16 while the
    sharded parameters, their gradients and AdamW's state stay fp32; checkpointing alone changes no gradient."""
    from torch.distributed.tensor import DTensor

    from fastarcher.model import enable_activation_checkpointing, transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, mixed_precision_policy, parallelize

    device = torch.device("cpu")
    mesh = data_parallel_mesh(device, world_size)
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(3000 + rank))
    runs = {}
    for name, mode, checkpointing in (("fp32", "off", False), ("ckpt", "off", True), ("bf16", "bf16", True)):
        policy, _ = tiny_policy(torch.float32, seed=0, init_std=0.3)
        if checkpointing:
            enable_activation_checkpointing(policy)
        parallelize(policy, transformer_blocks(policy), mesh, mixed_precision_policy(mode, device))
        policy.train()
        seen = []
        transformer_blocks(policy)[0].mlp.register_forward_hook(lambda m, args, out: seen.append(str(out.dtype)))
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        policy(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.full_tensor().float() for n, p in policy.named_parameters()}
        optimizer.step()
        runs[name] = {"grads": grads, "block_dtypes": sorted(set(seen)),
                      "param_dtypes": sorted({str(p.dtype) for p in policy.parameters()}),
                      "grad_dtypes": sorted({str(p.grad.dtype) for p in policy.parameters()}),
                      "state_dtypes": sorted({str(v.dtype) for st in optimizer.state.values() for v in st.values()
                                              if isinstance(v, DTensor)})}
    ref = runs["fp32"]["grads"]
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
    return {
        **{name: {k: v for k, v in run.items() if k != "grads"} for name, run in runs.items()},
        "ckpt_grad_max_diff": max(float((runs["ckpt"]["grads"][n] - ref[n]).abs().max()) for n in ref),
        "bf16_grad_cosine": float(torch.nn.functional.cosine_similarity(flat(runs["bf16"]["grads"]), flat(ref), dim=0)),
        "bf16_grad_max_diff": max(float((runs["bf16"]["grads"][n] - ref[n]).abs().max()) for n in ref),
    }


def _bf16_engine_check(rank: int, world_size: int) -> dict:
    """The trainer's HF engine under bf16 mixed precision: a bf16 copy of the policy (half the bytes), synced
    from the fp32 FSDP2 master shards in bf16 buckets, equal to the full parameters cast to bf16."""
    import copy

    from fastarcher.model import transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, mixed_precision_policy, parallelize
    from fastarcher.rollout.base import SamplingParams
    from fastarcher.rollout.hf_engine import HFEngine
    from fastarcher.rollout.weight_sync import sync_weights

    device = torch.device("cpu")
    policy, tokenizer = tiny_policy(torch.float32, seed=0, init_std=0.3)
    engine_model = copy.deepcopy(policy).to(torch.bfloat16)
    parallelize(policy, transformer_blocks(policy), data_parallel_mesh(device, world_size),
                mixed_precision_policy("bf16", device))
    with torch.no_grad():  # move the master weights away from the copy's start
        for p in policy.parameters():
            p.add_(0.01 * torch.ones_like(p))
    engine = HFEngine(engine_model, pad_id=tokenizer.pad_token_id, device=device)
    stats = sync_weights(policy, engine, 1 << 20)
    full = {n: p.full_tensor() for n, p in policy.named_parameters()}
    engine_params = dict(engine.named_parameters())
    out = engine.generate([[5, 6, 7]], SamplingParams(greedy=True, max_new_tokens=3, stop_token_id=-1))
    return {
        "weight_dtype": str(engine.weight_dtype),
        "engine_dtypes": sorted({str(p.dtype) for p in engine_params.values()}),
        "master_dtypes": sorted({str(p.dtype) for p in full.values()}),
        "synced_bytes": stats["bytes"],
        "bf16_bytes": float(sum(2 * p.numel() for p in full.values() if p.is_floating_point())),
        "max_diff_to_master_in_bf16": max(float((engine_params[n].float() - full[n].bfloat16().float()).abs().max())
                                          for n in full if n in engine_params),
        "tokens": len(out.token_ids[0]),
    }


def _critic_state_pass_check(rank: int, world_size: int) -> dict:
    """FSDP2-sharded critic target where only rank 0 has a row whose window slid: both ranks must run the
    same passes (rank 1 embeds one unused row) and each equals the separate passes."""
    from fastarcher.critic import CriticConfig, DoubleCritic
    from fastarcher.parallel import data_parallel_mesh, parallelize

    torch.manual_seed(0)
    critic = DoubleCritic(CriticConfig(hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=16), vocab_size=40,
                          pad_id=0).double()
    parallelize(critic, critic.encoder_layers(), data_parallel_mesh(torch.device("cpu"), world_size))
    g = torch.Generator().manual_seed(10 + rank)
    s_len = torch.randint(2, 8, (6,), generator=g)
    n_len = s_len + torch.randint(1, 5, (6,), generator=g)
    n = torch.randint(1, 40, (6, int(n_len.max())), generator=g)
    n_mask = (torch.arange(n.shape[1])[None] < n_len[:, None]).long()
    s_mask = (torch.arange(7)[None] < s_len[:, None]).long()
    s = torch.nn.functional.pad(n, (0, max(0, 7 - n.shape[1])))[:, :7] * s_mask  # s′ starts with s
    if rank == 0:
        n[2, 0] = n[2, 0] % 39 + 1
    f, f_mask = torch.randint(1, 40, (6, 3), generator=g), torch.ones(6, 3, dtype=torch.long)
    with torch.no_grad():
        shared = critic(s, s_mask, f, f_mask, n, n_mask)
        critic.share_state_pass = False
        separate = critic(s, s_mask, f, f_mask, n, n_mask)
    return {"max_diff": max(float((x - y).abs().max()) for x, y in zip(shared, separate))}


def _metrics_check(rank: int, world_size: int) -> dict:
    from fastarcher.metrics import reduce_metrics

    local = {"count/episodes": float(rank + 1), "time/rollout_s": 10.0 * (rank + 1),
             "mem/peak_gib": 1.0 + rank, "rollout/success_rate": 2.0 * rank}
    if rank == 1:
        local = dict(reversed(list(local.items())))  # same keys, another order
    return {"reduced": reduce_metrics(local, world_size)}


def _shared_states_check(rank: int, world_size: int) -> dict:
    """Repeated states on an FSDP2-sharded policy: shared-prefix scoring would run two root forwards before
    one backward, which FSDP2 does not support; asking for it must take the whole forward, same values."""
    from torch.distributed.tensor import DTensor

    from fastarcher.model import transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, parallelize
    from fastarcher.policy import action_logprobs, left_align, shared_prefix

    mesh = data_parallel_mesh(torch.device("cpu"), world_size)
    data = torch.Generator().manual_seed(3000 + rank)
    state_ids = torch.randint(3, 200, (2, 6), generator=data).repeat_interleave(3, 0)
    state_len = torch.tensor([6, 4]).repeat_interleave(3)
    action_ids, action_len = torch.randint(3, 200, (6, 4), generator=data), torch.tensor([4, 1, 3, 2, 4, 1])
    out = {}
    for share in (False, True):
        policy, tokenizer = tiny_policy(torch.float64, seed=0, init_std=0.3)
        parallelize(policy, transformer_blocks(policy), mesh)
        logp, entropy, _ = action_logprobs(policy, state_ids, state_len, action_ids, action_len,
                                           pad_id=tokenizer.pad_token_id, share_states=share)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in policy.named_parameters()}
        out[share] = (logp.detach(), grads)
    state = left_align(state_ids, state_len, tokenizer.pad_token_id)
    mask = torch.arange(6)[None, :] >= (6 - state_len)[:, None]
    refused = shared_prefix(policy, state, state_len, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)) is None
    (w_logp, w_grads), (s_logp, s_grads) = out[False], out[True]
    return {
        "refused": refused,
        "logp_max_diff": float((w_logp - s_logp).abs().max()),
        "grad_max_diff": max(float((w_grads[n] - s_grads[n]).abs().max()) for n in w_grads),
        "grad_min_norm": min(float(w_grads[n].norm()) for n in w_grads),
    }


def _main(out_dir: str) -> None:
    from fastarcher.dist import init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        result = {"world_size": info.world_size, "weight_sync": _weight_sync_check(info.rank, info.world_size),
                  "metrics": _metrics_check(info.rank, info.world_size),
                  "fused_head": _fused_head_check(info.rank, info.world_size),
                  "shared_states": _shared_states_check(info.rank, info.world_size),
                  "precision": _precision_check(info.rank, info.world_size),
                  "bf16_engine": _bf16_engine_check(info.rank, info.world_size),
                  "critic_state_pass": _critic_state_pass_check(info.rank, info.world_size)}
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    from fastarcher.dist import exit_now, exit_with_launcher

    exit_with_launcher()  # a timed-out test kills torchrun; its workers must not live on
    _main(sys.argv[1])
    # done and flushed: skip the interpreter teardown, which sometimes aborts a finished torchrun worker
    # ("terminate called without an active exception"; fastarcher/train.py does the same)
    exit_now(0)
