"""The traces wired into the actor step of ArCHer and of every on-policy algorithm (fastarcher/traces/trainer_hooks.py, fastarcher/algos/on_policy.py).

Reference: each action token's log π, entropy and weight gradient recomputed on the *unpadded*
sequence state[:n] ⊕ action[:h] with separate autograd calls (never through the padded layout or the
hooks), projected explicitly as P_out @ grad_W @ P_in^T; and CLI runs of the trainer with tracing on
and off, whose final policies must be bit-identical.
"""
import json
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import REPO, describe, run_python, run_torchrun, subprocess_env
from fastarcher.algos.archer import actor_loss
from fastarcher.policy import action_logprobs
from fastarcher.traces import EntropyTraceConfig, InfluenceTraceConfig, TraceConfig
from fastarcher.traces.artifacts import load_step, read_manifest, read_summary
from fastarcher.traces.testing import demo_decode, tiny_causal_lm
from fastarcher.traces.trainer_hooks import TraceRecorder, actor_batch_layout, state_group_ids

torch.manual_seed(0)

PAD = 0
# Right-padded states of lengths 5, 3, 4 and actions of lengths 3, 1, 2 (the last token plays the stop token).
STATES = [[5, 9, 12, 7, 30], [5, 9, 12], [40, 41, 42, 43]]
ACTIONS = [[20, 21, 1], [1], [22, 1]]
ADVANTAGE = torch.tensor([0.8, -0.5, 0.3], dtype=torch.float64)
Q_VALUE = torch.tensor([1.5, 0.2, 0.9], dtype=torch.float64)
LAST_DOWN, LM_HEAD = "model.layers.1.mlp.down_proj", "lm_head"


class _Tokenizer:
    """The two tokenizer members the recorder uses, over the 64-piece demo vocabulary."""

    pad_token_id = PAD

    @staticmethod
    def decode(ids):
        return demo_decode(ids)


class _Info:
    rank, world_size = 0, 1


def _model(seed=0):
    """Tiny float64 Qwen2 with weights re-drawn at std 0.3 (context-dependent outputs, so a misaligned
    position shows) and SDPA attention (transformers' eager path returns NaN for left-padded float64 rows)."""
    model = tiny_causal_lm(seed=seed)
    model.set_attn_implementation("sdpa")
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model


def _pad(rows, width=None):
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])


def _batch():
    state_ids, state_len = _pad(STATES, width=6)  # one column of extra padding, as after a buffer sample
    action_ids, action_len = _pad(ACTIONS)
    return state_ids, state_len, action_ids, action_len


def _trace_cfg(**influence):
    base = dict(enabled=True, module_name_filter=(LAST_DOWN, LM_HEAD), max_modules=0, projection_dim_factor=4,
                max_proj_vector_sum=4096, max_hessian_dim=100000, max_tokens_per_response=0, max_prompts_per_step=0,
                save_factors=True)
    base.update(influence)
    return TraceConfig(influence=InfluenceTraceConfig(**base),
                       entropy=EntropyTraceConfig(enabled=True, max_responses_per_step=0))


def _actor_micro_batch(recorder, model, step, batch):
    """What Trainer.actor_phase runs for one micro-batch (entropy_coeff 0)."""
    with recorder.actor_micro_batch(step, *batch, advantage=ADVANTAGE, q_value=Q_VALUE) as trace:
        logprob_sum, token_entropy, _ = action_logprobs(model, *batch, pad_id=PAD)
        if trace is not None:
            trace.set_token_entropy(token_entropy)
        loss, _ = actor_loss(logprob_sum=logprob_sum, advantage=ADVANTAGE)
        loss.backward()
    return recorder.finish_step(step)


def _reference_token(model, row, h):
    """log π(a_h | s, a_<h) (differentiable) and the entropy of that distribution, on the unpadded sequence."""
    seq = torch.tensor(STATES[row] + ACTIONS[row][:h])[None]
    logp = torch.log_softmax(model(seq).logits[0, -1], -1)
    return logp[ACTIONS[row][h]], float(-(logp.exp() * logp).sum().detach())


