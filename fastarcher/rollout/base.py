"""The rollout-engine interface, sampling parameters, and constrained decoding over an action set.

An engine turns a batch of prompts (token ids) into one utterance each (token ids ending with the stop
token, plus the per-token log-probs of the distribution that was sampled). Engines keep their own copy
of the policy weights; the trainer pushes new weights with `update_weights` after each actor update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch
from torch import Tensor


class ActionConstraint:
    """Restricts decoding to a fixed set of utterances (each ends with the stop token).

    Built from the token-id sequences of the allowed actions: a prefix table maps every prefix to the
    tokens that may follow it. `masks_for` gives the same masks for given action tokens, so the
    trainer's log-probs are those of the constrained distribution that the engine sampled from.
    """

    def __init__(self, sequences: Iterable[list[int]], vocab_size: int):
        self.vocab_size = vocab_size
        allowed: dict[tuple[int, ...], set[int]] = {}
        for seq in sequences:
            if not seq:
                raise ValueError("an allowed action encodes to no tokens")
            for i, tok in enumerate(seq):
                allowed.setdefault(tuple(seq[:i]), set()).add(tok)
        self._masks: dict[tuple[int, ...], Tensor] = {}
        for prefix, toks in allowed.items():
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[list(toks)] = True
            self._masks[prefix] = mask
        self._forced = {prefix: next(iter(toks)) for prefix, toks in allowed.items() if len(toks) == 1}
        self.max_len = max(len(p) for p in allowed) + 1
        self._everything = torch.ones(vocab_size, dtype=torch.bool)

    def mask(self, prefix: tuple[int, ...]) -> Tensor:
        """Allowed next tokens after `prefix` (all tokens once the prefix has left the table)."""
        return self._masks.get(prefix, self._everything)

    def forced_token(self, prefix: tuple[int, ...]) -> int | None:
        """The only token allowed after `prefix`, or None when there is a choice."""
        return self._forced.get(prefix)

    def masks_for(self, action_ids: Tensor, action_len: Tensor) -> Tensor:
        """(B, A) action tokens → (B, A, V) masks of the tokens allowed at each position."""
        batch, width = action_ids.shape
        out = torch.ones(batch, width, self.vocab_size, dtype=torch.bool)
        rows = action_ids.tolist()
        for b, n in enumerate(action_len.tolist()):
            for t in range(n):
                out[b, t] = self.mask(tuple(rows[b][:t]))
        return out.to(action_ids.device)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    greedy: bool = False
    stop_token_id: int = 0
    constraint: ActionConstraint | None = None
    share_prompts: bool = False
    """Prompts repeat (group rollouts): an engine may prefill each distinct prompt once."""


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]
    """Generated tokens per prompt, ending with the stop token unless max_new_tokens was reached."""
    logprobs: list[list[float]] = field(default_factory=list)
    """Log-prob of each generated token under the (constrained, tempered) sampling distribution."""
    num_calls: int = 0
    """Model forward calls used (prefill + decode steps), for logging."""
    policy_version: int = 0
    """Weight syncs the engine had received when it sampled these tokens (0: its initial weights)."""


class RolloutEngine(Protocol):
    weights_valid: bool  # holds the policy's weights (false: dummy weights, or released since the last sync)
    timings: dict[str, float]  # seconds of its last memory and sync phases, logged under engine/

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> GenerationOutput: ...

    def begin_weight_update(self) -> None: ...  # before the buckets of one sync

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None: ...

    def end_weight_update(self) -> None: ...  # after them: the engine holds the new policy version

    def sleep(self) -> None: ...  # release all engine memory; the next sync brings the weights back

    def release_cache(self) -> None: ...  # release the KV cache only (weights stay valid)

    def wake(self) -> None: ...
