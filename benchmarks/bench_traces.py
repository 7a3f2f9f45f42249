"""Overhead of the influence trace on the actor step: time and peak memory, tracing off vs on.

    python benchmarks/bench_traces.py                          # table with ratios (time and peak RSS)
    python -m pytest benchmarks/bench_traces.py -q             # pytest-benchmark timings + ratio lines

Actor step = forward, policy-gradient loss, backward, AdamW step of a Llama-style model
(hidden 256, 4 layers, intermediate 688, vocab 2048: 3.95M parameters) on a batch of 8 x 128 tokens
(96 response tokens each), float32 on CPU. Traced variants capture factors on the 4 `mlp.down_proj`
modules, 96 tokens per response, 8 prompts, and run `finish_step` (scoring, identity mode, and the
step file write) inside the timed step:
- `proj16`: projection_dim_factor 16 (default caps): k_in 43, k_out 16 per module, D = 2752
- `proj4`:  projection_dim_factor 4, caps raised: k_in 172, k_out 64 per module, D = 44032
Peak memory on CPU is the peak resident set size of a fresh process that builds the model and runs
the steps (`ru_maxrss`), so it includes the interpreter and torch (the "off" row is that baseline).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from fastarcher.traces import InfluenceTraceConfig, InfluenceTracer
from fastarcher.traces.testing import policy_gradient_loss, shift_logprobs, tiny_causal_lm

BATCH, LENGTH, PROMPT = 8, 128, 32
VARIANTS = {
    "off": None,
    "proj16": dict(projection_dim_factor=16),
    "proj4": dict(projection_dim_factor=4, max_proj_vector_sum=4096, max_hessian_dim=65536),
}


def build(variant: str, run_dir: str):
    torch.manual_seed(0)
    model = tiny_causal_lm(arch="llama", vocab=2048, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688,
                           dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    overrides = VARIANTS[variant]
    cfg = InfluenceTraceConfig(enabled=overrides is not None, max_tokens_per_response=LENGTH - PROMPT,
                               **(overrides or {}))
    tracer = InfluenceTracer(cfg, model, run_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2048, (BATCH, LENGTH), generator=g)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    mask[:, PROMPT:] = True
    advantages = torch.randn(BATCH, generator=g)
    state = {"step": 0}

    def actor_step():
        step = state["step"]
        with tracer.capture(step, response_mask=mask, token_ids=ids, advantages=advantages):
            loss = policy_gradient_loss(shift_logprobs(model(ids).logits, ids), mask, advantages)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracer.finish_step(step)
        state["step"] += 1

    return actor_step, tracer


def _interleaved_medians(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step of each variant, variants interleaved round by round so that load from
    other processes on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up (allocator, projection matrices)
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_rss_mib(variant: str, rounds: int) -> float:
    """Peak RSS of a fresh process running `rounds` steps of `variant`."""
    out = subprocess.run([sys.executable, __file__, "--memory-worker", variant, "--rounds", str(rounds)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def report(rounds: int = 5) -> list[dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        built = {variant: build(variant, f"{run_dir}/{variant}") for variant in VARIANTS}
        medians = _interleaved_medians({v: step for v, (step, _) in built.items()}, rounds)
        rows = []
        for variant, (_, tracer) in built.items():
            sizes = sorted({(p.k_in, p.k_out) for p in tracer.projections})
            rows.append({"variant": variant, "step_s": medians[variant], "D": tracer.dim, "k_in_k_out": sizes,
                         "peak_rss_mib": _peak_rss_mib(variant, 2)})
    base = rows[0]
    print(f"actor step, {BATCH}x{LENGTH} tokens, CPU threads={torch.get_num_threads()}, median of {rounds} "
          "interleaved rounds")
    print(f"{'variant':8s} {'D':>6s} {'(k_in,k_out)':>14s} {'step ms':>9s} {'x off':>6s} {'peak RSS MiB':>13s} {'x off':>6s} "
          f"{'+MiB':>6s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['D']:6d} {str(r['k_in_k_out'][0] if r['k_in_k_out'] else '-'):>14s} "
              f"{r['step_s'] * 1e3:9.1f} {r['step_s'] / base['step_s']:6.3f} {r['peak_rss_mib']:13.1f} "
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:6.3f} {r['peak_rss_mib'] - base['peak_rss_mib']:6.1f}")
    return rows


# ---------------------------------------------------------------- pytest-benchmark
_MEANS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_ratios(request):
    yield
    if "off" in _MEANS:
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        for variant, mean in _MEANS.items():
            reporter.write_line(f"bench_traces: {variant} step {mean * 1e3:.1f} ms = {mean / _MEANS['off']:.3f} x off")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_actor_step_tracing_overhead(benchmark, variant, tmp_path):
    benchmark.group = "traces: actor step"
    step, _ = build(variant, str(tmp_path))
    step()  # warm-up
    benchmark.pedantic(step, rounds=5, iterations=1)
    _MEANS[variant] = benchmark.stats.stats.mean


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-worker", choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.memory_worker:
        with tempfile.TemporaryDirectory() as run_dir:
            step_fn, _ = build(args.memory_worker, run_dir)
            for _ in range(args.rounds):
                step_fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"peak_rss_mib": peak}))
    else:
        report(args.rounds)