def _projected(recorder, index, grad):
    projector = recorder.influence.projector
    p_in = projector.matrix(index, "in", torch.device("cpu"), torch.float64)
    p_out = projector.matrix(index, "out", torch.device("cpu"), torch.float64)
    return p_out @ grad @ p_in.T


def test_actor_batch_layout_puts_each_action_token_after_its_state():
    state_ids, state_len, action_ids, action_len = _batch()
    layout = actor_batch_layout(state_ids, state_len, action_ids, action_len, pad_id=PAD)
    # S = 6 (left-padded state), A = 3: row 1 is [0 0 0 5 9 12 | 1 0 0]
    assert layout.state_width == 6
    assert layout.token_ids[1].tolist() == [0, 0, 0, 5, 9, 12, 1, 0, 0]
    assert layout.response_mask[1].tolist() == [False] * 6 + [True, False, False]
    for row in range(3):
        n, a = len(STATES[row]), len(ACTIONS[row])
        assert layout.token_ids[row, 6 - n:6].tolist() == STATES[row]
        assert layout.token_ids[row, layout.response_mask[row]].tolist() == ACTIONS[row]
        assert layout.response_mask[row].sum() == a
    assert layout.widen(torch.ones(3, 3)).tolist()[0] == [0.0] * 6 + [1.0] * 3


def test_per_token_logprobs_match_unpadded_reference_and_sum():
    model = _model()
    batch = _batch()
    logp, entropy, mask = action_logprobs(model, *batch, pad_id=PAD, per_token=True)  # (B, A)
    logp_sum, _, _ = action_logprobs(model, *batch, pad_id=PAD)
    torch.testing.assert_close(logp.sum(-1), logp_sum, rtol=0, atol=0)
    for row in range(3):
        for h in range(len(ACTIONS[row])):
            ref_logp, ref_entropy = _reference_token(model, row, h)
            torch.testing.assert_close(logp[row, h], ref_logp.detach(), rtol=1e-10, atol=1e-12)
            assert entropy[row, h].item() == pytest.approx(ref_entropy, rel=1e-10)
    assert (logp[~mask] == 0).all()


def test_state_group_ids_are_crc32_of_the_state_tokens():
    state_ids, state_len = _pad([[5, 9, 12], [5, 9, 12, 7], [5, 9, 12]], width=6)
    ids = state_group_ids(state_ids, state_len).tolist()
    assert ids[0] == ids[2] != ids[1]
    assert ids[0] == zlib.crc32(np.asarray([5, 9, 12], dtype=np.int64).tobytes())
    # padding width does not matter, only the state's own tokens
    wider, _ = _pad([[5, 9, 12]], width=9)
    assert state_group_ids(wider, torch.tensor([3])).tolist() == [ids[0]]


