"""Batched KV-cache sampling with a transformers causal LM (the CPU default engine).

All live prompts are left-padded into one batch (in chunks of `max_batch`, sorted by length to keep
padding small), prefilled once, then decoded token by token with the KV cache; rows stop at the stop
token. The engine owns an unsharded copy of the policy that the trainer refreshes with
`update_weights` (the same path a remote engine such as SGLang uses).

Multi-turn rollouts open a `DialogueCache`: each episode keeps the keys/values of the tokens it has
already fed, and the next turn feeds only what its dialogue gained since (the last action's stop
token and the observation) instead of re-prefilling the whole dialogue. A row whose prompt no longer
extends its cached tokens (a context window that slid) is prefilled from scratch. Rows point into the
batch cache their last call left (`KVBlock`); when a turn continues that whole batch, the cache is fed
again as is, so a turn copies nothing beyond transformers' own append.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from fastarcher.kv_cache import cache_arg, cache_of, plain_layers, repeated_rows, select_rows
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


@dataclass
class KVBlock:
    """The batch cache one engine call left behind: a transformers cache of plain layers, (B, H, W, D)
    each, and the (B, W) mask of the columns that hold real tokens."""

    cache: object
    mask: Tensor


@dataclass
class RowCache:
    """One episode's cached prefix: its token ids, whose keys/values are row `row` of `block`."""

    tokens: list[int]
    block: KVBlock
    row: int


def _shared_block(prefixes: list[RowCache | None] | None) -> KVBlock | None:
    """The block every row's prefix lives in, when there is exactly one (None otherwise)."""
    if not prefixes or not all(prefixes):
        return None
    block = prefixes[0].block
    return block if all(p.block is block for p in prefixes) else None


def _packed_rows(block: KVBlock, rows: list[int]) -> tuple[list[tuple[Tensor, Tensor]], list[int]]:
    """Rows of a block with their real columns packed to the right: per layer (n, H, W', D) keys and
    values, W' the most real columns of any of them (one gather per tensor), and each row's count."""
    index = torch.tensor(rows, device=block.mask.device)
    real = block.mask.index_select(0, index).bool()
    width = real.shape[1]
    counts = real.sum(1).tolist()
    packed_width = max(counts)
    # Sort key: padding first, then real columns in order; the last `count` columns are the row's.
    key = real * (width + torch.arange(width, device=real.device))
    cols = key.argsort(dim=1, stable=True)[:, width - packed_width :]  # (n, W')
    out = []
    for layer in block.cache.layers:
        gather = cols[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        out.append((layer.keys.index_select(0, index).gather(2, gather),
                    layer.values.index_select(0, index).gather(2, gather)))
    return out, counts


def _prefix_cache(prefixes: list[RowCache | None], device: torch.device):
    """Every row's cached prefix in one batch cache, right-aligned → (cache, (B, W) mask), rows in the
    order given (None: nothing cached, all columns masked).

    When the rows are exactly one earlier call's batch, in its order, that call's cache is returned as
    is (no copy: the usual multi-turn case); a subset of one block is selected by row (episodes ended);
    anything else packs each row's real columns into a fresh buffer."""
    from transformers import DynamicCache

    block = _shared_block(prefixes)
    if block is not None:
        rows = [p.row for p in prefixes]
        if rows == list(range(block.mask.shape[0])):
            return block.cache, block.mask
        index = torch.tensor(rows, device=block.mask.device)
        mask = block.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0  # columns only dropped rows used are cut off
        return select_rows(block.cache, index, first), mask[:, first:]
    width = max(len(p.tokens) if p else 0 for p in prefixes)
    template = next(p for p in prefixes if p).block.cache.layers
    bufs = [(t.keys.new_zeros(len(prefixes), t.keys.shape[1], width, t.keys.shape[3]),
             t.values.new_zeros(len(prefixes), t.values.shape[1], width, t.values.shape[3])) for t in template]
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=device)
    groups: dict[int, list[int]] = {}  # id(block) → batch rows whose prefix lives there
    for b, p in enumerate(prefixes):
        if p:
            groups.setdefault(id(p.block), []).append(b)
    for dest in groups.values():
        packed, counts = _packed_rows(prefixes[dest[0]].block, [prefixes[b].row for b in dest])
        index = torch.tensor(dest, device=device)
        span = packed[0][0].shape[2]
        for (keys, values), (pk, pv) in zip(bufs, packed):
            keys[index, :, width - span :] = pk
            values[index, :, width - span :] = pv
        for b, n in zip(dest, counts):
            mask[b, width - n :] = 1  # a shorter row's packed columns left of its own stay masked
    return DynamicCache(ddp_cache_data=bufs), mask


