"""InfluenceTracer: projected per-token gradient factors from the policy backward, scored and written.

Use from the actor step (docs/traces.md has the full API and semantics):

    tracer = InfluenceTracer(cfg.trace.influence, model, run_dir, rank=rank, world_size=world_size)
    tracer.trace_objective(step, lambda: token_logprobs(model, batch), response_mask=m, token_ids=ids,
                           group_ids=g, rewards=r, advantages=a)   # no-op unless a log_prob_* objective
    with tracer.capture(step, response_mask=m, token_ids=ids, group_ids=g, rewards=r, advantages=a):
        loss = actor_loss(model(ids), ...)                          # forward INSIDE the context
        loss.backward()                                             # the real training backward
    metrics = tracer.finish_step(step, texts=texts, decode=tokenizer.decode)

How the factors are caught: a forward hook on each selected nn.Linear projects its input
activations of the selected rows, v = x P_in^T (R, T, k_in), and registers a hook on the output
tensor; in backward that hook receives dy and projects u = dy P_out^T (R, T, k_out). Hooks live on
the Linear itself, so FSDP2 sharding (which unshards parameters around the block's forward and
backward) does not change what they see: each rank's own micro-batch activations and gradients.
A forward that runs again inside backward (non-reentrant activation checkpointing recomputes) is
ignored: the tensor hook of the original output still fires. Reentrant checkpointing
(use_reentrant=True) runs the first forward without grad and is not supported.

Per traced token (target t, read at position t - 1) the factor is (u_{t-1}, v_{t-1}); every other
position of the row (prompt, padding, tokens past max_tokens_per_response) is summed into the
response's context block sum_p u_p v_p^T (k_out, k_in), so token factors + context = the projected
gradient of that response's objective share, exactly, for every module.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .artifacts import TraceWriter
from .comm import TraceComm
from .config import InfluenceTraceConfig
from .projection import ModuleProjection, Projector, projection_sizes, select_linear_modules
from .scores import Factors, score_step
from .selection import check_batch_inputs, per_response_value, select_rows, token_layout, token_text_spans

__all__ = ["InfluenceTracer"]

log = logging.getLogger(__name__)

_META_KEYS = ("row", "group_id", "reward", "advantage", "weight", "n_response_tokens")


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (e.g. a checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


class _Record:
    """One module's factors for one capture: v of every selected row, then u and context from backward."""

    __slots__ = ("index", "offset", "v_all", "u_tok", "v_tok", "context")

    def __init__(self, index: int, offset: int, v_all: torch.Tensor):
        self.index = index
        self.offset = offset  # the module saw positions offset..T-1 (HF logits_to_keep on lm_head)
        self.v_all = v_all  # (R, T - offset, k_in)
        self.u_tok = self.v_tok = self.context = None


class _Capture:
    """Index tensors of one capture() (one micro-batch), cached per device, dtype and position offset."""

    def __init__(self, layout, batch_shape: tuple[int, int]):
        self.layout = layout
        self.shape = batch_shape
        self.all_rows = len(layout.rows) == batch_shape[0]
        local = {row: i for i, row in enumerate(layout.rows)}
        self.rows = torch.tensor(layout.rows, dtype=torch.long)
        self.token_local = torch.tensor([local[int(r)] for r in layout.token_rows], dtype=torch.long)
        self.token_hook_pos = layout.token_positions - 1  # position t - 1 produces token t
        self.context_weight = torch.ones(len(layout.rows), batch_shape[1], dtype=torch.float64)
        self.context_weight[self.token_local, self.token_hook_pos] = 0.0  # (R, T): 1 where untraced
        self.records: dict[int, _Record] = {}
        self.closed = False
        self._cache: dict = {}

    def on(self, device: torch.device, dtype: torch.dtype, offset: int = 0):
        """(rows, token_local, token_pos, token_valid, context_weight) for a module that saw the last
        T - offset positions: token_pos is shifted by offset, and tokens before it are not valid."""
        key = (device, dtype, offset)
        if key not in self._cache:
            pos = self.token_hook_pos - offset
            self._cache[key] = (self.rows.to(device), self.token_local.to(device), pos.clamp(min=0).to(device),
                                (pos >= 0).to(device=device, dtype=dtype)[:, None],
                                self.context_weight[:, offset:].to(device=device, dtype=dtype))
        return self._cache[key]


