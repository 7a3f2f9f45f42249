"""CHAI, the ArCHer paper's value-based baseline (Verma et al. 2022, "CHAI: A CHatbot AI for Task-Oriented
Dialogue with Offline Reinforcement Learning", https://arxiv.org/abs/2204.08426; as compared in Zhou et al.
2024, https://arxiv.org/abs/2402.19446): the policy LM stays frozen and proposes `chai.samples` utterances
per turn; the critic picks the one with the highest min(Q1, Q2)(s, a).

The critic is ArCHer's (fastarcher/algos/archer.py: double Q/V, Polyak target, replay buffer, the same
critic phase and flags); what differs is the policy that acts and that the V targets follow: best-of-k by Q,
in training and evaluation (evaluation samples too: k greedy utterances would all be the same). There is
no actor phase: the policy is never updated. Under several processes the rollouts score with an unsharded
copy of the critic, refreshed after every critic phase (a sharded forward is a collective, and processes
play different numbers of turns).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fastarcher.algos.archer import Archer, _mask
from fastarcher.rollout.base import GenerationOutput, SamplingParams
from fastarcher.rollout.collect import close_utterance, pad_rows


class RerankingEngine:
    """Wraps a rollout engine: `samples` sampled utterances per prompt, the one that `score(prompts, actions)`
    rates highest is returned (ties: the first sampled)."""

    def __init__(self, engine, score, samples: int, stop_id: int):
        self.engine, self.score, self.samples, self.stop_id = engine, score, samples, stop_id
        self.max_batch = engine.max_batch

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator=None) -> GenerationOutput:
        k = self.samples
        expanded = [p for p in prompts for _ in range(k)]
        out = self.engine.generate(expanded, dataclasses.replace(params, greedy=False), generator)
        scores = self.score(expanded, [close_utterance(a, self.stop_id) for a in out.token_ids])  # (B·k,)
        best = scores.view(len(prompts), k).argmax(-1).tolist()
        picks = [i * k + b for i, b in enumerate(best)]
        return GenerationOutput(token_ids=[out.token_ids[j] for j in picks],
                                logprobs=[out.logprobs[j] for j in picks] if out.logprobs else [],
                                num_calls=out.num_calls, policy_version=out.policy_version)


class Chai(Archer):
    """`--algo chai`: ArCHer's critic phase every iteration, no actor phase; plays best-of-`chai.samples` by Q."""

    name = "chai"
    acts_with_critic = True

    def acting_engine(self, engine):
        return RerankingEngine(engine, self.q_values, self.ctx.cfg.chai.samples, self.ctx.actor.stop_id)

    @torch.no_grad()
    def q_values(self, states: list[list[int]], actions: list[list[int]]) -> torch.Tensor:
        """min(Q1, Q2)(s, a) of each (state, utterance), (B,) on the CPU; states keep their last
        replay.max_state_len tokens, as the replay buffer stores them."""
        critic = self.local_critic if self.local_critic is not None else self.critic
        device, limit, pad = self.ctx.actor.device, self.ctx.cfg.replay.max_state_len, self.ctx.actor.pad_id
        s_ids, s_len = pad_rows([s[-limit:] for s in states], pad)
        a_ids, a_len = pad_rows(actions, pad)
        out = []
        was_training = critic.training
        critic.eval()
        for start in range(0, len(states), self.ctx.cfg.archer.batch_size):
            rows = slice(start, start + self.ctx.cfg.archer.batch_size)
            s, sl, a, al = (t[rows].to(device) for t in (s_ids, s_len, a_ids, a_len))
            q1, q2, _, _ = critic(s, _mask(sl, s.shape[1]), a, _mask(al, a.shape[1]))
            out.append(torch.minimum(q1, q2).float().cpu())
        critic.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def start(self, resumed: bool) -> None:
        super().start(resumed)
        self._refresh_local_critic()

    def update(self, batch, bag) -> dict[str, float]:
        if len(batch.transitions):
            self.buffer.add(batch.transitions.to(self.ctx.actor.device))
        t0 = time.perf_counter()
        self.critic_phase(bag, batch.iteration)
        self._refresh_local_critic()
        return {"time/critic_s": time.perf_counter() - t0, "replay/size": float(len(self.buffer))}

    def _refresh_local_critic(self) -> None:
        if self.local_critic is not None:  # every rank gathers the full critic (a collective)
            full = get_model_state_dict(self.critic, options=StateDictOptions(full_state_dict=True))
            self.local_critic.load_state_dict(full)
