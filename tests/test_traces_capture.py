"""Influence-trace capture on a tiny float64 Qwen2/Llama: factors vs independent autograd gradients.

Reference: per-token and per-response weight gradients from torch.autograd.grad on separate loss
terms, projected explicitly as P_out @ grad_W @ P_in^T (never through the tracer's hooks).
"""
import copy

import numpy as np
import pytest
import torch

from fastarcher.traces import InfluenceTraceConfig, InfluenceTracer
from fastarcher.traces.artifacts import load_step
from fastarcher.traces.testing import policy_gradient_loss, tiny_causal_lm, token_logprobs

B, T, PROMPT = 3, 9, 4


def _batch(seed=1, prompt=PROMPT):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, prompt:] = True
    mask[2, T - 2:] = False  # a shorter response (right padding)
    advantages = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    return ids, mask, advantages


def _config(**overrides):
    base = dict(enabled=True, module_name_filter=(), max_modules=0, projection_dim_factor=4, max_proj_vector_sum=4096,
                max_hessian_dim=100000, max_tokens_per_response=0, max_prompts_per_step=0, save_factors=True)
    base.update(overrides)
    return InfluenceTraceConfig(**base)


def _traced_step(model, tmp_path, cfg, ids, mask, advantages, step=0):
    tracer = InfluenceTracer(cfg, model, tmp_path)
    with tracer.capture(step, response_mask=mask, token_ids=ids, advantages=advantages):
        loss = policy_gradient_loss(token_logprobs(model, ids), mask, advantages)
        loss.backward()
    tracer.finish_step(step)
    tracer.close()
    return tracer, load_step(tmp_path / "influence_trace", step)


def _projected(tracer, index, grad):
    p_in = tracer.projector.matrix(index, "in", torch.device("cpu"), torch.float64)
    p_out = tracer.projector.matrix(index, "out", torch.device("cpu"), torch.float64)
    return p_out @ grad @ p_in.T


def _module(model, name):
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_token_factor_equals_projected_token_gradient_after_last_mixing(tmp_path, arch):
    torch.manual_seed(0)
    model = tiny_causal_lm(arch=arch)
    ids, mask, adv = _batch()
    cfg = _config(module_name_filter=("layers.1.mlp.down_proj", "lm_head"))
    tracer, data = _traced_step(model, tmp_path, cfg, ids, mask, adv)
    assert [p.name for p in tracer.projections] == ["model.layers.1.mlp.down_proj", "lm_head"]
    offsets = data["response_offsets"]
    assert list(np.diff(offsets)) == [T - PROMPT, T - PROMPT, T - PROMPT - 2]
    logp = token_logprobs(model, ids)
    for index, proj in enumerate(tracer.projections):
        weight = _module(model, proj.name).weight
        u, v = data[f"factor_u_{index}"], data[f"factor_v_{index}"]
        for r in range(B):
            for n in range(offsets[r], offsets[r + 1]):
                t = int(data["token_positions"][n])
                assert mask[r, t] and int(data["token_ids"][n]) == int(ids[r, t])
                # the token's own loss term of -mean_b(A_b sum_t log pi)
                (grad,) = torch.autograd.grad(-adv[r] * logp[r, t] / B, weight, retain_graph=True)
                expected = _projected(tracer, index, grad)
                got = torch.outer(torch.from_numpy(u[n]), torch.from_numpy(v[n]))
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def _sum_factors(data, index, responses):
    offsets = data["response_offsets"]
    u, v, ctx = (torch.from_numpy(data[f"factor_{k}_{index}"]) for k in ("u", "v", "context"))
    total = 0
    for r in responses:
        sl = slice(offsets[r], offsets[r + 1])
        total = total + u[sl].T @ v[sl] + ctx[r]
    return total


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_factors_plus_context_sum_to_projected_gradient_for_every_module(tmp_path, max_tokens):
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    tracer, data = _traced_step(model, tmp_path, _config(max_tokens_per_response=max_tokens), ids, mask, adv)
    assert len(tracer.projections) == 15  # every nn.Linear: 7 per layer + lm_head
    if max_tokens:
        assert list(np.diff(data["response_offsets"])) == [3, 3, 3]
    logp = token_logprobs(model, ids)
    weights = [_module(model, p.name).weight for p in tracer.projections]
    full = torch.autograd.grad(policy_gradient_loss(logp, mask, adv), weights, retain_graph=True)
    for index, grad in enumerate(full):
        torch.testing.assert_close(_sum_factors(data, index, range(B)), _projected(tracer, index, grad),
                                   rtol=1e-9, atol=1e-12)
    # and per response: token factors + context = that response's projected gradient
    for r in range(B):
        per_response = torch.autograd.grad(-adv[r] * (logp[r] * mask[r]).sum() / B, weights, retain_graph=True)
        for index, grad in enumerate(per_response):
            torch.testing.assert_close(_sum_factors(data, index, [r]), _projected(tracer, index, grad),
                                       rtol=1e-9, atol=1e-12)


