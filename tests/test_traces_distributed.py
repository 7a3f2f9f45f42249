"""Traces under 2 processes (gloo, FSDP2 fully_shard on the tiny model): each rank traces its own batch,
rank 0 gathers and writes; factors checked against an unsharded single-process autograd reference."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastarcher.traces.artifacts import load_step, read_summary
from fastarcher.traces.projection import ModuleProjection, Projector

WORLD = 2
B, T, PROMPT = 2, 8, 3
MODULES = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "lm_head")


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 64, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, PROMPT:] = True
    advantages = torch.tensor([1.0, -0.5], dtype=torch.float64) * (rank + 1)
    return ids, mask, advantages


def _worker(rank, run_dir, init_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from fastarcher.traces import EntropyTraceConfig, EntropyTracer, InfluenceTraceConfig, InfluenceTracer
    from fastarcher.traces.testing import policy_gradient_loss, shift_logprobs, tiny_causal_lm, token_logprobs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = tiny_causal_lm(seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        cfg = dict(enabled=True, module_name_filter=MODULES, max_modules=0, projection_dim_factor=4,
                   max_hessian_dim=100000, max_proj_vector_sum=4096, max_prompts_per_step=0, max_tokens_per_response=0,
                   save_factors=True)
        tracer = InfluenceTracer(InfluenceTraceConfig(**cfg), model, run_dir, rank=rank, world_size=WORLD)
        entropy = EntropyTracer(EntropyTraceConfig(enabled=True), run_dir, rank=rank, world_size=WORLD)
        ids, mask, adv = _batch(rank)
        with tracer.capture(0, response_mask=mask, token_ids=ids, advantages=adv):
            logits = model(ids).logits
            loss = policy_gradient_loss(shift_logprobs(logits, ids), mask, adv)
            loss.backward()
        metrics = tracer.finish_step(0, texts=[f"rank{rank} row{b}" for b in range(B)])
        assert metrics["trace/influence_responses"] == WORLD * B  # the same metrics on every rank
        with torch.no_grad():
            logp_all = torch.log_softmax(logits, -1)
            token_entropy = -(logp_all.exp() * logp_all).sum(-1)
        entropy.record(0, token_entropy, mask, ids)
        # a log_prob_advantage objective run under FSDP2 leaves the training gradients untouched
        reference = [p.grad.to_local().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        objective = InfluenceTracer(InfluenceTraceConfig(**{**cfg, "output_function": "log_prob_advantage"}), model,
                                    os.path.join(run_dir, "objective"), rank=rank, world_size=WORLD)
        assert objective.trace_objective(0, lambda: token_logprobs(model, ids), response_mask=mask, token_ids=ids,
                                         advantages=adv)
        assert all(p.grad is None for p in model.parameters())
        policy_gradient_loss(token_logprobs(model, ids), mask, adv).backward()
        for a, p in zip(reference, model.parameters()):
            assert torch.equal(a, p.grad.to_local())
        objective.finish_step(0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_fsdp2_capture_gather_and_write(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(str(tmp_path), init_file), nprocs=WORLD, join=True)

    from fastarcher.traces.testing import policy_gradient_loss, tiny_causal_lm, token_logprobs

    root = tmp_path / "influence_trace"
    data = load_step(root, 0)
    assert data["rank"].tolist() == [0, 0, 1, 1] and data["row"].tolist() == [0, 1, 0, 1]
    assert data["response_text"].tolist() == ["rank0 row0", "rank0 row1", "rank1 row0", "rank1 row1"]
    summary = read_summary(root)
    assert summary["world_size"] == WORLD
    projections = [ModuleProjection(**m) for m in summary["modules"]]
    projector = Projector(projections, seed=0)
    model = tiny_causal_lm(seed=0)
    modules = dict(model.named_modules())
    offsets = data["response_offsets"]
    for rank in range(WORLD):
        ids, mask, adv = _batch(rank)
        logp = token_logprobs(model, ids)
        for b in range(B):
            r = rank * B + b
            grads = torch.autograd.grad(-adv[b] * (logp[b] * mask[b]).sum() / B,
                                        [modules[p.name].weight for p in projections], retain_graph=True)
            for m, grad in enumerate(grads):
                sl = slice(offsets[r], offsets[r + 1])
                u, v = torch.from_numpy(data[f"factor_u_{m}"][sl]), torch.from_numpy(data[f"factor_v_{m}"][sl])
                got = u.T @ v + torch.from_numpy(data[f"factor_context_{m}"][r])
                p_in = projector.matrix(m, "in", torch.device("cpu"), torch.float64)
                p_out = projector.matrix(m, "out", torch.device("cpu"), torch.float64)
                torch.testing.assert_close(got, p_out @ grad @ p_in.T, rtol=1e-9, atol=1e-12)
    entropy = load_step(tmp_path / "entropy_trace", 0)
    assert entropy["rank"].tolist() == [0, 0, 1, 1]
    assert np.isfinite(entropy["token_entropy"]).all()
    assert load_step(tmp_path / "objective" / "influence_trace", 0)["rank"].tolist() == [0, 0, 1, 1]
