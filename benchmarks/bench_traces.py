"""Overhead of the influence trace on the actor step: time and peak memory, tracing off vs on.

    python benchmarks/bench_traces.py [--rounds 9] [--threads 1]   # table with ratios vs off
    python -m pytest benchmarks/bench_traces.py -q                 # pytest-benchmark, ratio table at the end

Actor step = forward, policy-gradient loss, backward, AdamW step of a Llama-style model (hidden 256,
4 layers, intermediate 688, vocab 2048: 3.95M parameters) on a batch of 8 x 128 tokens (96 response
tokens each), float32 on CPU. The traced variants hook the 4 `mlp.down_proj` modules (the default
filter), keep all 96 tokens of every response, and run `finish_step` (identity-mode scoring and the
step-file write) inside the timed step:
- `proj16`: projection_dim_factor 16 (default caps): (k_in, k_out) = (43, 16) per module, D = 2752
- `proj4`:  projection_dim_factor 4, caps raised: (172, 64) per module, D = 44032
Times are medians over rounds in which the variants take turns (so load from other processes on a
shared machine hits them alike), as process CPU seconds and wall seconds. Memory: `peak RSS` is the
high-water mark (VmHWM) of a fresh process that builds the model and runs 2 steps, interpreter and
torch included; `tracer peak` is the exact number of bytes the tracer itself holds at its largest
(after the forward: projected inputs of every traced module, projection matrices).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import pytest
import torch
from measure import run_worker, vm_hwm_mib

from fastarcher.traces import InfluenceTraceConfig, InfluenceTracer
from fastarcher.traces.testing import policy_gradient_loss, shift_logprobs, tiny_causal_lm

BATCH, LENGTH, PROMPT = 8, 128, 32
VARIANTS = {
    "off": None,
    "proj16": dict(projection_dim_factor=16),
    "proj4": dict(projection_dim_factor=4, max_proj_vector_sum=4096, max_hessian_dim=65536),
}


def build(variant: str, run_dir: str):
    """(actor_step(), tracer, stats) for one variant; stats["tracer_peak_bytes"] is updated by each step."""
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
    stats = {"step": 0, "tracer_peak_bytes": 0}

    def actor_step():
        step = stats["step"]
        with tracer.capture(step, response_mask=mask, token_ids=ids, advantages=advantages):
            loss = policy_gradient_loss(shift_logprobs(model(ids).logits, ids), mask, advantages)
            stats["tracer_peak_bytes"] = max(stats["tracer_peak_bytes"], tracer.held_bytes())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats["tracer_peak_bytes"] = max(stats["tracer_peak_bytes"], tracer.held_bytes())
        tracer.finish_step(step)
        stats["step"] += 1

    return actor_step, tracer, stats


def interleaved_medians(steps: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """(median CPU seconds, median wall seconds) per step of each variant, variants taking turns."""
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm-up (allocator, projection matrices)
    for _ in range(rounds):
        for name, fn in steps.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in steps}


def peak_rss_mib(variant: str, threads: int) -> float:
    return run_worker(__file__, "--memory-worker", variant, "--threads", str(threads))["peak_rss_mib"]


def report(rounds: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as run_dir:
        built = {variant: build(variant, f"{run_dir}/{variant}") for variant in VARIANTS}
        medians = interleaved_medians({v: b[0] for v, b in built.items()}, rounds)
        rows = []
        for variant, (_, tracer, stats) in built.items():
            sizes = sorted({(p.k_in, p.k_out) for p in tracer.projections})
            rows.append({"variant": variant, "cpu_s": medians[variant][0], "wall_s": medians[variant][1],
                         "D": tracer.dim, "k": sizes[0] if sizes else None,
                         "tracer_peak_mib": stats["tracer_peak_bytes"] / 2**20,
                         "peak_rss_mib": peak_rss_mib(variant, threads)})
    base = rows[0]
    print(f"actor step {BATCH}x{LENGTH} tokens, torch threads {threads}, medians of {rounds} interleaved rounds")
    print(f"{'variant':8s} {'D':>6s} {'(k_in,k_out)':>13s} {'cpu ms':>8s} {'x off':>6s} {'wall ms':>8s} {'x off':>6s} "
          f"{'peak RSS MiB':>12s} {'x off':>6s} {'tracer peak MiB':>15s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['D']:6d} {str(r['k'] or '-'):>13s} {r['cpu_s'] * 1e3:8.1f} "
              f"{r['cpu_s'] / base['cpu_s']:6.3f} {r['wall_s'] * 1e3:8.1f} {r['wall_s'] / base['wall_s']:6.3f} "
              f"{r['peak_rss_mib']:12.1f} {r['peak_rss_mib'] / base['peak_rss_mib']:6.3f} {r['tracer_peak_mib']:15.2f}")
    return rows


# ---------------------------------------------------------------- pytest-benchmark
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_actor_step_tracing_overhead(benchmark, ratio_table, variant, tmp_path):
    benchmark.group = "traces: actor step"
    step, _, _ = build(variant, str(tmp_path))
    step()  # warm-up
    benchmark.pedantic(step, rounds=5, iterations=1)
    ratio_table.record("traces: actor step 8x128", variant, baseline="off",
                       time_s=benchmark.stats.stats.median, peak_mib=peak_rss_mib(variant, 1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-worker", choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as run_dir:
            step_fn, _, _ = build(args.memory_worker, run_dir)
            for _ in range(2):
                step_fn()
        print(json.dumps({"peak_rss_mib": vm_hwm_mib()}))
    else:
        report(args.rounds, args.threads)
