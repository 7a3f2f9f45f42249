"""Benchmarks of per-token log-prob + entropy, forward + backward: time, peak memory, accuracy.

    pytest benchmarks/bench_kernels.py --benchmark-only                # CPU set; GPU set if CUDA
    pytest benchmarks/bench_kernels.py --benchmark-only -k gpu         # GPU set only
    FASTARCHER_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only       # smallest shapes only

CPU set: the chunked torch path (the CPU fallback) against eager torch (float32 log_softmax + exp +
gather, `plain_logprob_entropy`), from logits and fused with the LM head. Peak memory is measured
honestly in a fresh child process per case: the resident-set high-water mark (VmHWM) after the
inputs exist (and after a tiny warm-up that loads the libraries) is subtracted from VmHWM after one
forward + backward, so the figure is the extra resident memory the computation needed, including the
gradient it returns. (VmHWM belongs to the child's own address space; ru_maxrss would not do: Linux
carries the parent's peak across fork + exec.)

GPU set (skipped without CUDA): Triton vs eager vs torch.compile(eager) vs Liger (when importable;
Liger's kernels compute log-probs only, with a summed loss), bf16, N in {4k, 16k}, V in {32k, 152k},
H in {2048, 4096}; peak memory from the CUDA allocator (max_memory_allocated above the inputs), and
for the logits kernels the achieved bandwidth 3 N V bytes / time (read logits twice, write the
gradient once: the minimum for an unfused op) as a fraction of the card's peak.

The summary at the end prints, per group, each provider's speedup and memory ratio against eager.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from fastarcher.kernels.chunked import chunked_logprob_entropy
from fastarcher.kernels.linear_logprob_entropy import linear_logprob_entropy
from fastarcher.kernels.reference import eager_logprob_entropy, plain_logprob_entropy

QUICK = os.environ.get("FASTARCHER_BENCH_QUICK", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
BASELINE = "eager"

CPU_LOGITS_SHAPES = [(512, 32000)] if QUICK else [(2048, 32000), (512, 152064)]  # (N, V)
CPU_LINEAR_SHAPES = [(2048, 256, 32000)]  # (N, H, V): N H < N V, as in training
GPU_LOGITS_SHAPES = [(N, V) for N in ((4096,) if QUICK else (4096, 16384))
                     for V in (32768, 152064)]
GPU_LINEAR_SHAPES = [(N, H, V) for N in ((4096,) if QUICK else (4096, 16384))
                     for H in (2048, 4096) for V in (32768, 152064)]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]


# ----------------------------------------------------------------------------- the functions
def eager_linear(hidden, weight, targets):
    """Unfused LM head + eager log-prob/entropy: [N, V] logits and their float32 copies exist."""
    return plain_logprob_entropy(hidden @ weight.t(), targets)


def logits_fn(provider: str):
    if provider == "eager":
        return plain_logprob_entropy
    if provider == "torch_chunked":
        return chunked_logprob_entropy
    if provider == "triton":
        from fastarcher.kernels.logprob_entropy import logprob_entropy

        return logprob_entropy
    if provider == "compile":
        return torch.compile(plain_logprob_entropy)
    if provider == "liger":
        functional = pytest.importorskip("liger_kernel.transformers.functional")
        return lambda logits, targets: (
            -functional.liger_cross_entropy(logits, targets, reduction="none"),)
    raise ValueError(f"provider ({provider!r}) unknown")


def linear_fn(provider: str):
    if provider == "eager":
        return eager_linear
    if provider == "torch_chunked":
        return lambda h, w, t: linear_logprob_entropy(h, w, t, use_triton=False)
    if provider == "triton":
        return lambda h, w, t: linear_logprob_entropy(h, w, t, use_triton=True)
    if provider == "compile":
        return torch.compile(eager_linear)
    if provider == "liger":
        functional = pytest.importorskip("liger_kernel.transformers.functional")
        return lambda h, w, t: (
            -functional.liger_fused_linear_cross_entropy(h, w, t, reduction="sum"),)
    raise ValueError(f"provider ({provider!r}) unknown")


def make_inputs(kind: str, shape: tuple, device: str, dtype: torch.dtype, seed: int = 0):
    """Inputs made in place (no temporary as large as the input, which would raise ru_maxrss)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "logits":
        N, V = shape
        logits = torch.randn(N, V, generator=g, device=device, dtype=dtype).mul_(3.0)
        targets = torch.randint(0, V, (N,), generator=g, device=device)
        return [logits.requires_grad_()], targets
    N, H, V = shape
    hidden = torch.randn(N, H, generator=g, device=device, dtype=dtype)
    weight = torch.randn(V, H, generator=g, device=device, dtype=dtype).mul_(2.0 / H**0.5)
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    return [hidden.requires_grad_(), weight.requires_grad_()], targets


