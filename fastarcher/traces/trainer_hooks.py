"""The traces in the trainer: what a policy step hands to the influence and entropy tracers (ArCHer's actor
step in fastarcher/algos/archer.py, every on-policy algorithm's in fastarcher/algos/on_policy.py `policy_step`).

    python -m fastarcher.train --config configs/tiny_cpu.yaml --trace.influence.enabled --trace.entropy.enabled
    python -m fastarcher.traces.view runs/tiny_cpu --step 12

The trainer builds one `TraceRecorder` and, in each actor step, wraps every micro-batch's forward and
backward in `actor_micro_batch(...)`, then calls `finish_step(step)` before the optimizer step:

    with traces.actor_micro_batch(step, state_ids, state_len, action_ids, action_len,
                                  advantage=advantage, q_value=min_q) as trace:
        logprob_sum, entropy = logprobs(..., trace=trace)   # trace.set_token_entropy(token_entropy (B, A))
        loss.backward()
    metrics = traces.finish_step(step)                      # trace/* keys, the same on every rank

What is traced, in the tracers' terms (docs/traces.md, "Using traces in training"):
- token_ids (B, S + A): the sequence the policy actually runs on, [left-padded state ⊕ right-padded
  action: ArCHer's fresh a′, the on-policy algorithms' sampled utterance]
  (`fastarcher.policy.action_logprobs`); response_mask is 1 on the action tokens.
  The last state token sits at column S − 1 of every row, so the position that predicts action token
  h is S − 1 + h, as the tracers read it (target t from position t − 1); `lm_head` sees only the last
  A + 1 positions (`logits_to_keep`), a tail of the sequence, which the influence tracer handles.
- advantages: the ArCHer advantage of each row exactly as the loss uses it (after the batch-mean
  baseline and normalisation, when those are on); rewards: min(Q1, Q2)(s, a′), the critic's value of
  the fresh action (a′ is never played, so it has no environment reward).
- group_ids: one group per distinct state, the CRC-32 of its token ids, so rows with the same state
  (sampled twice, or the same opening prompt) share a group, on every rank alike.
- step: the actor optimizer step index, (iteration − archer.warmup_iterations) · archer.actor_epochs
  + epoch, counted from 0 at the first actor step; derived from the iteration, so a resumed run
  continues the numbering.

When both traces are off the recorder registers nothing and `actor_micro_batch` yields None at once.
Tracing leaves training unchanged: hooks only read activations and gradients, and the extra backward
of the `log_prob_*` objectives sets every `.grad` aside and restores the RNG (tests/test_traces_trainer.py
checks bit-identical parameters after a CLI run with tracing on and off).
"""
from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from fastarcher.policy import action_logprobs, left_align

from .capture import InfluenceTracer
from .config import TraceConfig
from .entropy import EntropyTracer

__all__ = ["TraceRecorder", "MicroBatchTrace", "ActorBatchLayout", "actor_batch_layout", "state_group_ids"]


class ActorBatchLayout:
    """The actor micro-batch as the policy sees it: token_ids (B, S + A), response_mask (B, S + A), S."""

    __slots__ = ("token_ids", "response_mask", "state_width")

    def __init__(self, token_ids: Tensor, response_mask: Tensor, state_width: int):
        self.token_ids = token_ids  # (B, S + A)
        self.response_mask = response_mask  # (B, S + A) bool, True on action tokens
        self.state_width = state_width  # S

    def widen(self, per_action: Tensor) -> Tensor:
        """(B, A) values at the action tokens → (B, S + A), zero on the state columns."""
        pad = per_action.new_zeros(per_action.shape[0], self.state_width)
        return torch.cat([pad, per_action], dim=1)


def actor_batch_layout(state_ids: Tensor, state_len: Tensor, action_ids: Tensor, action_len: Tensor, *,
                       pad_id: int) -> ActorBatchLayout:
    """The [left-padded state ⊕ right-padded action] layout of `fastarcher.policy.action_logprobs`."""
    state = left_align(state_ids, state_len, pad_id)  # (B, S), as action_logprobs builds it
    token_ids = torch.cat([state, action_ids], dim=1)  # (B, S + A)
    width_a = action_ids.shape[1]
    action_mask = torch.arange(width_a, device=action_ids.device)[None, :] < action_len[:, None]  # (B, A)
    state_part = torch.zeros(state.shape, dtype=torch.bool, device=action_ids.device)
    return ActorBatchLayout(token_ids, torch.cat([state_part, action_mask], dim=1), state.shape[1])


def state_group_ids(state_ids: Tensor, state_len: Tensor) -> Tensor:
    """(B,) int64 group id per row: CRC-32 of the row's state token ids (its first state_len entries).

    Equal states get equal ids on every rank and in every micro-batch; the chance that two different
    states of one step collide is about n²/2³³ (1e-6 for 64 states)."""
    ids = state_ids.detach().to("cpu", torch.int64).numpy()  # a CPU sync, on traced steps only
    lengths = state_len.detach().to("cpu").tolist()
    return torch.tensor([zlib.crc32(ids[row, :n].tobytes()) for row, n in enumerate(lengths)], dtype=torch.int64)