def test_factor_is_position_share_for_modules_before_last_mixing(tmp_path):
    """Layer 0 sits before attention mixes positions: the factor of token t is the share of the whole
    response gradient at position t - 1, P_out dL/dy_{t-1} x_{t-1}^T P_in^T (not token t's own gradient)."""
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    name = "model.layers.0.self_attn.q_proj"
    tracer, data = _traced_step(model, tmp_path, _config(module_name_filter=(name,)), ids, mask, adv)
    saved = {}
    handle = _module(model, name).register_forward_hook(lambda m, a, o: saved.update(x=a[0], y=o))
    loss = policy_gradient_loss(token_logprobs(model, ids), mask, adv)
    handle.remove()
    (dy,) = torch.autograd.grad(loss, saved["y"])  # (B, T, d_out)
    offsets, u, v = data["response_offsets"], data["factor_u_0"], data["factor_v_0"]
    own_differs = False
    logp = token_logprobs(model, ids)
    for r in range(B):
        for n in range(offsets[r], offsets[r + 1]):
            p = int(data["token_positions"][n]) - 1
            expected = _projected(tracer, 0, torch.outer(dy[r, p], saved["x"][r, p].detach()))
            got = torch.outer(torch.from_numpy(u[n]), torch.from_numpy(v[n]))
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
            (own,) = torch.autograd.grad(-adv[r] * logp[r, p + 1] / B, _module(model, name).weight, retain_graph=True)
            own_differs |= not torch.allclose(_projected(tracer, 0, own), got)
    assert own_differs  # the position share is not the token's own gradient before the last mixing


def test_non_reentrant_checkpointing_gives_same_factors(tmp_path):
    torch.manual_seed(0)
    ids, mask, adv = _batch()
    plain = tiny_causal_lm()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    plain.train()
    _, ref = _traced_step(plain, tmp_path / "a", _config(), ids, mask, adv)
    _, got = _traced_step(ckpt, tmp_path / "b", _config(), ids, mask, adv)
    for key in ref:
        if key.startswith("factor_"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got["token_scores"], ref["token_scores"], rtol=1e-5)


def _train_step(model, ids, mask, adv, tracer=None, step=0, objective=False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if tracer is not None and objective:
        assert tracer.trace_objective(step, lambda: token_logprobs(model, ids), response_mask=mask, token_ids=ids,
                                      advantages=adv)
    capture = tracer.capture(step, response_mask=mask, token_ids=ids, advantages=adv) if tracer else None
    with capture if capture is not None else torch.enable_grad():
        loss = policy_gradient_loss(token_logprobs(model, ids), mask, adv)
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    if tracer is not None:
        tracer.finish_step(step)
    return grads


@pytest.mark.parametrize("output_function", ["training_loss", "log_prob_advantage"])
def test_tracing_leaves_training_step_bit_identical(tmp_path, output_function):
    torch.manual_seed(0)
    ids, mask, adv = _batch()
    reference = tiny_causal_lm(dropout=0.3)  # dropout: the traced objective's forward must not move the RNG
    traced = copy.deepcopy(reference)
    reference.train()
    traced.train()
    tracer = InfluenceTracer(_config(output_function=output_function), traced, tmp_path)
    torch.manual_seed(5)
    grads_ref = _train_step(reference, ids, mask, adv)
    torch.manual_seed(5)
    grads_traced = _train_step(traced, ids, mask, adv, tracer, objective=output_function != "training_loss")
    for a, b in zip(grads_ref, grads_traced):
        assert torch.equal(a, b)
    for (name, a), b in zip(reference.named_parameters(), traced.parameters()):
        assert torch.equal(a, b), name
    assert (tmp_path / "influence_trace" / "steps" / "step_000000.npz").exists()


def test_log_prob_objective_factors_and_restored_grads(tmp_path):
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    cfg = _config(output_function="log_prob_advantage", module_name_filter=("lm_head", "layers.0.mlp.up_proj"))
    tracer = InfluenceTracer(cfg, model, tmp_path)
    before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n]
    assert tracer.trace_objective(0, lambda: token_logprobs(model, ids), response_mask=mask, token_ids=ids,
                                  advantages=adv)
    for n, p in model.named_parameters():
        assert p.grad is before[n]  # the very same tensors, untouched
    with tracer.capture(0, response_mask=mask, token_ids=ids, advantages=adv):
        pass  # a no-op for log_prob_* objectives: nothing runs, nothing is required
    tracer.finish_step(0)
    data = load_step(tmp_path / "influence_trace", 0)
    logp = token_logprobs(model, ids)
    objective = (adv[:, None] * logp * mask).sum()  # sum A log pi, the ascent objective
    weights = [_module(model, p.name).weight for p in tracer.projections]
    grads = torch.autograd.grad(objective, weights)
    for index, grad in enumerate(grads):
        torch.testing.assert_close(_sum_factors(data, index, range(B)), _projected(tracer, index, grad),
                                   rtol=1e-9, atol=1e-12)