class _StepBuffer:
    """Everything one rank captured during one step, across capture() calls (micro-batches)."""

    def __init__(self, step: int, n_modules: int):
        self.step = step
        self.seen_groups: list[int] = []
        self.n_rows = 0
        self.u = [[] for _ in range(n_modules)]
        self.v = [[] for _ in range(n_modules)]
        self.context = [[] for _ in range(n_modules)]
        self.counts: list[np.ndarray] = []
        self.token_ids: list[np.ndarray] = []
        self.token_positions: list[np.ndarray] = []
        self.meta: dict[str, list] = {k: [] for k in _META_KEYS}
        self.timing: dict[str, float] = defaultdict(float)
        self.missing: set[str] = set()

    def payload(self, texts: Sequence[str] | None) -> dict:
        if texts is not None and len(texts) != self.n_rows:
            raise ValueError(f"InfluenceTracer.finish_step: texts has {len(texts)} entries but {self.n_rows} rows "
                             f"were captured at step {self.step}")
        rows = [int(r) for r in self.meta["row"]]
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
        return {
            "u": [cat(p) for p in self.u],
            "v": [cat(p) for p in self.v],
            "context": [cat(p) for p in self.context],
            "counts": cat(self.counts).astype(np.int64),
            "token_ids": cat(self.token_ids).astype(np.int64),
            "token_positions": cat(self.token_positions).astype(np.int64),
            "meta": {k: np.asarray(v) for k, v in self.meta.items()},
            "texts": [texts[r] for r in rows] if texts is not None else None,
            "timing": dict(self.timing),
            "missing": sorted(self.missing),
        }