def fwd_bwd(fn, leaves, targets):
    """One forward + backward with unit upstream gradients on every output."""
    for leaf in leaves:
        leaf.grad = None
    outputs = fn(*leaves, targets)
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    if leaves[0].is_cuda:
        torch.cuda.synchronize()  # inside the timed call
    return outputs


def max_error(kind, fn, leaves, targets, rows=64):
    """max |Δ| of logp and entropy against the float64 oracle on the first `rows` tokens."""
    with torch.no_grad():
        # Clones: some providers (Liger) overwrite their input with its gradient.
        if kind == "logits":
            part = [leaves[0][:rows].clone()]
            ref = eager_logprob_entropy(part[0].double(), targets[:rows])
        else:
            part = [leaves[0][:rows].clone(), leaves[1].clone()]
            ref = eager_logprob_entropy(part[0].double() @ part[1].double().t(), targets[:rows])
        got = fn(*part, targets[:rows])
    return max((a.double() - b).abs().max().item() for a, b in zip(got, ref))


# ----------------------------------------------------------------------------- CPU peak memory
def child_peak_mib(kind: str, provider: str, shape: tuple) -> float:
    """Run one forward + backward in a fresh process; return its extra peak RSS in MiB."""
    args = [sys.executable, os.path.abspath(__file__), "--peak", kind, provider,
            *map(str, shape)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def resident_high_water_mib() -> float:
    """Peak resident set size of this process's address space (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def _child_main(kind: str, provider: str, shape: tuple) -> None:
    fn = logits_fn(provider) if kind == "logits" else linear_fn(provider)
    small = (4, 64) if kind == "logits" else (4, 16, 64)
    fwd_bwd(fn, *make_inputs(kind, small, "cpu", torch.float32))  # load libraries, warm caches
    leaves, targets = make_inputs(kind, shape, "cpu", torch.float32)
    before = resident_high_water_mib()
    fwd_bwd(fn, leaves, targets)
    print(json.dumps({"peak_mib": resident_high_water_mib() - before}))


# ----------------------------------------------------------------------------- CPU benchmarks
def _bench_cpu(benchmark, ratio_table, kind, provider, shape):
    fn = logits_fn(provider) if kind == "logits" else linear_fn(provider)
    leaves, targets = make_inputs(kind, shape, "cpu", torch.float32)
    err = max_error(kind, fn, leaves, targets)
    peak = child_peak_mib(kind, provider, shape)
    benchmark.extra_info.update(peak_mib=peak, max_err=err)
    benchmark.pedantic(fwd_bwd, args=(fn, leaves, targets), rounds=3, warmup_rounds=1)
    time_s = benchmark.stats.stats.median if benchmark.stats else None
    group = f"cpu {kind} fp32 " + "x".join(map(str, shape))
    ratio_table.record(group, provider, baseline=BASELINE, time_s=time_s, peak_mib=peak,
                       max_err=err)


@pytest.mark.parametrize("shape", CPU_LOGITS_SHAPES, ids=lambda s: "N{}-V{}".format(*s))
@pytest.mark.parametrize("provider", ["eager", "torch_chunked"])
def test_cpu_logits_fwd_bwd(benchmark, ratio_table, provider, shape):
    benchmark.group = "cpu-logits-" + "x".join(map(str, shape))
    _bench_cpu(benchmark, ratio_table, "logits", provider, shape)


@pytest.mark.parametrize("shape", CPU_LINEAR_SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("provider", ["eager", "torch_chunked"])
def test_cpu_linear_fwd_bwd(benchmark, ratio_table, provider, shape):
    benchmark.group = "cpu-linear-" + "x".join(map(str, shape))
    _bench_cpu(benchmark, ratio_table, "linear", provider, shape)


# ----------------------------------------------------------------------------- GPU benchmarks
def peak_bandwidth_bytes_per_s() -> float | None:
    """The card's DRAM bandwidth from its bus width and memory clock (None if unknown)."""
    try:
        from torch.cuda._device_limits import GPULimits

        return float(GPULimits(torch.device("cuda")).get_memory_bandwidth_Bps())
    except Exception:  # private helper: absent or changed in this torch
        return None


def _bench_gpu(benchmark, ratio_table, kind, provider, shape):
    torch.cuda.empty_cache()
    fn = logits_fn(provider) if kind == "logits" else linear_fn(provider)
    leaves, targets = make_inputs(kind, shape, "cuda", torch.bfloat16)
    group = f"gpu {kind} bf16 " + "x".join(map(str, shape))
    # Liger returns a summed loss (linear) or -logp only: no comparable logp/entropy pair.
    err = None if provider == "liger" else max_error(kind, fn, leaves, targets)
    try:
        fwd_bwd(fn, leaves, targets)  # warm-up (compiles torch.compile and Triton kernels)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for leaf in leaves:
            leaf.grad = None
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, leaves, targets)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        benchmark.pedantic(fwd_bwd, args=(fn, leaves, targets), rounds=5, warmup_rounds=0)
    except torch.cuda.OutOfMemoryError:
        del leaves
        ratio_table.record(group, provider, baseline=BASELINE, time_s=None, peak_mib=None,
                           note="OOM")
        pytest.skip(f"{provider} out of memory at {shape}")
    time_s = benchmark.stats.stats.median if benchmark.stats else None
    note = "logp only" if provider == "liger" else ""
    if kind == "logits" and time_s:
        bw = peak_bandwidth_bytes_per_s()
        moved = 3 * shape[0] * shape[1] * leaves[0].element_size()
        if bw:
            note = (note + " " if note else "") + f"bw {moved / time_s / bw:.0%} of peak"
    benchmark.extra_info.update(peak_mib=peak, max_err=err, note=note)
    ratio_table.record(group, provider, baseline=BASELINE, time_s=time_s, peak_mib=peak,
                       max_err=err, note=note)


@pytest.mark.parametrize("shape", GPU_LOGITS_SHAPES, ids=lambda s: "N{}-V{}".format(*s))
@pytest.mark.parametrize("provider", ["eager", "triton", "compile", "liger"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_logits_fwd_bwd(benchmark, ratio_table, provider, shape):
    benchmark.group = "gpu-logits-" + "x".join(map(str, shape))
    _bench_gpu(benchmark, ratio_table, "logits", provider, shape)


@pytest.mark.parametrize("shape", GPU_LINEAR_SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("provider", ["eager", "triton", "compile", "liger"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_linear_fwd_bwd(benchmark, ratio_table, provider, shape):
    benchmark.group = "gpu-linear-" + "x".join(map(str, shape))
    _bench_gpu(benchmark, ratio_table, "linear", provider, shape)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--peak":
    _child_main(sys.argv[2], sys.argv[3], tuple(int(x) for x in sys.argv[4:]))