def test_prompt_cap_and_micro_batches_accumulate_rows(tmp_path):
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    cfg = _config(max_prompts_per_step=2, module_name_filter=("lm_head",))
    tracer = InfluenceTracer(cfg, model, tmp_path)
    groups = [torch.tensor([7, 7, 8]), torch.tensor([8, 9, 7])]
    for micro, group in enumerate(groups):
        with tracer.capture(3, response_mask=mask, token_ids=ids, group_ids=group, advantages=adv):
            policy_gradient_loss(token_logprobs(model, ids), mask, adv).backward()
    tracer.finish_step(3, texts=[f"text {i}" for i in range(6)])
    data = load_step(tmp_path / "influence_trace", 3)
    # groups 7 and 8 are the first two distinct prompts; group 9 (row 4) is left out
    assert data["row"].tolist() == [0, 1, 2, 3, 5]
    assert data["group_ids"].tolist() == [7, 7, 8, 8, 7]
    assert data["response_text"].tolist() == ["text 0", "text 1", "text 2", "text 3", "text 5"]
    assert data["accepted"].tolist() == [1, -1, 1, 1, 1]


def test_capture_misuse_raises_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    tracer = InfluenceTracer(_config(module_name_filter=("lm_head",)), model, tmp_path)
    loss = policy_gradient_loss(token_logprobs(model, ids), mask, adv)
    with pytest.raises(RuntimeError, match="ran a forward inside capture"):
        with tracer.capture(0, response_mask=mask, token_ids=ids, advantages=adv):
            loss.backward()
    with pytest.raises(ValueError, match="needs advantages"):
        with tracer.capture(0, response_mask=mask, token_ids=ids, rewards=adv):
            pass
    with pytest.raises(ValueError, match="token_ids shape"):
        with tracer.capture(0, response_mask=mask, token_ids=ids[:, :-1], advantages=adv):
            pass
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        InfluenceTracer(_config(module_name_filter=("no_such_module",)), model, tmp_path)


def test_disabled_tracer_registers_nothing_and_writes_nothing(tmp_path):
    model = tiny_causal_lm()
    tracer = InfluenceTracer(InfluenceTraceConfig(), model, tmp_path)
    ids, mask, adv = _batch()
    with tracer.capture(0, response_mask=mask, token_ids=ids, advantages=adv):
        policy_gradient_loss(token_logprobs(model, ids), mask, adv).backward()
    assert tracer.finish_step(0) == {}
    assert not tracer.trace_objective(0, lambda: None, response_mask=mask, token_ids=ids)
    assert all(not m._forward_hooks for m in model.modules())
    assert not (tmp_path / "influence_trace").exists()


def test_every_n_steps_skips_steps(tmp_path):
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    tracer = InfluenceTracer(_config(every_n_steps=2, module_name_filter=("lm_head",)), model, tmp_path)
    for step in range(3):
        with tracer.capture(step, response_mask=mask, token_ids=ids, advantages=adv):
            policy_gradient_loss(token_logprobs(model, ids), mask, adv).backward()
        tracer.finish_step(step)
    files = sorted(p.name for p in (tmp_path / "influence_trace" / "steps").iterdir())
    assert files == ["step_000000.npz", "step_000002.npz"]


def test_lm_head_with_logits_to_keep_aligns_to_the_sequence_tail(tmp_path):
    """The trainer computes logits only for the last A + 1 positions (HF logits_to_keep): lm_head then
    sees (B, A + 1, H), aligned with the end of the sequence; the factors must equal the full-logits ones."""
    torch.manual_seed(0)
    model = tiny_causal_lm()
    ids, mask, adv = _batch()
    keep = T - PROMPT + 1
    cfg = _config(module_name_filter=("lm_head", "layers.1.mlp.down_proj"))
    _, full = _traced_step(model, tmp_path / "full", cfg, ids, mask, adv)
    tracer = InfluenceTracer(cfg, model, tmp_path / "tail")
    with tracer.capture(0, response_mask=mask, token_ids=ids, advantages=adv):
        logits = model(ids, logits_to_keep=keep).logits  # (B, keep, V): position T - keep + i
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, T - keep + 1:, None]).squeeze(-1)
        loss = -(adv[:, None] * logp * mask[:, T - keep + 1:]).sum(1).mean()
        loss.backward()
    tracer.finish_step(0)
    tail = load_step(tmp_path / "tail" / "influence_trace", 0)
    for key in full:
        if key.startswith("factor_"):
            np.testing.assert_allclose(tail[key], full[key], rtol=1e-10, atol=1e-14)