class MicroBatchTrace:
    """Handle yielded inside a traced micro-batch; the trainer's log-prob call stores the token entropy here."""

    __slots__ = ("token_entropy",)

    def __init__(self):
        self.token_entropy: Tensor | None = None  # (B, A) nats, at the action tokens

    def set_token_entropy(self, token_entropy: Tensor) -> None:
        self.token_entropy = token_entropy.detach()


class TraceRecorder:
    """Influence and entropy traces of the policy step of every algorithm that trains it (module docstring;
    docs/traces.md).

    cfg: the `trace` group of the train config; policy: the (possibly FSDP2-wrapped) policy the actor
    trains, the one passed to action_logprobs; info: the trainer's DistInfo (rank, world_size);
    tokenizer: used for `decode` (per-token text); pad_id/constraint: as the trainer passes them to
    action_logprobs (needed by the extra forward of the `log_prob_*` objectives).
    """

    def __init__(self, cfg: TraceConfig, policy: nn.Module, run_dir: str | Path, info, tokenizer, *,
                 pad_id: int | None = None, constraint=None, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.policy = policy
        self.pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        self.constraint = constraint
        self.decode = tokenizer.decode
        self.influence = InfluenceTracer(cfg.influence, policy, run_dir, rank=info.rank, world_size=info.world_size)
        self.entropy = EntropyTracer(cfg.entropy, run_dir, rank=info.rank, world_size=info.world_size)
        self._entropy_metrics: dict[int, dict[str, float]] = {}
        if log is not None and info.rank == 0 and self.enabled:
            log(self.describe(Path(run_dir)))

    @property
    def enabled(self) -> bool:
        return self.cfg.influence.enabled or self.cfg.entropy.enabled

    def describe(self, run_dir: Path) -> str:
        parts = []
        if self.cfg.influence.enabled:
            mods = ", ".join(f"{p.name} ({p.k_out}x{p.k_in})" for p in self.influence.projections)
            parts.append(f"influence every {self.cfg.influence.every_n_steps} actor steps "
                         f"({self.cfg.influence.output_function}, D={self.influence.dim}: {mods}) -> "
                         f"{run_dir / 'influence_trace'}")
        if self.cfg.entropy.enabled:
            parts.append(f"entropy every {self.cfg.entropy.every_n_steps} actor steps -> {run_dir / 'entropy_trace'}")
        return "traces: " + "; ".join(parts)

    def is_due(self, step: int) -> bool:
        return self.influence.is_due(step) or self.entropy.is_due(step)

    @contextlib.contextmanager
    def actor_micro_batch(self, step: int, state_ids: Tensor, state_len: Tensor, action_ids: Tensor,
                          action_len: Tensor, *, advantage: Tensor, q_value: Tensor | None = None
                          ) -> Iterator[MicroBatchTrace | None]:
        """Wrap one actor micro-batch's policy forward AND loss.backward(). Yields None when no trace is
        due at `step`; otherwise a `MicroBatchTrace` whose `set_token_entropy` the log-prob call fills
        (needed when the entropy trace is due). state_ids (B, S) right-padded, state_len (B,),
        action_ids (B, A) right-padded, action_len (B,), advantage (B,), q_value (B,) = min(Q1, Q2)(s, a′).
        """
        influence_due, entropy_due = self.influence.is_due(step), self.entropy.is_due(step)
        if not (influence_due or entropy_due):
            yield None
            return
        layout = actor_batch_layout(state_ids, state_len, action_ids, action_len, pad_id=self.pad_id)
        inputs = dict(response_mask=layout.response_mask, token_ids=layout.token_ids,
                      group_ids=state_group_ids(state_ids, state_len), rewards=q_value, advantages=advantage)
        if influence_due:
            self.influence.trace_objective(step, self._token_logprobs_fn(state_ids, state_len, action_ids, action_len,
                                                                         layout), **inputs)
        handle = MicroBatchTrace()
        with self.influence.capture(step, **inputs):
            yield handle
        if entropy_due:
            if handle.token_entropy is None:
                raise RuntimeError(f"TraceRecorder: the entropy trace is due at step {step} but no token entropy was "
                                   "set; call trace.set_token_entropy(token_entropy) inside actor_micro_batch()")
            self._entropy_metrics[step] = self.entropy.record(
                step, layout.widen(handle.token_entropy), layout.response_mask, layout.token_ids, decode=self.decode,
                **{k: inputs[k] for k in ("group_ids", "rewards", "advantages")})

    def _token_logprobs_fn(self, state_ids, state_len, action_ids, action_len, layout: ActorBatchLayout):
        """forward_fn of trace_objective: (B, S + A) log π of each action token at its index, 0 elsewhere."""
        def forward_fn() -> Tensor:
            logp, _, _ = action_logprobs(self.policy, state_ids, state_len, action_ids, action_len, pad_id=self.pad_id,
                                         constraint=self.constraint, per_token=True)  # (B, A)
            return layout.widen(logp)

        return forward_fn

    def finish_step(self, step: int) -> dict[str, float]:
        """Score and write the step's influence trace; return the step's trace/* metrics (identical on every
        rank). Every rank must call it after the step's micro-batches (a collective on due steps)."""
        metrics = dict(self.influence.finish_step(step, decode=self.decode))
        metrics.update(self._entropy_metrics.pop(step, {}))
        return metrics

    def close(self) -> None:
        """Remove the influence hooks from the policy."""
        self.influence.close()