def test_training_loss_factors_equal_projected_token_gradients(tmp_path):
    """Last down_proj (after the last mixing) and lm_head (only the last A + 1 positions, logits_to_keep):
    each action token's factor is P_out ∇_W(−A_b/B · log π(a_h | s, a_<h)) P_in^T."""
    torch.manual_seed(0)
    model = _model()
    recorder = TraceRecorder(_trace_cfg(), model, tmp_path, _Info(), _Tokenizer())
    metrics = _actor_micro_batch(recorder, model, 0, _batch())
    data = load_step(tmp_path / "influence_trace", 0)
    assert data["module_names"].tolist() == [LAST_DOWN, LM_HEAD]
    assert data["token_ids"].tolist() == sum(ACTIONS, [])
    assert data["token_positions"].tolist() == [6, 7, 8, 6, 6, 7]  # action h at column S + h, S = 6
    assert data["response_text"].tolist() == [demo_decode(a) for a in ACTIONS]
    np.testing.assert_allclose(data["advantages"], ADVANTAGE.numpy(), rtol=1e-6)
    np.testing.assert_allclose(data["rewards"], Q_VALUE.numpy(), rtol=1e-6)
    assert data["accepted"].tolist() == [1, -1, 1]  # sign of the advantage
    assert data["group_ids"].tolist() == state_group_ids(*_batch()[:2]).tolist()
    assert metrics["trace/influence_responses"] == 3 and metrics["trace/influence_tokens"] == 6
    offsets = data["response_offsets"]
    modules = dict(model.named_modules())
    for index, name in enumerate([LAST_DOWN, LM_HEAD]):
        weight = modules[name].weight
        u, v = data[f"factor_u_{index}"], data[f"factor_v_{index}"]
        for row in range(3):
            for h, n in enumerate(range(offsets[row], offsets[row + 1])):
                ref_logp, _ = _reference_token(model, row, h)
                (grad,) = torch.autograd.grad(-ADVANTAGE[row] * ref_logp / 3, weight)
                got = torch.outer(torch.from_numpy(u[n]), torch.from_numpy(v[n]))
                torch.testing.assert_close(got, _projected(recorder, index, grad), rtol=1e-8, atol=1e-13)
    recorder.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_entropy_trace_records_each_action_tokens_entropy(tmp_path):
    model = _model()
    cfg = _trace_cfg()
    cfg.influence.enabled = False
    recorder = TraceRecorder(cfg, model, tmp_path, _Info(), _Tokenizer())
    metrics = _actor_micro_batch(recorder, model, 4, _batch())
    data = load_step(tmp_path / "entropy_trace", 4)
    expected = [_reference_token(model, row, h)[1] for row in range(3) for h in range(len(ACTIONS[row]))]
    np.testing.assert_allclose(data["token_entropy"], expected, rtol=1e-6)
    assert data["token_ids"].tolist() == sum(ACTIONS, [])
    assert data["response_text"].tolist() == [demo_decode(a) for a in ACTIONS]
    np.testing.assert_allclose(data["advantages"], ADVANTAGE.numpy(), rtol=1e-6)
    assert metrics["trace/entropy_tokens"] == 6
    assert metrics["trace/entropy_mean"] == pytest.approx(np.mean(expected), rel=1e-9)
    assert not (tmp_path / "influence_trace").exists()


def test_log_prob_advantage_objective_factors_and_unchanged_gradients(tmp_path):
    torch.manual_seed(0)
    model, reference = _model(), _model()
    recorder = TraceRecorder(_trace_cfg(output_function="log_prob_advantage"), model, tmp_path, _Info(), _Tokenizer())
    _actor_micro_batch(recorder, model, 0, _batch())
    _actor_micro_batch(TraceRecorder(TraceConfig(), reference, tmp_path / "off", _Info(), _Tokenizer()), reference, 0,
                       _batch())
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), name  # the extra backward left the training gradients alone
    data = load_step(tmp_path / "influence_trace", 0)
    lm_head = dict(model.named_modules())[LM_HEAD].weight
    u, v = data["factor_u_1"], data["factor_v_1"]
    for row in range(3):
        for h, n in enumerate(range(data["response_offsets"][row], data["response_offsets"][row + 1])):
            ref_logp, _ = _reference_token(model, row, h)
            (grad,) = torch.autograd.grad(ADVANTAGE[row] * ref_logp, lm_head)  # ascent objective Σ A log π
            got = torch.outer(torch.from_numpy(u[n]), torch.from_numpy(v[n]))
            torch.testing.assert_close(got, _projected(recorder, 1, grad), rtol=1e-8, atol=1e-13)


def test_disabled_recorder_is_inert(tmp_path):
    model = _model()
    recorder = TraceRecorder(TraceConfig(), model, tmp_path, _Info(), _Tokenizer())
    assert not recorder.enabled
    assert all(not m._forward_hooks for m in model.modules())
    with recorder.actor_micro_batch(0, *_batch(), advantage=ADVANTAGE) as trace:
        assert trace is None
    assert recorder.finish_step(0) == {}
    assert not any(tmp_path.iterdir())


def test_every_n_steps_and_missing_entropy_raise(tmp_path):
    model = _model()
    cfg = _trace_cfg(every_n_steps=2, module_name_filter=(LM_HEAD,))
    cfg.entropy.every_n_steps = 3
    recorder = TraceRecorder(cfg, model, tmp_path, _Info(), _Tokenizer())
    for step in range(5):
        _actor_micro_batch(recorder, model, step, _batch())
    assert [r["step"] for r in read_manifest(tmp_path / "influence_trace")] == [0, 2, 4]
    assert [r["step"] for r in read_manifest(tmp_path / "entropy_trace")] == [0, 3]
    with pytest.raises(RuntimeError, match="no token entropy was set"):
        with recorder.actor_micro_batch(9, *_batch(), advantage=ADVANTAGE, q_value=Q_VALUE):
            pass  # only the entropy trace is due at 9, and nothing called set_token_entropy