class InfluenceTracer:
    """Gradient-projection influence trace of the actor step (module docstring; docs/traces.md).

    Disabled (cfg.enabled False): registers nothing and every method is a cheap no-op.
    """

    def __init__(self, cfg: InfluenceTraceConfig, model: nn.Module, run_dir: str | Path, *, rank: int = 0,
                 world_size: int = 1):
        self.cfg = cfg
        self.model = model
        self.root = Path(run_dir) / "influence_trace"
        self._handles: list = []
        self._state: _Capture | None = None
        self._buffer: _StepBuffer | None = None
        self.projections: list[ModuleProjection] = []
        if not cfg.enabled:
            return
        if cfg.force_gpu_compute and not torch.cuda.is_available():
            raise ValueError("trace.influence.force_gpu_compute (True) needs a CUDA device, and none is available")
        self.comm = TraceComm(rank, world_size, "InfluenceTracer")
        selected = select_linear_modules(model, cfg.module_name_filter, cfg.max_modules)
        if not selected:
            raise ValueError(f"trace.influence.module_name_filter ({cfg.module_name_filter!r}) matches no nn.Linear "
                             "module of the model")
        sizes = projection_sizes([(m.in_features, m.out_features) for _, m in selected],
                                 dim_factor=cfg.projection_dim_factor, max_vector_sum=cfg.max_proj_vector_sum,
                                 max_hessian_dim=cfg.max_hessian_dim)
        self.projections = [ModuleProjection(name, m.in_features, m.out_features, k_in, k_out)
                            for (name, m), (k_in, k_out) in zip(selected, sizes)]
        self.projector = Projector(self.projections, cfg.seed)
        for index, (_, module) in enumerate(selected):
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, index)))
        self.writer = None
        if self.comm.is_main:
            self.writer = TraceWriter(self.root, "influence_trace", asdict(cfg), {
                "modules": [asdict(p) for p in self.projections],
                "projected_dim": self.dim,
                "world_size": world_size,
            })

    # ------------------------------------------------------------------ public API
    @property
    def dim(self) -> int:
        """D, the projected gradient dimension (sum over modules of k_in * k_out)."""
        return sum(p.dim for p in self.projections)

    def is_due(self, step: int) -> bool:
        return self.cfg.enabled and step % self.cfg.every_n_steps == 0

    @contextlib.contextmanager
    def capture(self, step: int, *, response_mask: torch.Tensor, token_ids: torch.Tensor, group_ids=None,
                rewards=None, advantages=None) -> Iterator[None]:
        """Capture factors of the `training_loss` objective: run the model forward AND loss.backward()
        inside. A no-op on steps that are not due or when output_function is not training_loss."""
        if not (self.is_due(step) and self.cfg.output_function == "training_loss"):
            yield
            return
        with self._capturing(step, response_mask, token_ids, group_ids, rewards, advantages):
            yield

    def trace_objective(self, step: int, forward_fn: Callable[[], torch.Tensor], *, response_mask: torch.Tensor,
                        token_ids: torch.Tensor, group_ids=None, rewards=None, advantages=None) -> bool:
        """For output_function log_prob_advantage / log_prob_reward: run forward_fn() (-> (B, T) log pi of
        token_ids[b, t] at index t), then a backward of sum_bt mask * A * log pi (or r * log pi), with hooks
        capturing. Every parameter's .grad is set aside before and put back after, and the RNG state is
        restored, so the training step that follows is unchanged. Returns True when it ran."""
        if not self.is_due(step) or self.cfg.output_function == "training_loss":
            return False
        started = time.perf_counter()
        use_advantage = self.cfg.output_function == "log_prob_advantage"
        weights = advantages if use_advantage else rewards
        if weights is None:
            raise ValueError(f"trace.influence.output_function ({self.cfg.output_function!r}) needs "
                             f"{'advantages' if use_advantage else 'rewards'}= in trace_objective()")
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda_devices = [torch.cuda.current_device()] if cuda_ready else []
        try:
            with torch.random.fork_rng(devices=cuda_devices), \
                    self._capturing(step, response_mask, token_ids, group_ids, rewards, advantages):
                if self._state is None:  # no row selected (prompt cap reached): skip the extra pass
                    return True
                logp = forward_fn()  # (B, T)
                if tuple(logp.shape) != tuple(response_mask.shape):
                    raise ValueError(f"trace_objective: forward_fn returned shape {tuple(logp.shape)}; expected "
                                     f"(B, T) = {tuple(response_mask.shape)}")
                w = torch.as_tensor(weights, device=logp.device).to(logp.dtype)
                w = w[:, None] if w.dim() == 1 else w  # (B, 1) or (B, T)
                objective = (w * logp * response_mask.to(device=logp.device, dtype=logp.dtype)).sum()
                objective.backward()
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad
        if self._buffer is not None and self.cfg.profile_timing:
            self._buffer.timing["objective_s"] += time.perf_counter() - started
        return True

    def finish_step(self, step: int, *, texts: Sequence[str] | None = None,
                    decode: Callable[[list[int]], str] | None = None) -> dict[str, float]:
        """Gather every rank's factors on rank 0, score, write the step's artifacts; returns the metrics
        (the same dict on every rank). A collective on due steps: every rank must call it. `texts`: the
        response text of every row passed to capture()/trace_objective() this step, in order; `decode`:
        token ids -> text (e.g. tokenizer.decode), used on rank 0 for per-token text spans."""
        if not self.is_due(step):
            return {}
        buffer = self._buffer
        if buffer is None or buffer.step != step:
            buffer = _StepBuffer(step, len(self.projections))
        self._buffer = None
        started = time.perf_counter()
        payload = buffer.payload(texts)
        gathered = self.comm.gather(payload)
        gather_s = time.perf_counter() - started
        metrics: dict[str, float] = {}
        if self.comm.is_main:
            metrics = self._score_and_write(step, gathered, decode, gather_s)
        return self.comm.broadcast(metrics)

    def held_bytes(self) -> int:
        """Bytes the tracer holds now: projection matrices, the open capture's tensors, the step's buffers."""
        if not self.cfg.enabled:
            return 0
        total = sum(t.numel() * t.element_size() for t in self.projector._cache.values())
        if self._state is not None:
            for record in self._state.records.values():
                for t in (record.v_all, record.u_tok, record.v_tok, record.context):
                    total += t.numel() * t.element_size() if t is not None else 0
        if self._buffer is not None:
            for parts in (self._buffer.u, self._buffer.v, self._buffer.context):
                total += sum(a.nbytes for chunks in parts for a in chunks)
        return total

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ capture internals
    def _sync(self) -> None:
        if self.cfg.profile_timing and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _step_buffer(self, step: int) -> _StepBuffer:
        if self._buffer is None or self._buffer.step != step:
            if self._buffer is not None and self._buffer.n_rows:
                log.warning("influence trace: step %d was captured but finish_step() was not called; dropped",
                            self._buffer.step)
            self._buffer = _StepBuffer(step, len(self.projections))
        return self._buffer

    @contextlib.contextmanager
    def _capturing(self, step, response_mask, token_ids, group_ids, rewards, advantages) -> Iterator[None]:
        if self._state is not None:
            raise RuntimeError("InfluenceTracer: capture() / trace_objective() cannot be nested")
        check_batch_inputs("InfluenceTracer.capture", response_mask, token_ids, group_ids, rewards, advantages)
        signal_name = self.cfg.accept_signal
        if (advantages if signal_name == "advantage" else rewards) is None:
            needed = "advantages" if signal_name == "advantage" else "rewards"
            raise ValueError(f"trace.influence.accept_signal ({signal_name!r}) needs {needed}= in "
                             "capture()/trace_objective()")
        buffer = self._step_buffer(step)
        mask = response_mask.detach().to("cpu").bool().clone()  # (B, T); a CPU sync on traced steps only
        mask[:, 0] = False  # token 0 has no position that predicts it
        batch, length = mask.shape
        groups = (torch.as_tensor(group_ids).detach().to("cpu").long().tolist() if group_ids is not None
                  else list(range(buffer.n_rows, buffer.n_rows + batch)))
        rows = select_rows(mask.any(1).tolist(), groups, max_groups=self.cfg.max_prompts_per_step, max_rows=0,
                           seen_groups=buffer.seen_groups, seen_rows=0)
        layout = token_layout(mask, rows, self.cfg.max_tokens_per_response)
        state = _Capture(layout, (batch, length)) if rows else None
        row_offset = buffer.n_rows
        buffer.n_rows += batch
        self._state = state
        try:
            yield
        finally:
            self._state = None
            if state is not None:
                state.closed = True
        if state is None:
            return
        nan = torch.full((batch,), math.nan, dtype=torch.float64)
        reward = per_response_value(rewards, mask) if rewards is not None else nan
        advantage = per_response_value(advantages, mask) if advantages is not None else nan
        use_reward = self.cfg.output_function == "log_prob_reward" or advantages is None
        weight = reward if use_reward else advantage
        weight = torch.where(torch.isnan(weight), torch.ones_like(weight), weight)
        self._store(buffer, state, {
            "row": [row_offset + r for r in rows],
            "group_id": [groups[r] for r in rows],
            "reward": reward[rows].tolist(),
            "advantage": advantage[rows].tolist(),
            "weight": weight[rows].tolist(),
            "n_response_tokens": layout.n_response_tokens.tolist(),
        }, token_ids)

    def _store(self, buffer: _StepBuffer, state: _Capture, meta: dict, token_ids: torch.Tensor) -> None:
        if not state.records:
            raise RuntimeError("InfluenceTracer: no traced module ran a forward inside capture(); run the model "
                               "forward (not only loss.backward()) inside the context")
        if all(r.u_tok is None for r in state.records.values()):
            raise RuntimeError("InfluenceTracer: no gradient reached the traced modules inside capture(); call "
                               "loss.backward() inside the context")
        layout = state.layout
        n_tok, n_resp = int(layout.token_rows.numel()), len(layout.rows)
        dtype = next(r.v_all.dtype for r in state.records.values())
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        for index, proj in enumerate(self.projections):
            record = state.records.get(index)
            if record is None or record.u_tok is None:
                buffer.missing.add(proj.name)
                buffer.u[index].append(np.zeros((n_tok, proj.k_out), np_dtype))
                buffer.v[index].append(np.zeros((n_tok, proj.k_in), np_dtype))
                buffer.context[index].append(np.zeros((n_resp, proj.k_out, proj.k_in), np_dtype))
                continue
            buffer.u[index].append(record.u_tok.cpu().numpy())
            buffer.v[index].append(record.v_tok.cpu().numpy())
            buffer.context[index].append(record.context.cpu().numpy())
        buffer.counts.append(np.diff(layout.response_offsets))
        ids = token_ids.detach().to("cpu")[layout.token_rows, layout.token_positions]
        buffer.token_ids.append(ids.numpy())
        buffer.token_positions.append(layout.token_positions.numpy())
        for key, values in meta.items():
            buffer.meta[key].extend(values)

    def _forward_hook(self, index: int, module: nn.Module, args: tuple, output) -> None:
        state = self._state
        if state is None or state.closed or _in_backward():
            return None  # not capturing, or a checkpoint recompute (the original output's hook fires)
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return None
        name = self.projections[index].name
        if index in state.records:
            raise RuntimeError(f"InfluenceTracer: traced module {name!r} ran twice inside one capture(); "
                               "one model forward per capture() is supported")
        x = args[0]
        if x.dim() != 3 or x.shape[0] != state.shape[0] or x.shape[1] > state.shape[1]:
            raise RuntimeError(f"InfluenceTracer: module {name!r} saw input of shape {tuple(x.shape)}, which does "
                               f"not fit response_mask (B, T) = {state.shape}; a traced module must see (B, T', d) "
                               "with its T' positions the last T' of the sequence")
        self._sync()
        started = time.perf_counter()
        with torch.no_grad():
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            offset = state.shape[1] - x.shape[1]
            rows = state.on(x.device, dtype, offset)[0]
            x_rows = x.detach() if state.all_rows else x.detach()[rows]  # (R, T', d_in)
            record = _Record(index, offset, self.projector.project(index, "in", x_rows))  # (R, T', k_in)
        state.records[index] = record
        output.register_hook(partial(self._grad_hook, state, record))
        self._sync()
        if self._buffer is not None and self.cfg.profile_timing:
            self._buffer.timing["forward_hook_s"] += time.perf_counter() - started
        return None

    def _grad_hook(self, state: _Capture, record: _Record, grad: torch.Tensor) -> None:
        if state.closed:
            return None
        self._sync()
        started = time.perf_counter()
        with torch.no_grad():
            v_all = record.v_all
            rows, token_local, token_pos, valid, context_weight = state.on(grad.device, v_all.dtype, record.offset)
            dy = grad if state.all_rows else grad[rows]  # (R, T', d_out)
            u_all = self.projector.project(record.index, "out", dy)  # (R, T', k_out)
            u_tok = u_all[token_local, token_pos] * valid  # (N, k_out); zero for tokens the module never saw
            context = (u_all * context_weight[..., None]).transpose(1, 2) @ v_all  # (R, k_out, k_in)
            if self.cfg.grad_offload_to_cpu:
                u_tok, context = u_tok.cpu(), context.cpu()
            if record.u_tok is None:
                record.u_tok, record.context = u_tok, context
                v_tok = v_all[token_local, token_pos] * valid  # (N, k_in)
                record.v_tok = v_tok.cpu() if self.cfg.grad_offload_to_cpu else v_tok
            else:  # a second backward through the same graph: u adds up, v is the same
                record.u_tok = record.u_tok + u_tok
                record.context = record.context + context
        self._sync()
        if self._buffer is not None and self.cfg.profile_timing:
            self._buffer.timing["backward_hook_s"] += time.perf_counter() - started
        return None

    # ------------------------------------------------------------------ scoring and writing
    def _score_device(self) -> torch.device:
        if self.cfg.force_gpu_compute:
            return torch.device("cuda", torch.cuda.current_device())
        if self.cfg.grad_offload_to_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        params = next(self.model.parameters(), None)
        return params.device if params is not None and params.device.type == "cuda" else torch.device("cpu")

    def _score_and_write(self, step: int, gathered: list[dict], decode, gather_s: float) -> dict[str, float]:
        parts = [(rank, p) for rank, p in enumerate(gathered) if p["counts"].size]
        missing = sorted({name for p in gathered for name in p["missing"]})
        if missing:
            log.warning("influence trace step %d: modules %s saw no forward/backward inside capture(); their factors "
                        "are zero", step, missing)
        if not parts:
            log.warning("influence trace step %d: no response was captured on any rank; nothing written", step)
            return {"trace/influence_responses": 0.0}
        self._sync()
        started = time.perf_counter()
        device = self._score_device()
        n_modules = len(self.projections)
        to_t = lambda arrays: torch.from_numpy(np.concatenate(arrays)).to(device)  # noqa: E731
        counts = np.concatenate([p["counts"] for _, p in parts])
        factors = Factors(
            u=[to_t([p["u"][m] for _, p in parts]) for m in range(n_modules)],
            v=[to_t([p["v"][m] for _, p in parts]) for m in range(n_modules)],
            context=[to_t([p["context"][m] for _, p in parts]) for m in range(n_modules)],
            response_offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])).long().to(device),
        )
        meta = {k: np.concatenate([p["meta"][k] for _, p in parts]) for k in _META_KEYS}
        signal = meta["advantage"] if self.cfg.accept_signal == "advantage" else meta["reward"]
        result = score_step(
            factors,
            signal=torch.from_numpy(signal.astype(np.float64)),
            weights=torch.from_numpy(meta["weight"].astype(np.float64)),
            group_ids=torch.from_numpy(meta["group_id"].astype(np.int64)),
            hessian_mode=self.cfg.hessian_mode,
            hessian_source=self.cfg.hessian_source,
            damping=self.cfg.damping,
            accept_signal=self.cfg.accept_signal,
            scope=self.cfg.accepted_rejected_scope,
            agg=self.cfg.contrastive_agg,
        )
        self._sync()
        score_s = time.perf_counter() - started
        started = time.perf_counter()
        arrays = self._step_arrays(step, parts, factors, meta, result, decode)
        timing = {"gather_s": gather_s, "score_s": score_s}
        for key in ("forward_hook_s", "backward_hook_s", "objective_s"):
            values = [p["timing"].get(key, 0.0) for p in gathered]
            timing[key] = max(values)  # slowest rank
        accepted = result.accepted.cpu().numpy()
        tok = result.token_scores.cpu().numpy()
        resp = result.response_scores.cpu().numpy()
        record = {
            "n_responses": int(counts.size),
            "n_tokens": int(counts.sum()),
            "n_ranks_with_data": len(parts),
            "n_units": int(result.unit_n_accepted.numel()),
            "n_units_with_contrast": int(((result.unit_n_accepted > 0) & (result.unit_n_rejected > 0)).sum()),
            "n_accepted": int((accepted > 0).sum()),
            "n_rejected": int((accepted < 0).sum()),
            "method": result.method,
            "damping": result.damping,
            "token_score_mean": float(tok.mean()),
            "token_score_abs_mean": float(np.abs(tok).mean()),
            "token_score_abs_max": float(np.abs(tok).max()),
            "response_score_accepted_mean": float(resp[accepted > 0].mean()) if (accepted > 0).any() else None,
            "response_score_rejected_mean": float(resp[accepted < 0].mean()) if (accepted < 0).any() else None,
            "missing_modules": missing,
        }
        self.writer.write_step(step, arrays, {**record, **({"timing_s": timing} if self.cfg.profile_timing else {})})
        timing["write_s"] = time.perf_counter() - started
        metrics = {
            "trace/influence_responses": float(record["n_responses"]),
            "trace/influence_tokens": float(record["n_tokens"]),
            "trace/influence_accepted": float(record["n_accepted"]),
            "trace/influence_rejected": float(record["n_rejected"]),
            "trace/influence_token_score_abs_mean": record["token_score_abs_mean"],
        }
        if result.damping is not None:
            metrics["trace/influence_damping"] = float(result.damping)
        if self.cfg.profile_timing:
            metrics.update({f"time/trace_influence_{k}": float(v) for k, v in timing.items()})
        return metrics

    def _step_arrays(self, step, parts, factors: Factors, meta, result, decode) -> dict[str, np.ndarray]:
        token_ids = np.concatenate([p["token_ids"] for _, p in parts])
        offsets = factors.response_offsets.cpu().numpy()
        texts = [t for _, p in parts for t in (p["texts"] if p["texts"] is not None else [None] * p["counts"].size)]
        response_text, text_offsets, token_text = [], [], []
        for r, text in enumerate(texts):
            full, spans, pieces = token_text_spans(token_ids[offsets[r]:offsets[r + 1]], decode, text)
            response_text.append(full)
            text_offsets.append(spans)
            token_text.extend(pieces)
        f32 = lambda t: t.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        arrays = {
            "step": np.asarray(step, dtype=np.int64),
            "response_offsets": offsets.astype(np.int64),
            "token_ids": token_ids.astype(np.int64),
            "token_positions": np.concatenate([p["token_positions"] for _, p in parts]).astype(np.int32),
            "token_scores": f32(result.token_scores),
            "token_grad_norm": f32(result.token_grad_norm),
            "token_text": np.asarray(token_text, dtype=str),
            "text_offsets": np.concatenate(text_offsets).astype(np.int32).reshape(-1, 2),
            "response_text": np.asarray(response_text, dtype=str),
            "response_scores": f32(result.response_scores),
            "response_context_scores": f32(result.context_scores),
            "response_grad_norm": f32(result.response_grad_norm),
            "rewards": meta["reward"].astype(np.float32),
            "advantages": meta["advantage"].astype(np.float32),
            "objective_weight": meta["weight"].astype(np.float32),
            "accepted": result.accepted.cpu().numpy().astype(np.int8),
            "group_ids": meta["group_id"].astype(np.int64),
            "unit_ids": result.unit_ids.cpu().numpy().astype(np.int64),
            "rank": np.concatenate([np.full(p["counts"].size, rank, np.int32) for rank, p in parts]),
            "row": meta["row"].astype(np.int32),
            "n_response_tokens": meta["n_response_tokens"].astype(np.int32),
            "unit_n_accepted": result.unit_n_accepted.cpu().numpy().astype(np.int32),
            "unit_n_rejected": result.unit_n_rejected.cpu().numpy().astype(np.int32),
            "damping": np.asarray(np.nan if result.damping is None else result.damping, dtype=np.float64),
            "module_names": np.asarray([p.name for p in self.projections], dtype=str),
            "module_k_in": np.asarray([p.k_in for p in self.projections], dtype=np.int32),
            "module_k_out": np.asarray([p.k_out for p in self.projections], dtype=np.int32),
        }
        if self.cfg.save_factors:
            for m in range(len(self.projections)):
                # Capture dtype (float32, or float64 for float64 models), so offline analysis loses nothing.
                arrays[f"factor_u_{m}"] = factors.u[m].cpu().numpy()
                arrays[f"factor_v_{m}"] = factors.v[m].cpu().numpy()
                arrays[f"factor_context_{m}"] = factors.context[m].cpu().numpy()
        return arrays
