"""Is the policy gradient an ascent direction at the start of RL, and for how large a step?

    python scripts/gradient_line_search.py --config configs/guess64_cpu.yaml [train flags] \
        -- --episodes 2048 --steps 0.01 0.03 0.1

Builds the run's policy (with its warm start), then:
1. checks that the rollout engine's sampling log-probs equal the trainer's recomputed ones on 64 episodes;
2. estimates the REINFORCE gradient (batch-mean baseline, Monte-Carlo turn returns) twice, from two
   independent batches of `--episodes` episodes, and prints their cosine per parameter and overall;
3. moves the parameters by plain steps of the given norms along the mean estimate (ascent), against it,
   and along a random direction, and measures sampled success on the same `--eval-episodes` episodes
   (same env seeds and sampling stream: common random numbers).

When ascent of a small norm raises success and larger ones lower it while random directions do not, the
return is sharply curved along the gradient: the trainer's steps must stay below that norm.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from fastarcher.algos.reinforce import group_advantages
from fastarcher.dist import DistInfo
from fastarcher.envs.runner import BatchedEnvRunner
from fastarcher.rollout.collect import play_episodes, sampled_lengths
from fastarcher.train import parse_config
from fastarcher.trainer import Trainer


class RecordingEngine:
    """Wraps an engine and keeps (prompt, tokens, log-probs) of every generated utterance."""

    def __init__(self, engine):
        self.engine, self.records = engine, {}

    def generate(self, prompts, params, generator=None):
        out = self.engine.generate(prompts, params, generator)
        for prompt, tokens, logprobs in zip(prompts, out.token_ids, out.logprobs):
            self.records[(tuple(prompt), tuple(tokens))] = list(logprobs)
        return out


class LineSearch:
    def __init__(self, trainer: Trainer):
        self.tr, self.cfg = trainer, trainer.cfg

    def play(self, n: int, sample_seed: int, seed_base: int, engine=None):
        generator = torch.Generator().manual_seed(sample_seed)
        return play_episodes(BatchedEnvRunner(self.cfg.env, n), [seed_base + k for k in range(n)],
                             tokenizer=self.tr.tokenizer, stop_id=self.tr.stop_id, engine=engine or self.tr.engine,
                             params=self.tr.actor.sampling_params(False), generator=generator,
                             context_tokens=self.cfg.rollout.context_tokens)

    def token_logprobs(self, batch):
        return self.tr.actor.token_logprobs(batch.state_ids, batch.state_len, batch.action_ids, batch.action_len,
                                            sampled_len=sampled_lengths(batch.action_len,
                                                                        self.cfg.rollout.max_new_tokens))

    def logprob_agreement(self, n: int = 64) -> tuple[float, int]:
        """Max |engine − trainer| log-prob over the sampled tokens of n episodes, and the rows compared."""
        recorder = RecordingEngine(self.tr.engine)
        batch = self.play(n, 1, 3_000_000, recorder).transitions(self.cfg.archer.gamma, self.tr.pad_id)
        with torch.no_grad():
            logprob, _, mask = self.token_logprobs(batch)
        worst = 0.0
        for i in range(len(batch)):
            key = (tuple(batch.state_ids[i, :batch.state_len[i]].tolist()),
                   tuple(batch.action_ids[i, :batch.action_len[i]].tolist()))
            engine = recorder.records[key]  # a KeyError here: the trainer rebuilt a state the engine never saw
            ours = (logprob[i] * mask[i])[:len(engine)].tolist()
            worst = max(worst, *(abs(a - b) for a, b in zip(ours, engine)))
        return worst, len(batch)

    def gradient(self, n: int, sample_seed: int, seed_base: int) -> torch.Tensor:
        """Flat ∇ of −mean_turns(A · Σ log π) over n fresh episodes (A: turn return − batch mean)."""
        batch = self.play(n, sample_seed, seed_base).transitions(self.cfg.archer.gamma, self.tr.pad_id)
        advantage = group_advantages(batch.mc_return, None)
        policy = self.tr.policy
        policy.zero_grad()
        for start in range(0, len(batch), 256):
            rows = torch.arange(start, min(start + 256, len(batch)))
            logprob, _, mask = self.token_logprobs(batch.select(rows))
            (-(advantage[rows] * (logprob * mask).sum(-1)).sum() / len(batch)).backward()
        return torch.cat([p.grad.flatten().clone() for p in policy.parameters()])

    def success_after(self, theta0: dict, direction: torch.Tensor, norm: float, episodes: int) -> float:
        """Sampled success after θ0 − norm · direction/|direction| (the same episodes every call)."""
        policy = self.tr.policy
        policy.load_state_dict(theta0)
        unit = direction / direction.norm()
        with torch.no_grad():
            offset = 0
            for p in policy.parameters():
                p -= norm * unit[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self.tr.sync_engine()
        result = self.play(episodes, 7, 9_000_000)
        return sum(e.success for e in result.kept()) / episodes


def main(argv: list[str]) -> None:
    cut = argv.index("--") if "--" in argv else len(argv)
    train_args, own = argv[:cut], argv[cut + 1:]  # train flags, then this script's own
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=2048, help="episodes per gradient estimate")
    parser.add_argument("--eval-episodes", type=int, default=2048, help="episodes per success measurement")
    parser.add_argument("--steps", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="step norms")
    args = parser.parse_args(own)
    cfg = parse_config([*train_args, "--checkpoint.resume", "none", "--log.no-progress",
                        "--log.run-dir", "/tmp/fastarcher_line_search"])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    if cfg.warm_start.steps:
        trainer.warm_start()
    search = LineSearch(trainer)
    worst, rows = search.logprob_agreement()
    print(f"engine vs trainer log-probs: max difference {worst:.2e} over {rows} turns")
    theta0 = copy.deepcopy(trainer.policy.state_dict())
    g1 = search.gradient(args.episodes, 3, 7_000_000)
    g2 = search.gradient(args.episodes, 4, 8_000_000)
    cos = torch.nn.functional.cosine_similarity
    print(f"two independent gradient estimates: cosine {float(cos(g1, g2, dim=0)):+.3f}, "
          f"norms {float(g1.norm()):.4f} {float(g2.norm()):.4f}")
    offset = 0
    for name, p in trainer.policy.named_parameters():
        a, b = g1[offset:offset + p.numel()], g2[offset:offset + p.numel()]
        offset += p.numel()
        print(f"  {name:48s} norm {float(a.norm()):.4f}  cosine {float(cos(a, b, dim=0)):+.3f}")
    g = (g1 + g2) / 2
    random_direction = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    start = search.success_after(theta0, g, 0.0, args.eval_episodes)
    print(f"sampled success at the start: {start:.4f} ({args.eval_episodes} episodes)")
    for norm in args.steps:
        up, down, rand = (search.success_after(theta0, d, norm, args.eval_episodes) for d in (g, -g, random_direction))
        print(f"step norm {norm:g}: ascent {up:.4f}  descent {down:.4f}  random {rand:.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
