"""Batched KV-cache sampling with a transformers causal LM (the CPU default engine).

All live prompts are left-padded into one batch (in chunks of `max_batch`, sorted by length to keep
padding small), prefilled once, then decoded token by token with the KV cache; rows stop at the stop
token. The engine owns an unsharded copy of the policy that the trainer refreshes with
`update_weights` (the same path a remote engine such as SGLang uses).
"""

from __future__ import annotations

import inspect
from typing import Iterable

import torch
from torch import Tensor, nn

from fastarcher.rollout.base import GenerationOutput, SamplingParams


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p; others get -inf.  # (B, V)"""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # A token is dropped when the mass before it already reaches top_p (the top token always stays).
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _cache_of(result):
    cache = getattr(result, "cache", None)
    return cache if cache is not None else result.past_key_values


class HFEngine:
    def __init__(self, model: nn.Module, *, pad_id: int, device: torch.device, max_batch: int = 256):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self._params = dict(self.model.named_parameters())
        # Newer transformers name the cache argument `cache`; older ones `past_key_values`.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> GenerationOutput:
        out = GenerationOutput(token_ids=[[] for _ in prompts], logprobs=[[] for _ in prompts])
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.max_batch):
            chunk = order[start : start + self.max_batch]
            tokens, logprobs, calls = self._generate_chunk([prompts[i] for i in chunk], params, generator)
            for row, i in enumerate(chunk):
                out.token_ids[i] = tokens[row]
                out.logprobs[i] = logprobs[row]
            out.num_calls += calls
        return out

    def _generate_chunk(self, prompts, params: SamplingParams, generator):
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's next token sits at the same column
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = _cache_of(result), result.logits[:, -1]  # (B, V)
        next_pos = positions[:, -1] + 1
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        calls = 1
        for step in range(params.max_new_tokens):
            logits = logits.float()
            if params.constraint is not None:
                allowed = torch.stack([params.constraint.mask(tuple(t)) for t in tokens]).to(self.device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            if params.greedy:
                logp = logits.log_softmax(-1)
                next_tok = logp.argmax(-1)
            else:
                logits = top_p_filter(logits / params.temperature, params.top_p)
                logp = logits.log_softmax(-1)
                next_tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            chosen_logp = logp.gather(-1, next_tok[:, None]).squeeze(-1)
            next_tok = next_tok.masked_fill(finished, self.pad_id)
            for b, (tok, lp, done) in enumerate(zip(next_tok.tolist(), chosen_logp.tolist(), finished.tolist())):
                if not done:
                    tokens[b].append(tok)
                    logprobs[b].append(lp)
            finished |= next_tok == params.stop_token_id
            if params.constraint is not None and self._only_stop_left(tokens, finished, params):
                # Every live row may only stop now: append the stop token without a forward pass
                # (log-prob 0), so a one-token action costs one forward, not two.
                for b, done in enumerate(finished.tolist()):
                    if not done and len(tokens[b]) < params.max_new_tokens:
                        tokens[b].append(params.stop_token_id)
                        logprobs[b].append(0.0)
                break
            if bool(finished.all()) or step == params.max_new_tokens - 1:
                break  # no forward after the last token: its logits would never be used
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            result = self.model(
                input_ids=next_tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                use_cache=True, **{self._cache_arg: cache},
            )
            cache, logits = _cache_of(result), result.logits[:, -1]
            next_pos = next_pos + 1
            calls += 1
        return tokens, logprobs, calls

    @staticmethod
    def _only_stop_left(tokens: list[list[int]], finished: Tensor, params: SamplingParams) -> bool:
        live = [t for t, done in zip(tokens, finished.tolist()) if not done]
        return bool(live) and all(params.constraint.forced_token(tuple(t)) == params.stop_token_id for t in live)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"engine has no parameter named {name!r}")
            self._params[name].copy_(tensor)

    def named_parameters(self):
        return self.model.named_parameters()

    def sleep(self) -> None:
        """Nothing to release: the engine shares the process and device with training."""

    def wake(self) -> None:
        pass
