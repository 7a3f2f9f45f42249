"""Actor scoring step (utterance log-probs + entropy, forward and backward): the LM head fused with the
log-prob (`fused_head`, no (B, A, V) logits) vs materialised logits, at a large vocabulary.

    python benchmarks/bench_actor.py [--rounds 5]     # table with ratios
    python -m pytest benchmarks/bench_actor.py -q     # pytest-benchmark, ratio table at the end

Step: `action_logprobs` on 64 utterances of 16 tokens after 48-token states, loss Σ log π + 0.01 Σ H,
backward. Policy: the built-in Llama shape (hidden 256, 2 layers) with a 32k or 128k vocabulary, float32,
one torch thread. Baseline `logits`: `fused_head=False`; provider `fused`: the default unconstrained path.
Peak memory is the growth of peak RSS (VmHWM) over the first step in a fresh process (model built).
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from measure import interleaved_medians, run_worker, vm_hwm_mib

from fastarcher.model import ModelConfig, build_builtin_model
from fastarcher.policy import action_logprobs

BATCH, STATE, ACTION = 64, 48, 16
VOCABS = (32_000, 128_000)
PROVIDERS = ("logits", "fused")


def build(vocab: int):
    torch.manual_seed(0)
    policy = build_builtin_model(ModelConfig(hidden_size=256, num_layers=2, intermediate_size=1024), vocab, 0, 1)
    g = torch.Generator().manual_seed(1)
    state_ids = torch.randint(2, vocab, (BATCH, STATE), generator=g)
    state_len = torch.randint(STATE // 2, STATE + 1, (BATCH,), generator=g)
    action_ids = torch.randint(2, vocab, (BATCH, ACTION), generator=g)
    action_len = torch.randint(1, ACTION + 1, (BATCH,), generator=g)

    def step(provider: str) -> None:
        logp, entropy, _ = action_logprobs(policy, state_ids, state_len, action_ids, action_len, pad_id=0,
                                           fused_head=provider == "fused")
        (logp.sum() + 0.01 * entropy.sum()).backward()
        policy.zero_grad(set_to_none=True)

    return step


def peak_mib(vocab: int, provider: str) -> float:
    return run_worker(__file__, "--memory-worker", provider, "--vocab", str(vocab))["step_mib"]


def report(rounds: int) -> None:
    torch.set_num_threads(1)
    print(f"actor scoring step: {BATCH} utterances x {ACTION} tokens after {STATE}-token states, hidden 256, "
          f"2 layers, float32, 1 thread; medians of {rounds} interleaved rounds")
    for vocab in VOCABS:
        step = build(vocab)
        med = interleaved_medians({p: (lambda p=p: step(p)) for p in PROVIDERS}, rounds)
        peaks = {p: peak_mib(vocab, p) for p in PROVIDERS}
        print(f"vocab {vocab}: logits {med['logits'] * 1e3:.0f} ms, {peaks['logits']:.0f} MiB; fused "
              f"{med['fused'] * 1e3:.0f} ms, {peaks['fused']:.0f} MiB; time ratio {med['logits'] / med['fused']:.2f}x, "
              f"memory ratio {peaks['logits'] / peaks['fused']:.2f}x")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_actor_scoring_step(benchmark, ratio_table, vocab, provider):
    benchmark.group = f"actor scoring step vocab {vocab}"
    step = build(vocab)
    step(provider)  # warm-up
    benchmark.pedantic(step, args=(provider,), rounds=3, iterations=1)
    ratio_table.record(f"actor scoring {BATCH}x{ACTION} vocab {vocab}", provider, baseline="logits",
                       time_s=benchmark.stats.stats.median, peak_mib=peak_mib(vocab, provider))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-worker", choices=PROVIDERS)
    parser.add_argument("--vocab", type=int, default=VOCABS[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.memory_worker:
        torch.set_num_threads(1)
        step_fn = build(args.vocab)
        before = vm_hwm_mib()  # no warm-up: it would set the high-water mark itself
        step_fn(args.memory_worker)
        print(json.dumps({"step_mib": vm_hwm_mib() - before}))
    else:
        report(args.rounds)
