"""Critic micro-step of ArCHer: the online critic's forward + backward on (s, a) and the target's Q̄(s, a′)
and V̄(s′), with s′ = s ⊕ a ⊕ o (dialogues without a context window, as Twenty Questions or guess-the-number).

    python benchmarks/bench_critic.py [--rounds 5]     # table with ratios
    python -m pytest benchmarks/bench_critic.py -q     # pytest-benchmark, ratio table at the end

Providers: `separate_passes` (baseline: the target embeds s, a′ and s′ in three encoder passes) and
`shared_state_pass` (the default: when every s′ extends its s, the pass over s′ also gives s's embedding at
s's last token, so the target makes two passes). Batch: 32 rows (the presets' `archer.batch_size`), states of
100-200 tokens, actions of 2-6, observations of 10-30, the default separate critic encoder (hidden 64,
2 layers) and a wider one (hidden 256, 4 layers), float32, one torch thread. Both providers' targets are
checked equal (to float32 rounding) before timing.
"""
from __future__ import annotations

import argparse

import pytest
import torch
from measure import interleaved_medians

from fastarcher.algos.archer import critic_loss, critic_targets
from fastarcher.critic import CriticConfig, DoubleCritic, make_target

BATCH, VOCAB = 32, 304
CRITICS = {"default": CriticConfig(), "wide": CriticConfig(hidden_size=256, num_layers=4, mlp_hidden=256)}
PROVIDERS = ("separate_passes", "shared_state_pass")


def _ragged(lengths: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return torch.randint(3, VOCAB, (len(lengths), width), generator=g) * mask, mask


def build(name: str):
    torch.manual_seed(0)
    critic = DoubleCritic(CRITICS[name], vocab_size=VOCAB, pad_id=0)
    target = make_target(critic)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    s_len = torch.randint(100, 201, (BATCH,), generator=g)
    a_len, o_len = torch.randint(2, 7, (BATCH,), generator=g), torch.randint(10, 31, (BATCH,), generator=g)
    n, n_mask = _ragged(s_len + a_len + o_len, g)
    s_width = int(s_len.max())
    s_mask = (torch.arange(s_width)[None] < s_len[:, None]).long()
    s = n[:, :s_width] * s_mask
    a, a_mask = _ragged(a_len, g)
    f, f_mask = _ragged(torch.randint(2, 7, (BATCH,), generator=g), g)
    reward, done = torch.randn(BATCH, generator=g), torch.zeros(BATCH)

    def targets(provider: str):
        target.share_state_pass = provider == "shared_state_pass"
        with torch.no_grad():
            return target(s, s_mask, f, f_mask, n, n_mask)

    def step(provider: str) -> None:
        q1, q2, v1, v2 = critic(s, s_mask, a, a_mask)
        tq1, tq2, tv1, tv2 = targets(provider)
        y = critic_targets(reward=reward, done=done, target_v1_next=tv1, target_v2_next=tv2, target_q1_fresh=tq1,
                           target_q2_fresh=tq2, gamma=0.95, mc_return=reward, mc_mix=0.0)
        loss, _ = critic_loss(q1=q1, q2=q2, v1=v1, v2=v2, y_q1=y[0], y_q2=y[1], y_v1=y[2], y_v2=y[3])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x, y in zip(targets("separate_passes"), targets("shared_state_pass")):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    return step


def report(rounds: int) -> None:
    torch.set_num_threads(1)
    print(f"critic micro-step: {BATCH} rows, s 100-200 tokens, s′ = s ⊕ a ⊕ o; float32, 1 thread; "
          f"medians of {rounds} interleaved rounds")
    print("| critic | separate passes (baseline) ms | shared state pass ms | × baseline |")
    print("|---|---|---|---|")
    for name in CRITICS:
        step = build(name)
        med = interleaved_medians({p: (lambda p=p: step(p)) for p in PROVIDERS}, rounds)
        print(f"| {name} | {med['separate_passes'] * 1e3:.1f} | {med['shared_state_pass'] * 1e3:.1f} | "
              f"{med['separate_passes'] / med['shared_state_pass']:.2f} |")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(CRITICS))
def test_critic_micro_step(benchmark, ratio_table, name, provider):
    benchmark.group = f"critic micro-step {name}"
    step = build(name)
    step(provider)  # warm-up
    benchmark.pedantic(step, args=(provider,), rounds=3, iterations=1)
    ratio_table.record(f"critic micro-step {name} {BATCH} rows", provider, baseline="separate_passes",
                       time_s=benchmark.stats.stats.median, peak_mib=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    report(parser.parse_args().rounds)
