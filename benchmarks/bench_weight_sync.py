"""Weight sync into a rollout engine: seconds per GB, against a plain `load_state_dict` measured in the same run.

    pytest benchmarks/bench_weight_sync.py --benchmark-only
    python benchmarks/bench_weight_sync.py [--rounds 3] [--shape qwen0.5b]     # interleaved medians, a table

Providers (one process, CPU here; the same code runs on a GPU):
- `load_state_dict` (baseline): the engine model's `load_state_dict(policy.state_dict())`, one call, no cap;
- `sync_hf`: `sync_weights` into the HF engine (64 MiB buckets, names checked, copy per tensor);
- `buckets_bf16`: gather + bf16 cast + one-dtype buckets only (what every engine pays before sending);
- `sglang_payload` (sglang installed): the buckets packed by sglang's `FlattenedTensorBucket`, serialized by
  its `MultiprocessingSerializer`, then deserialized and rebuilt as the engine does (both sides, one process).
On CPU a "GB/s" is a memory-copy rate; the issue's GPU target (0.5 s per 1B parameters) is for
`scripts/gpu_check_sglang.sh`.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import interleaved_medians  # noqa: E402

from fastarcher.rollout.buckets import dtype_buckets, engine_tensors  # noqa: E402
from fastarcher.rollout.hf_engine import HFEngine  # noqa: E402
from fastarcher.rollout.weight_sync import sync_weights  # noqa: E402

BASELINE = "load_state_dict"
CAP = 64 << 20
SHAPES = {
    # hidden 512, 8 layers, vocab 32k, tied embeddings: 42M parameters, 0.17 GB in fp32
    "small": dict(vocab_size=32_000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8),
    "qwen0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2),
}


def _models(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=True)).float()
    engine = HFEngine(copy.deepcopy(policy), pad_id=0, device=torch.device("cpu"))
    return policy, engine


def providers(policy, engine) -> dict:
    state = policy.state_dict()
    fns = {
        BASELINE: lambda: engine.model.load_state_dict(state, strict=False),
        "sync_hf": lambda: sync_weights(policy, engine, CAP),
        "buckets_bf16": lambda: sum(len(b) for b in dtype_buckets(engine_tensors(policy, torch.bfloat16), CAP)),
    }
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        from fastarcher.rollout.sglang_engine import bucket_payloads

        def sglang_payload():
            for bucket in dtype_buckets(engine_tensors(policy, torch.bfloat16), CAP):
                (payload,) = bucket_payloads(bucket)
                data = MultiprocessingSerializer.deserialize(payload)
                FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                      metadata=data["metadata"]).reconstruct_tensors()

        fns["sglang_payload"] = sglang_payload
    except ImportError:
        pass
    return fns


def fp32_gb(policy) -> float:
    return sum(p.numel() * p.element_size() for p in policy.parameters()) / 1e9


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    return _models("small")


@pytest.mark.parametrize("provider", [BASELINE, "sync_hf", "buckets_bf16", "sglang_payload"])
def test_weight_sync(benchmark, small, provider, ratio_table):
    policy, engine = small
    fns = providers(policy, engine)
    if provider not in fns:
        pytest.skip("sglang not installed")
    benchmark.pedantic(fns[provider], rounds=3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    ratio_table.record("weight_sync[small]", provider, baseline=BASELINE, time_s=seconds, peak_mib=None,
                       note=f"{fp32_gb(policy) / seconds:.2f} GB/s of fp32 weights")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy, engine = _models(args.shape)
    gb = fp32_gb(policy)
    params = sum(p.numel() for p in policy.parameters()) / 1e9
    medians = interleaved_medians(providers(policy, engine), args.rounds)
    base = medians[BASELINE]
    print(f"{args.shape}: {params * 1e3:.0f}M parameters, {gb:.2f} GB in fp32; medians of {args.rounds} interleaved rounds")
    print("| provider | seconds | s per 1B params | GB/s (fp32 bytes) | × baseline time |")
    print("|---|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / params:.2f} | {gb / seconds:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
