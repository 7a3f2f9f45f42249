"""Replay sampling with the s' rebuild: transitions per second, against the previous rebuild measured in the same run.

    pytest benchmarks/bench_replay.py --benchmark-only
    python benchmarks/bench_replay.py [--rounds 7]      # interleaved medians, a table

One critic phase of the random-map preset draws 20 micro-batches of 32 rows at once (640 rows; states of
up to 40 tokens, actions 4, observations 32, s' kept to the 40-token window) from a buffer of 20,000.
Providers, each doing that phase's replay work:
- `three_gathers` (baseline, the previous code): sample 640 rows, then per micro-step cut the rows,
  trim them and rebuild s' with one gather per segment (`_concat_three_gathers` below);
- `per_step`: the same loop with today's one-gather `concat_segments`;
- `phase`: what the critic phase does now: sample, rebuild s' of all 640 rows once, then per micro-step
  cut and trim the rows and slice their s';
- `sample_rebuild`: only the sample and one rebuild of the 640 rows (the "transitions/s" figure).
Every provider's s' is checked equal to the baseline's before timing.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import interleaved_medians  # noqa: E402

from fastarcher.replay import ReplayBuffer, TransitionBatch  # noqa: E402

BASELINE = "three_gathers"
S, A, O, WINDOW = 40, 4, 32, 40
ROWS, MICRO = 640, 32


def _concat_three_gathers(segments, *, max_len: int, pad_id: int):
    """The previous rebuild (one gather and one select per segment), kept here as the baseline."""
    first_ids = segments[0][0]
    width = min(sum(ids.shape[1] for ids, _ in segments), max_len)
    lens = [length.long() for _, length in segments]
    total = torch.stack(lens).sum(0)
    pos = (total - max_len).clamp(min=0)[:, None] + torch.arange(width)
    out = torch.full((first_ids.shape[0], width), pad_id, dtype=torch.long)
    offset = torch.zeros_like(total)
    for (ids, _), length in zip(segments, lens):
        local = pos - offset[:, None]
        inside = (local >= 0) & (local < length[:, None])
        if ids.shape[1] > 0:
            out = torch.where(inside, ids.long().gather(1, local.clamp(0, ids.shape[1] - 1)), out)
        offset = offset + length
    return out, total.clamp(max=max_len)


def _filled_buffer(seed: int = 0) -> ReplayBuffer:
    rng = random.Random(seed)
    n = 20_000

    def ids(width: int, lo: int):
        lengths = [rng.randint(lo, width) for _ in range(n)]
        t = torch.zeros((n, width), dtype=torch.long)
        for i, length in enumerate(lengths):
            t[i, :length] = torch.randint(1, 64, (length,))
        return t, torch.tensor(lengths)

    (s, sl), (a, al), (o, ol) = ids(S, 1), ids(A, 1), ids(O, 1)
    buf = ReplayBuffer(n, S, A, O, pad_id=0)
    buf.add(TransitionBatch(state_ids=s, state_len=sl, action_ids=a, action_len=al, next_obs_ids=o,
                            next_obs_len=ol, reward=torch.zeros(n), done=torch.zeros(n),
                            mc_return=torch.zeros(n), pad_id=0))
    return buf


def providers(buf: ReplayBuffer) -> dict:
    def sample():
        return buf.sample(ROWS, torch.Generator().manual_seed(0))

    def micro_batches(batch):
        return [(slice(k, k + MICRO), batch.select(slice(k, k + MICRO)).trimmed()) for k in range(0, ROWS, MICRO)]

    def three_gathers():
        return [_concat_three_gathers([(mb.state_ids, mb.state_len), (mb.action_ids, mb.action_len),
                                       (mb.next_obs_ids, mb.next_obs_len)], max_len=WINDOW, pad_id=0)
                for _, mb in micro_batches(sample())]

    def per_step():
        return [mb.next_state(WINDOW) for _, mb in micro_batches(sample())]

    def phase():
        batch = sample()
        all_ids, all_len = batch.next_state(WINDOW)
        return [(all_ids[rows, :mb.next_state_width(WINDOW)], all_len[rows]) for rows, mb in micro_batches(batch)]

    def sample_rebuild():
        return sample().next_state(WINDOW)

    return {BASELINE: three_gathers, "per_step": per_step, "phase": phase, "sample_rebuild": sample_rebuild}


def check_equal(fns: dict) -> None:
    """Every provider's s' equals the baseline's (the same sample: a fixed generator seed)."""
    want = fns[BASELINE]()
    for name in ("per_step", "phase"):
        got = fns[name]()
        assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want)), name
    ids, lengths = fns["sample_rebuild"]()
    for k, (w_ids, w_len) in enumerate(want):
        rows = slice(k * MICRO, (k + 1) * MICRO)
        assert torch.equal(ids[rows, :w_ids.shape[1]], w_ids) and torch.equal(lengths[rows], w_len)


@pytest.fixture(scope="module")
def buffer_fns():
    torch.set_num_threads(1)
    fns = providers(_filled_buffer())
    check_equal(fns)
    return fns


@pytest.mark.parametrize("provider", [BASELINE, "per_step", "phase", "sample_rebuild"])
def test_replay(benchmark, buffer_fns, provider, ratio_table):
    benchmark.pedantic(buffer_fns[provider], rounds=20, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    ratio_table.record("replay[640 rows, S40 A4 O32]", provider, baseline=BASELINE, time_s=seconds,
                       peak_mib=None, note=f"{ROWS / seconds / 1e3:.0f}k transitions/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20, help="calls per timed round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fns = providers(_filled_buffer())
    check_equal(fns)
    repeated = {name: (lambda fn=fn: [fn() for _ in range(args.repeat)]) for name, fn in fns.items()}
    medians = {name: s / args.repeat for name, s in interleaved_medians(repeated, args.rounds).items()}
    base = medians[BASELINE]
    print(f"{ROWS} rows (S={S}, A={A}, O={O}, window {WINDOW}) per call; medians of {args.rounds} interleaved rounds")
    print("| provider | ms per phase | transitions/s | speedup |")
    print("|---|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.3f} | {ROWS / seconds / 1e3:.0f}k | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