class HFEngine:
    def __init__(self, model: nn.Module, *, pad_id: int, device: torch.device, max_batch: int = 256):
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self._params = dict(self.model.named_parameters())
        # The sync casts to this before bucketing (half the bytes when the copy is bf16 under mixed precision).
        dtypes = {p.dtype for p in self._params.values() if p.is_floating_point()}
        self.weight_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.version = 0  # completed weight syncs, stamped on every GenerationOutput
        self.weights_valid = True  # a copy of the policy from the start
        self.timings: dict[str, float] = {}  # nothing is released or resumed
        # Newer transformers name the cache argument `cache`; older ones `past_key_values`.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_arg = cache_arg(self.model)
        # Only the last position's logits are read: skip the LM head elsewhere when the model allows.
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> GenerationOutput:
        return self._generate(prompts, params, generator, None, None)[0]

    def open_dialogues(self, window: int = 0) -> DialogueCache:
        """A per-episode KV cache for one multi-turn rollout (weights must not change while it lives);
        `window`: the caller's context window in tokens (0: none)."""
        return DialogueCache(self, window)

    @torch.no_grad()
    def _generate(self, prompts, params: SamplingParams, generator, prefixes: list[RowCache | None] | None,
                  store: list[bool] | None):
        out = GenerationOutput(token_ids=[[] for _ in prompts], logprobs=[[] for _ in prompts],
                               policy_version=self.version)
        caches: list[RowCache | None] = [None] * len(prompts)
        # Rows run sorted by length in chunks of max_batch (little padding), and multinomial draws go to
        # rows in that order. When every row continues one earlier batch, the rows keep that batch's order
        # instead (its cache is used without a copy) and draw in the sorted order: the same tokens.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts) <= self.max_batch and _shared_block(prefixes) is not None:
            chunk = sorted(range(len(prompts)), key=lambda i: prefixes[i].row)
            position = {i: r for r, i in enumerate(chunk)}
            chunks = [(chunk, [position[i] for i in order])]
        else:
            chunks = [(order[s : s + self.max_batch], None) for s in range(0, len(order), self.max_batch)]
        for chunk, draw_order in chunks:
            tokens, logprobs, calls, rows = self._generate_chunk(
                [prompts[i] for i in chunk], params, generator,
                None if prefixes is None else [prefixes[i] for i in chunk],
                None if store is None else [store[i] for i in chunk],
                draw_order,
            )
            for row, i in enumerate(chunk):
                out.token_ids[i] = tokens[row]
                out.logprobs[i] = logprobs[row]
                if rows is not None:
                    caches[i] = rows[row]
            out.num_calls += calls
        return out, caches

    def _generate_chunk(self, prompts, params: SamplingParams, generator, prefixes, store,
                        draw_order: list[int] | None = None):
        """prefixes None: plain generation. A list (one entry per prompt, None for no cached prefix):
        feed only what each prompt adds to its prefix; return the cache after the turn of each row whose
        `store` is true (None for the others). draw_order: the rows in the order sampling draws for them
        (None: as they are)."""
        batch = len(prompts)
        cached = [len(p.tokens) if p else 0 for p in prefixes] if prefixes is not None else [0] * batch
        new = [p[n:] for p, n in zip(prompts, cached)]
        if any(not n for n in new):
            raise ValueError("every prompt must add at least one token to its cached prefix")
        width = max(len(p) for p in new)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros(batch, width, dtype=torch.long)
        for b, p in enumerate(new):  # left padding: every row's next token sits at the same column
            ids[b, width - len(p) :] = torch.tensor(p)
            new_mask[b, width - len(p) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        positions = (new_mask.cumsum(-1) - 1).clamp(min=0)
        if any(cached):
            cache, mask = _prefix_cache(prefixes, self.device)
            mask = torch.cat([mask, new_mask], dim=1)
            positions = positions + torch.tensor(cached, device=self.device)[:, None]
            extra = {self._cache_arg: cache}
        else:
            mask, extra = new_mask, {}
        cache = logits = None
        if params.share_prompts and not extra:
            cache, logits = self._shared_prefill(new, ids, mask, positions)
        if cache is None:
            result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **extra, **self._last_logits)
            cache, logits = cache_of(result), result.logits[:, -1]  # (B, V)
        next_pos = positions[:, -1] + 1
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        fed = [0] * batch  # generated tokens whose keys/values are in the cache
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
                next_tok = self._draw(logp.exp(), generator, draw_order)
            chosen_logp = logp.gather(-1, next_tok[:, None]).squeeze(-1)
            live = ~finished
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
            # Rows that had already stopped feed a pad the rest of the batch never sees: mask it out.
            mask = torch.cat([mask, live[:, None].to(mask.dtype)], dim=1)
            for b, alive in enumerate(live.tolist()):
                fed[b] += alive
            result = self.model(
                input_ids=next_tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                use_cache=True, **{self._cache_arg: cache},
            )
            cache, logits = cache_of(result), result.logits[:, -1]
            next_pos = next_pos + 1
            calls += 1
        rows = None
        if store is not None and any(store) and plain_layers(cache):
            block = KVBlock(cache, mask)
            counts = mask.sum(1).tolist()
            rows = []
            for b, (p, t, n, keep) in enumerate(zip(prompts, tokens, fed, store)):
                if not keep:
                    rows.append(None)
                    continue
                if counts[b] != len(p) + n:
                    raise RuntimeError(f"KV cache row {b} holds {counts[b]} positions for {len(p) + n} tokens")
                rows.append(RowCache(p + t[:n], block, b))
        return tokens, logprobs, calls, rows

    def _shared_prefill(self, prompts: list[list[int]], ids: Tensor, mask: Tensor, positions: Tensor):
        """Prefill each distinct prompt once and give every row its prompt's keys/values and last logits
        (a group's episodes start from one prompt). (None, None) when fewer than half the rows repeat one."""
        shared = repeated_rows(prompts, ids.device)
        if shared is None:
            return None, None
        pick, rows = shared
        result = self.model(input_ids=ids[pick], attention_mask=mask[pick], position_ids=positions[pick],
                            use_cache=True, **self._last_logits)
        cache = cache_of(result)
        if not plain_layers(cache):
            return None, None
        return select_rows(cache, rows), result.logits[:, -1].index_select(0, rows)

    @staticmethod
    def _draw(probs: Tensor, generator, draw_order: list[int] | None) -> Tensor:
        """One multinomial draw per row of (B, V) probs, the generator's numbers going to rows in draw_order."""
        if draw_order is None or draw_order == list(range(len(draw_order))):
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        perm = torch.tensor(draw_order, device=probs.device)
        drawn = torch.multinomial(probs.index_select(0, perm), 1, generator=generator).squeeze(-1)
        return torch.empty_like(drawn).index_copy_(0, perm, drawn)

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

    def begin_weight_update(self) -> None:
        pass

    def end_weight_update(self) -> None:
        self.version += 1

    def named_parameters(self):
        return self.model.named_parameters()

    def sleep(self) -> None:
        """Nothing to release: the engine shares the process and device with training."""

    def release_cache(self) -> None:
        pass

    def wake(self) -> None:
        pass


