"""Which responses and tokens a trace keeps, per-response summaries of (B, T) inputs, token texts.

Shared by the influence and entropy traces. Conventions (docs/traces.md, "Alignment"):
`token_ids` (B, T) is the full sequence fed to the model; `response_mask` (B, T) is 1 where
token_ids[b, t] is a response token whose log-prob enters the objective; per-token values
(entropy, influence) are attributed to that target index t. The model computes the distribution of
token t at position t - 1, so hooks record position t - 1 for target t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "TokenLayout",
    "check_batch_inputs",
    "select_rows",
    "token_layout",
    "per_response_value",
    "token_text_spans",
]


@dataclass
class TokenLayout:
    """Traced tokens of the selected rows, stored response after response (CSR layout)."""

    rows: list[int]
    """Local batch row of each selected response."""
    token_rows: torch.Tensor
    """(N,) local row of each traced token."""
    token_positions: torch.Tensor
    """(N,) target index t of each traced token (its distribution comes from position t - 1)."""
    response_offsets: np.ndarray
    """(R + 1,) tokens of response r are token_rows[offsets[r]:offsets[r + 1]]."""
    n_response_tokens: np.ndarray
    """(R,) response tokens of each selected row before the per-response cap."""


def check_batch_inputs(where: str, response_mask: torch.Tensor, token_ids: torch.Tensor,
                       group_ids=None, rewards=None, advantages=None, token_values=None) -> None:
    """Raise ValueError naming the argument whose shape does not fit response_mask (B, T)."""
    if response_mask.dim() != 2:
        raise ValueError(f"{where}: response_mask must be (B, T); got shape {tuple(response_mask.shape)}")
    shape = tuple(response_mask.shape)
    batch = shape[0]
    if tuple(token_ids.shape) != shape:
        raise ValueError(f"{where}: token_ids shape {tuple(token_ids.shape)} must equal response_mask shape {shape}")
    if token_values is not None and tuple(token_values.shape) != shape:
        raise ValueError(f"{where}: per-token values shape {tuple(token_values.shape)} must equal response_mask "
                         f"shape {shape}")
    for name, value in (("group_ids", group_ids), ("rewards", rewards)):
        if value is not None and tuple(torch.as_tensor(value).shape) != (batch,):
            raise ValueError(f"{where}: {name} shape {tuple(torch.as_tensor(value).shape)} must be ({batch},)")
    if advantages is not None and tuple(torch.as_tensor(advantages).shape) not in ((batch,), shape):
        raise ValueError(f"{where}: advantages shape {tuple(torch.as_tensor(advantages).shape)} must be ({batch},) "
                         f"or {shape}")


def select_rows(has_tokens: Sequence[bool], group_ids: Sequence[int], *, max_groups: int, max_rows: int,
                seen_groups: list[int], seen_rows: int) -> list[int]:
    """Rows to trace, in batch order: rows with response tokens whose group is among the first
    `max_groups` distinct groups of the step (0 = no cap; `seen_groups` carries them across calls and is
    updated), and at most `max_rows` rows per step (0 = no cap; `seen_rows` were taken already)."""
    rows = []
    for row, (ok, group) in enumerate(zip(has_tokens, group_ids)):
        if not ok:
            continue
        if max_rows and seen_rows + len(rows) >= max_rows:
            break
        if group not in seen_groups:
            if max_groups and len(seen_groups) >= max_groups:
                continue
            seen_groups.append(group)
        rows.append(row)
    return rows


def token_layout(response_mask: torch.Tensor, rows: list[int], max_tokens: int) -> TokenLayout:
    """Traced tokens of `rows`: the first `max_tokens` response tokens of each (0 = all). CPU only."""
    token_rows, token_positions, offsets, totals = [], [], [0], []
    for row in rows:
        positions = torch.nonzero(response_mask[row], as_tuple=False).flatten()
        totals.append(int(positions.numel()))
        if max_tokens:
            positions = positions[:max_tokens]
        token_positions.append(positions)
        token_rows.append(torch.full_like(positions, row))
        offsets.append(offsets[-1] + int(positions.numel()))
    empty = torch.zeros(0, dtype=torch.long)
    return TokenLayout(
        rows=list(rows),
        token_rows=torch.cat(token_rows) if token_rows else empty,
        token_positions=torch.cat(token_positions) if token_positions else empty,
        response_offsets=np.asarray(offsets, dtype=np.int64),
        n_response_tokens=np.asarray(totals, dtype=np.int64),
    )


def per_response_value(values, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) value per row: as given when (B,), or the mean over response tokens when (B, T). float64."""
    values = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if values.dim() == 1:
        return values
    mask = response_mask.to(torch.float64)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def token_text_spans(token_ids: Sequence[int], decode: Callable[[list[int]], str] | None,
                     text: str | None) -> tuple[str, np.ndarray, list[str]]:
    """(response text, (n, 2) char offsets, per-token display strings) of a traced response.

    With `decode` (e.g. `tokenizer.decode`), token k spans the characters that decode(ids[:k+1]) adds
    to decode(ids[:k]) (a token that ends inside a multi-byte character gets an empty span); the
    offsets index `text` when decode(ids) is a prefix of it, else the decoded text itself. Without
    `decode`, offsets are -1 and tokens display as `<id>`.
    """
    ids = [int(i) for i in token_ids]
    if decode is None:
        return text or "", np.full((len(ids), 2), -1, dtype=np.int32), [f"<{i}>" for i in ids]
    decoded = decode(ids)
    base = text if (text is not None and text.startswith(decoded)) else decoded
    offsets = np.zeros((len(ids), 2), dtype=np.int32)
    start = 0
    for k in range(len(ids)):
        end = min(max(start, len(decode(ids[: k + 1]))), len(decoded))
        offsets[k] = (start, end)
        start = end
    pieces = [decoded[a:b] for a, b in offsets]
    return base, offsets, pieces
