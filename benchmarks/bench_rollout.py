"""Rollout engine: multi-turn generation with each episode's KV cache kept across turns vs the whole
dialogue prefilled again every turn, and the prefill's peak memory with logits only at the last position.

    python benchmarks/bench_rollout.py [--rounds 5] [--threads 1]   # table with ratios
    python -m pytest benchmarks/bench_rollout.py -q                 # pytest-benchmark, ratio table at the end

Dialogues: 64 episodes shaped like FrozenLake 4x4 with the built-in tokenizer: a 39-token first
observation, then per turn a 2-token utterance and a 20-token observation (the grid), for 5, 10 and 20
turns. Decoding is greedy and never stops early (stop token -1), so every provider generates exactly
the same tokens; time per rollout is compared, i.e. the inverse of generated tokens/s. Providers:
- `reprefill` (baseline): `HFEngine.generate` on the whole dialogue every turn (the engine before the cache);
- `kv_cache`: `HFEngine.open_dialogues()`, feeding each turn only the tokens the dialogue gained;
- `hf_generate`: transformers `model.generate` on the left-padded dialogues every turn (for reference).
Models: the built-in preset policy (hidden 64, 2 layers) and a wider one (hidden 256, 4 layers).
Times are medians over rounds in which the providers take turns (load from other processes on a shared
machine hits them alike).

Prefill memory: one engine prefill of 64 prompts x 256 tokens at vocabulary 32k (hidden 64): logits for
every position (`all_logits`, the engine before) vs the last position only (`last_logits`), as the
growth of peak RSS (VmHWM) in a fresh process.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from measure import interleaved_medians, run_worker, vm_hwm_mib

from fastarcher.model import ModelConfig, build_builtin_model
from fastarcher.rollout.base import SamplingParams
from fastarcher.rollout.hf_engine import HFEngine

EPISODES, FIRST_OBS, ACTION, OBS = 64, 39, 2, 20
TURNS = (5, 10, 20)
MODELS = {"preset": dict(hidden_size=64, num_layers=2, intermediate_size=256),
          "wide": dict(hidden_size=256, num_layers=4, intermediate_size=1024)}
PROVIDERS = ("reprefill", "kv_cache", "hf_generate")
VOCAB = 304  # the built-in tokenizer's size


def build_engine(model: str, vocab: int = VOCAB, max_positions: int = 1024) -> HFEngine:
    torch.manual_seed(0)
    policy = build_builtin_model(ModelConfig(max_positions=max_positions, **MODELS[model]), vocab, 0, 1)
    return HFEngine(policy, pad_id=0, device=torch.device("cpu"))


def _obs(k: int, t: int, n: int) -> list[int]:
    return [5 + (k * 7 + t * 3 + j) % 250 for j in range(n)]


def rollout(engine: HFEngine, provider: str, turns: int) -> list[list[int]]:
    """Play `turns` turns for EPISODES dialogues; returns the final dialogues (token ids)."""
    params = SamplingParams(greedy=True, max_new_tokens=ACTION, stop_token_id=-1)
    dialogues = [_obs(k, 0, FIRST_OBS) for k in range(EPISODES)]
    session = engine.open_dialogues() if provider == "kv_cache" else None
    for t in range(turns):
        if provider == "reprefill":
            actions = engine.generate(dialogues, params).token_ids
        elif provider == "kv_cache":
            actions = session.generate(list(range(EPISODES)), dialogues, params).token_ids
        else:
            actions = _hf_generate(engine.model, dialogues)
        dialogues = [d + a + _obs(k, t + 1, OBS) for k, (d, a) in enumerate(zip(dialogues, actions))]
    return dialogues


@torch.no_grad()
def _hf_generate(model, prompts: list[list[int]]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ACTION, min_new_tokens=ACTION,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def prefill_peak_mib(which: str) -> float:
    return run_worker(__file__, "--prefill-worker", which)["prefill_mib"]


def _prefill_worker(which: str) -> None:
    torch.set_num_threads(1)
    engine = build_engine("preset", vocab=32_000, max_positions=512)
    if which == "all_logits":
        engine._last_logits = {}  # the engine before: the LM head on every prompt position
    prompts = [[5 + (k + j) % 1000 for j in range(256)] for k in range(64)]
    params = SamplingParams(greedy=True, max_new_tokens=1, stop_token_id=-1)
    engine.generate(prompts[:2], params)  # warm-up at a small size
    before = vm_hwm_mib()
    engine.generate(prompts, params)
    print(json.dumps({"prefill_mib": vm_hwm_mib() - before}))


def report(rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"{EPISODES} dialogues, first observation {FIRST_OBS} tokens, per turn {ACTION}-token utterance + "
          f"{OBS}-token observation; torch threads {threads}; medians of {rounds} interleaved rounds")
    print(f"{'model':7s} {'turns':>5s} " + " ".join(f"{p + ' s':>14s}" for p in PROVIDERS) + "   kv_cache speedup")
    for model in MODELS:
        engine = build_engine(model)
        for turns in TURNS:
            fns = {p: (lambda p=p: rollout(engine, p, turns)) for p in PROVIDERS}
            med = interleaved_medians(fns, rounds)
            print(f"{model:7s} {turns:5d} " + " ".join(f"{med[p]:14.3f}" for p in PROVIDERS)
                  + f"   {med['reprefill'] / med['kv_cache']:.2f}x")
    peaks = {w: prefill_peak_mib(w) for w in ("all_logits", "last_logits")}
    print(f"prefill 64 x 256 tokens, vocab 32k: peak RSS growth all_logits {peaks['all_logits']:.0f} MiB, "
          f"last_logits {peaks['last_logits']:.0f} MiB")


# ---------------------------------------------------------------- pytest-benchmark
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engines():
    return {model: build_engine(model) for model in MODELS}


def test_providers_play_identical_dialogues(engines):
    """The comparison is fair only if every provider generates the same tokens."""
    results = {p: rollout(engines["preset"], p, 5) for p in PROVIDERS}
    assert results["kv_cache"] == results["reprefill"] == results["hf_generate"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("turns", TURNS)
@pytest.mark.parametrize("model", list(MODELS))
def test_rollout_turns(benchmark, ratio_table, engines, model, turns, provider):
    if model == "wide" and turns == 20 and provider != "kv_cache":
        pytest.skip("minutes per round on 2 cores; the script mode measures it")
    benchmark.group = f"rollout {model} {turns} turns"
    engine = engines[model]
    rollout(engine, provider, turns)  # warm-up
    benchmark.pedantic(rollout, args=(engine, provider, turns), rounds=3, iterations=1)
    ratio_table.record(f"rollout {model} {EPISODES}x{turns} turns", provider, baseline="reprefill",
                       time_s=benchmark.stats.stats.median, peak_mib=None)


@pytest.mark.parametrize("which", ["all_logits", "last_logits"])
def test_prefill_logits_only_where_read(benchmark, ratio_table, which):
    """Time in process, peak memory in a fresh one."""
    benchmark.group = "engine prefill 64x256 vocab 32k"
    engine = build_engine("preset", vocab=32_000, max_positions=512)
    if which == "all_logits":
        engine._last_logits = {}
    prompts = [[5 + (k + j) % 1000 for j in range(256)] for k in range(64)]
    params = SamplingParams(greedy=True, max_new_tokens=1, stop_token_id=-1)
    benchmark.pedantic(engine.generate, args=(prompts, params), rounds=3, iterations=1)
    ratio_table.record("engine prefill 64x256 vocab 32k", which, baseline="all_logits",
                       time_s=benchmark.stats.stats.median, peak_mib=prefill_peak_mib(which))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefill-worker", choices=["all_logits", "last_logits"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.prefill_worker:
        _prefill_worker(args.prefill_worker)
    else:
        report(args.rounds, args.threads)