class DialogueCache:
    """Keys/values of each live episode between turns of one rollout, keyed by the caller's episode id.

    `generate(keys, prompts, ...)` returns exactly what `engine.generate(prompts, ...)` would, while
    feeding each row only the tokens its prompt adds to what the row fed before. `keep_only` frees
    finished episodes. With a context window, a prompt that already fills it is not stored: its next
    prompt slides and cannot reuse it. Built for one rollout: weights pushed into the engine meanwhile
    would leave the cache stale.
    """

    def __init__(self, engine: HFEngine, window: int = 0):
        self.engine = engine
        self.window = window
        self._rows: dict[int, RowCache] = {}
        self.reused_tokens = 0
        """Prompt tokens served from the cache instead of being prefilled again (for logging and tests)."""

    def generate(
        self, keys: list[int], prompts: list[list[int]], params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput:
        if len(keys) != len(prompts) or len(set(keys)) != len(keys):
            raise ValueError("DialogueCache.generate needs one distinct key per prompt")
        prefixes = []
        for key, prompt in zip(keys, prompts):
            row = self._rows.get(key)
            # Reuse only a strict prefix: a prompt that does not extend the cached tokens (a context
            # window that slid) is prefilled from scratch.
            usable = row is not None and len(row.tokens) < len(prompt) and prompt[: len(row.tokens)] == row.tokens
            prefixes.append(row if usable else None)
            self.reused_tokens += len(row.tokens) if usable else 0
        store = [not self.window or len(p) < self.window for p in prompts]
        out, caches = self.engine._generate(prompts, params, generator, prefixes, store)
        for key, row in zip(keys, caches):
            if row is None:
                self._rows.pop(key, None)
            else:
                self._rows[key] = row
        return out

    def keep_only(self, keys: Iterable[int]) -> None:
        """Free every cached episode not in `keys` (those that ended)."""
        keep = set(keys)
        for key in [k for k in self._rows if k not in keep]:
            del self._rows[key]

    def __len__(self) -> int:
        return len(self._rows)
