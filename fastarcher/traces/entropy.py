"""EntropyTracer: per-token policy entropy of the actor's responses, per-step statistics and artifacts.

    tracer = EntropyTracer(cfg.trace.entropy, run_dir, rank=rank, world_size=world_size)
    metrics = tracer.record(step, token_entropy, response_mask, token_ids, texts=texts, decode=tokenizer.decode)

`token_entropy` (B, T) is the entropy (nats) of the distribution that produced token_ids[b, t],
aligned with token_ids like the log-probs of `fastarcher.logprobs.token_logprobs_and_entropy`
(value at the target index t). Statistics (mean, quantiles, share above `high_entropy_threshold`)
use every response token of every rank; per-token arrays are stored for the first
`max_responses_per_step` responses of each rank. Several calls in one step (micro-batches) add up:
the step file and statistics are rewritten with all rows so far. `record` is a collective on due
steps when torch.distributed runs several processes.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .artifacts import TraceWriter
from .comm import TraceComm
from .config import EntropyTraceConfig
from .selection import check_batch_inputs, per_response_value, select_rows, token_layout, token_text_spans

__all__ = ["EntropyTracer", "entropy_statistics"]


def entropy_statistics(values: np.ndarray, quantiles: Sequence[float], threshold: float) -> dict[str, float]:
    """Mean, quantiles (numpy 'linear' interpolation) and share of values > threshold; NaN when empty."""
    values = np.asarray(values, dtype=np.float64)
    stats = {"entropy_mean": float(values.mean()) if values.size else float("nan")}
    for q in quantiles:
        stats[f"entropy_q{q * 100:g}"] = float(np.quantile(values, q)) if values.size else float("nan")
    stats["high_entropy_share"] = float((values > threshold).mean()) if values.size else float("nan")
    return stats


class EntropyTracer:
    """Entropy trace (module docstring). Disabled: `record` returns {} at once."""

    def __init__(self, cfg: EntropyTraceConfig, run_dir: str | Path, *, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.root = Path(run_dir) / "entropy_trace"
        self._step: int | None = None
        self._reset(None)
        if not cfg.enabled:
            return
        self.comm = TraceComm(rank, world_size, "EntropyTracer")
        self.writer = TraceWriter(self.root, "entropy_trace", asdict(cfg)) if self.comm.is_main else None

    def _reset(self, step: int | None) -> None:
        self._step = step
        self._all: list[np.ndarray] = []  # rank 0: response-token entropies of every rank
        self._stored: list[dict] = []  # rank 0: stored responses of every rank
        self._n_rows = 0  # this rank: rows passed this step
        self._local_stored = 0  # this rank: responses stored this step

    def is_due(self, step: int) -> bool:
        return self.cfg.enabled and step % self.cfg.every_n_steps == 0

    def record(self, step: int, token_entropy: torch.Tensor, response_mask: torch.Tensor, token_ids: torch.Tensor, *,
               texts: Sequence[str] | None = None, decode: Callable[[list[int]], str] | None = None, group_ids=None,
               rewards=None, advantages=None) -> dict[str, float]:
        """Add one batch (B, T) of response-token entropies for `step`; write the step; return its metrics
        (`trace/entropy_*`, the same on every rank)."""
        if not self.is_due(step):
            return {}
        check_batch_inputs("EntropyTracer.record", response_mask, token_ids, group_ids, rewards, advantages,
                           token_values=token_entropy)
        if texts is not None and len(texts) != response_mask.shape[0]:
            raise ValueError(f"EntropyTracer.record: texts has {len(texts)} entries for a batch of "
                             f"{response_mask.shape[0]}")
        if self._step != step:
            self._reset(step)
        payload = self._local_payload(token_entropy, response_mask, token_ids, texts, decode, group_ids, rewards,
                                      advantages)
        gathered = self.comm.gather(payload)
        metrics: dict[str, float] = {}
        if self.comm.is_main:
            for rank, part in enumerate(gathered):
                self._all.append(part["all"])
                self._stored.extend(dict(r, rank=rank) for r in part["stored"])
            metrics = self._write(step)
        return self.comm.broadcast(metrics)

    def _local_payload(self, token_entropy, response_mask, token_ids, texts, decode, group_ids, rewards,
                       advantages) -> dict:
        mask = response_mask.detach().to("cpu").bool().clone()  # (B, T); a CPU sync on traced steps only
        mask[:, 0] = False  # token 0 has no predicting position (same rule as the influence trace)
        entropy = token_entropy.detach().to("cpu", torch.float64)  # (B, T)
        ids = token_ids.detach().to("cpu")
        batch = mask.shape[0]
        row_offset = self._n_rows
        self._n_rows += batch
        groups = (torch.as_tensor(group_ids).to("cpu").long().tolist() if group_ids is not None
                  else list(range(row_offset, row_offset + batch)))
        rows = select_rows(mask.any(1).tolist(), groups, max_groups=0, max_rows=self.cfg.max_responses_per_step,
                           seen_groups=[], seen_rows=self._local_stored)
        self._local_stored += len(rows)
        layout = token_layout(mask, rows, self.cfg.max_tokens_per_response)
        nan = torch.full((batch,), float("nan"), dtype=torch.float64)
        reward = per_response_value(rewards, mask) if rewards is not None else nan
        advantage = per_response_value(advantages, mask) if advantages is not None else nan
        stored = []
        for i, row in enumerate(rows):
            sl = slice(layout.response_offsets[i], layout.response_offsets[i + 1])
            positions = layout.token_positions[sl]
            tok = ids[row, positions].numpy()
            text, spans, pieces = token_text_spans(tok, decode, texts[row] if texts is not None else None)
            stored.append({
                "row": row_offset + row, "group_id": groups[row], "reward": float(reward[row]),
                "advantage": float(advantage[row]), "n_response_tokens": int(layout.n_response_tokens[i]),
                "token_ids": tok.astype(np.int64), "token_positions": positions.numpy().astype(np.int32),
                "token_entropy": entropy[row, positions].numpy().astype(np.float32),
                "response_text": text, "text_offsets": spans, "token_text": pieces,
            })
        return {"all": entropy[mask].numpy(), "stored": stored}

    def _write(self, step: int) -> dict[str, float]:
        values = np.concatenate(self._all) if self._all else np.zeros(0)
        stats = entropy_statistics(values, self.cfg.quantiles, self.cfg.high_entropy_threshold)
        stored = self._stored
        counts = [len(r["token_ids"]) for r in stored]
        cat = lambda key, dtype: (np.concatenate([r[key] for r in stored]).astype(dtype) if stored  # noqa: E731
                                  else np.zeros(0, dtype))
        arrays = {
            "step": np.asarray(step, dtype=np.int64),
            "response_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "token_ids": cat("token_ids", np.int64),
            "token_positions": cat("token_positions", np.int32),
            "token_entropy": cat("token_entropy", np.float32),
            "token_text": np.asarray([p for r in stored for p in r["token_text"]], dtype=str),
            "text_offsets": (np.concatenate([r["text_offsets"] for r in stored]) if stored
                             else np.zeros((0, 2))).astype(np.int32).reshape(-1, 2),
            "response_text": np.asarray([r["response_text"] for r in stored], dtype=str),
            "rewards": np.asarray([r["reward"] for r in stored], dtype=np.float32),
            "advantages": np.asarray([r["advantage"] for r in stored], dtype=np.float32),
            "group_ids": np.asarray([r["group_id"] for r in stored], dtype=np.int64),
            "rank": np.asarray([r["rank"] for r in stored], dtype=np.int32),
            "row": np.asarray([r["row"] for r in stored], dtype=np.int32),
            "n_response_tokens": np.asarray([r["n_response_tokens"] for r in stored], dtype=np.int32),
            "quantile_levels": np.asarray(self.cfg.quantiles, dtype=np.float64),
            "quantile_values": np.asarray([stats[f"entropy_q{q * 100:g}"] for q in self.cfg.quantiles],
                                          dtype=np.float64),
        }
        record = {"n_tokens": int(values.size), "n_stored_responses": len(stored),
                  "high_entropy_threshold": self.cfg.high_entropy_threshold, **stats}
        self.writer.write_step(step, arrays, record)
        return {f"trace/{k}": v for k, v in stats.items()} | {"trace/entropy_tokens": float(values.size)}