# --------------------------------------------------------------------------------------------------
# End to end: the CLI with tracing on and off.

CLI_FLAGS = [
    "-m", "fastarcher.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--device", "cpu",
    "--iterations", "3", "--archer.warmup-iterations", "1", "--rollout.num-envs", "8", "--eval.episodes", "8",
    "--log.no-progress", "--archer.advantage-baseline", "batch_mean", "--env.name", "guess_number",
    "--replay.max-obs-len", "8", "--eval.random-episodes", "64",
]
TRACE_FLAGS = ["--trace.influence.enabled", "--trace.influence.every-n-steps", "2",
               "--trace.entropy.enabled", "--trace.entropy.every-n-steps", "3"]
# 3 iterations, actor from iteration 1 on, archer.actor_epochs 3: actor steps 0..5
INFLUENCE_STEPS, ENTROPY_STEPS = [0, 2, 4], [0, 3]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The same single-process run with tracing off and on, launched side by side (one thread each)."""
    root = tmp_path_factory.mktemp("cli")
    runs = {name: root / name for name in ("off", "on")}
    procs = {name: subprocess.Popen([sys.executable, *CLI_FLAGS, *extra, "--log.run-dir", str(runs[name])], cwd=REPO,
                                    env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in (("off", []), ("on", TRACE_FLAGS))}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, describe(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return runs


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_tracing_leaves_final_policy_bit_identical(cli_runs):
    off = load_file(cli_runs["off"] / "hf_policy" / "model.safetensors")
    on = load_file(cli_runs["on"] / "hf_policy" / "model.safetensors")
    assert sorted(off) == sorted(on)
    for key in off:
        assert torch.equal(off[key], on[key]), key
    # the training numbers match too (times and the trace's own keys aside)
    for row_off, row_on in zip(_metrics(cli_runs["off"]), _metrics(cli_runs["on"]), strict=True):
        same = {k: v for k, v in row_off.items() if not k.startswith(("time/", "perf/"))}
        assert same == {k: row_on[k] for k in same}
        assert not any(k.startswith("trace/") for k in row_off)


def test_cli_run_folder_holds_both_traces(cli_runs):
    run_dir = cli_runs["on"]
    for kind, steps in (("influence_trace", INFLUENCE_STEPS), ("entropy_trace", ENTROPY_STEPS)):
        root = run_dir / kind
        assert read_summary(root)["steps"] == steps
        assert [r["step"] for r in read_manifest(root)] == steps
        assert sorted(p.name for p in (root / "steps").iterdir()) == [f"step_{s:06d}.npz" for s in steps]
    summary = read_summary(run_dir / "influence_trace")
    assert [m["name"] for m in summary["modules"]] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for step in INFLUENCE_STEPS:
        data = load_step(run_dir / "influence_trace", step)
        # the traced responses are guess_number actions a′: a number then the stop token (newline)
        assert all(re.fullmatch(r"\d{1,2}\n", t) for t in data["response_text"]), data["response_text"]
        assert data["token_text"][1::2].tolist() == ["\n"] * len(data["response_text"])
        assert np.isfinite(data["token_scores"]).all() and np.abs(data["token_scores"]).max() > 0
        adv = data["advantages"]
        assert (data["accepted"] == np.sign(adv).astype(np.int8)).all()
    entropy = load_step(run_dir / "entropy_trace", 0)
    assert (entropy["token_entropy"] >= 0).all() and entropy["token_entropy"].max() > 0
    rows = _metrics(run_dir)
    assert not any(k.startswith("trace/") for k in rows[1])  # critic warm-up only: no actor step
    assert {"trace/influence_responses", "trace/entropy_mean"} <= set(rows[2])  # actor steps 0, 1, 2
    assert "trace/entropy_mean" in rows[3] and "trace/influence_tokens" in rows[3]  # steps 3, 4, 5


def test_cli_viewer_writes_a_self_contained_page(cli_runs):
    run_dir = cli_runs["on"]
    proc = run_python(["-m", "fastarcher.traces.view", str(run_dir), "--step", "0"], timeout=120)
    assert proc.returncode == 0, describe(proc)
    page = (run_dir / "trace_view_step_000000.html").read_text()
    assert "step 0" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('class="resp"') >= 8


@pytest.mark.slow
def test_cli_two_processes_with_tracing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_torchrun([*CLI_FLAGS, *TRACE_FLAGS, "--log.run-dir", str(run_dir)], timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert read_summary(run_dir / "influence_trace")["world_size"] == 2
    for step in INFLUENCE_STEPS:
        record = next(r for r in read_manifest(run_dir / "influence_trace") if r["step"] == step)
        assert record["n_ranks_with_data"] == 2
        assert set(load_step(run_dir / "influence_trace", step)["rank"].tolist()) == {0, 1}
    for step in ENTROPY_STEPS:
        assert set(load_step(run_dir / "entropy_trace", step)["rank"].tolist()) == {0, 1}
    assert [r["step"] for r in read_manifest(run_dir / "entropy_trace")] == ENTROPY_STEPS


# --------------------------------------------------------------------------------------------------
# Every algorithm that trains the policy is traced, not only ArCHer (docs/traces.md, "Using traces").

ON_POLICY_FLAGS = [*CLI_FLAGS, "--iterations", "2", "--rollout.group-size", "4"]
TRACED_ALGOS = ("grpo", "reinforce_pp", "ppo", "filtered_bc")  # per-utterance, per-token, GAE+value, keep-flag weights


@pytest.fixture(scope="module")
def on_policy_runs(tmp_path_factory):
    """Each algorithm with both traces on every step, and grpo with tracing off, launched side by side."""
    root = tmp_path_factory.mktemp("on_policy")
    jobs = {algo: ["--algo", algo, *TRACE_FLAGS, "--trace.influence.every-n-steps", "1",
                   "--trace.entropy.every-n-steps", "1"] for algo in TRACED_ALGOS}
    jobs["grpo_off"] = ["--algo", "grpo"]
    procs = {name: subprocess.Popen([sys.executable, *ON_POLICY_FLAGS, *extra, "--log.run-dir", str(root / name)],
                                    cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for name, extra in jobs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, describe(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return root


@pytest.mark.parametrize("algo", TRACED_ALGOS)
def test_on_policy_algorithms_trace_the_first_step_of_each_iteration(on_policy_runs, algo):
    run_dir = on_policy_runs / algo
    for kind in ("influence_trace", "entropy_trace"):
        assert [r["step"] for r in read_manifest(run_dir / kind)] == [0, 1]  # step index = iteration
    for step in (0, 1):
        data = load_step(run_dir / "influence_trace", step)
        # the traced responses are the sampled guess_number utterances: a number then the stop token
        assert all(re.fullmatch(r"\d{1,2}\n", t) for t in data["response_text"]), data["response_text"]
        assert np.isfinite(data["token_scores"]).all() and np.abs(data["token_scores"]).max() > 0
        assert (data["accepted"] == np.sign(data["advantages"]).astype(np.int8)).all()
        # the discounted return from each turn: guess_number pays 1 for the right number, γ = 0.99 per turn before
        assert ((data["rewards"] >= 0) & (data["rewards"] <= 1)).all() and data["rewards"].dtype == np.float32
        if algo == "filtered_bc":
            assert set(np.unique(data["advantages"])) <= {0.0, 1.0}  # the keep flags
        entropy = load_step(run_dir / "entropy_trace", step)
        assert (entropy["token_entropy"] >= 0).all() and entropy["token_entropy"].max() > 0
    rows = _metrics(run_dir)
    assert {"trace/influence_responses", "trace/entropy_mean"} <= set(rows[1]) & set(rows[2])


def test_on_policy_tracing_leaves_final_policy_bit_identical(on_policy_runs):
    off = load_file(on_policy_runs / "grpo_off" / "hf_policy" / "model.safetensors")
    on = load_file(on_policy_runs / "grpo" / "hf_policy" / "model.safetensors")
    assert sorted(off) == sorted(on) and all(torch.equal(off[k], on[k]) for k in off)
