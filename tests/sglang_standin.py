"""A recording stand-in for `sglang.Engine` with the behaviour our colocation code must respect.

Read off sglang 0.5.21's source (entrypoints/engine.py, managers/tokenizer_control_mixin.py,
model_executor/model_runner_components/weight_updater.py) and the measured facts of issue 16:
- `release_memory_occupation` needs an idle engine; releasing a tag twice is an error here (ours must not);
- `resume_memory_occupation` of a tag that is not released raises KeyError; resumed weights hold garbage
  (modelled as NaN) until they are written again;
- `update_weights_from_tensor` outside `begin_weight_update` / `end_weight_update` answers (False, msg)
  without raising; with `load_format="flattened_bucket"` it takes one serialized payload per TP rank,
  deserializes it with sglang's own `MultiprocessingSerializer` (its restricted unpickler) and rebuilds the
  tensors with `FlattenedTensorBucket`; an unknown parameter name is only logged;
- `generate` while the KV cache or the weights are released fails.
Generation runs the built-in HF engine on the stand-in's own weights and answers in sglang's output format.
"""

from __future__ import annotations

import copy

import torch
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

from fastarcher.rollout.base import SamplingParams
from fastarcher.rollout.hf_engine import HFEngine

TAGS = ("weights", "kv_cache", "cuda_graph")


class StandInEngine:
    def __init__(self, model: torch.nn.Module, *, pad_id: int, tp_size: int = 1, session_required: bool = True):
        self.hf = HFEngine(copy.deepcopy(model), pad_id=pad_id, device=torch.device("cpu"))
        self.params = dict(self.hf.model.named_parameters())
        self.tp_size = tp_size
        self.session_required = session_required  # 0.5.21+; False models 0.5.18–0.5.20 (no session calls)
        self.released: set[str] = set()
        self.in_session = False
        self.busy = False
        self.calls: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []  # every misuse, also those sglang answers without raising
        self.payload_reads: list[int] = []  # which TP rank's payload each deserialization consumed
        self.kept_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer as received, a copy)

    def __getattribute__(self, name):
        if name in ("begin_weight_update", "end_weight_update") and not object.__getattribute__(self, "session_required"):
            raise AttributeError(name)  # older releases have no session calls
        return object.__getattribute__(self, name)

    def _fail(self, message: str, exc: type[Exception] = RuntimeError):
        self.errors.append(message)
        raise exc(message)

    # ---- memory -----------------------------------------------------------------------------------
    def release_memory_occupation(self, tags=None):
        tags = list(tags or TAGS)
        self.calls.append(f"release {','.join(tags)}")
        if self.busy:
            self._fail("release_memory_occupation needs an idle engine", AssertionError)
        for tag in tags:
            if tag in self.released:
                self._fail(f"{tag} released twice", AssertionError)
        self.released.update(tags)

    def resume_memory_occupation(self, tags=None):
        tags = list(tags or TAGS)
        self.calls.append(f"resume {','.join(tags)}")
        for tag in tags:
            if tag not in self.released:
                self._fail(tag, KeyError)
        self.released.difference_update(tags)
        if "weights" in tags:
            with torch.no_grad():
                for p in self.params.values():
                    p.fill_(float("nan"))  # the memory came back; its old contents did not

    # ---- weights ----------------------------------------------------------------------------------
    def begin_weight_update(self, selector: str = "all"):
        self.calls.append("begin")
        self.in_session = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append("end")
        self.in_session = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(f"update flush={flush_cache}")
        if self.session_required and not self.in_session:
            self.errors.append("update outside a weight-update session")
            return False, "update_weights_from_tensor must be called between begin_weight_update and end_weight_update"
        if "weights" in self.released:
            self._fail("weights written while released")
        if load_format != "flattened_bucket":
            self._fail(f"unexpected load_format {load_format!r}")
        if len(named_tensors) != self.tp_size:
            self._fail(f"{len(named_tensors)} payloads for {self.tp_size} TP ranks")
        for rank, payload in enumerate(named_tensors):  # each TP rank reads its own payload, once
            data = MultiprocessingSerializer.deserialize(payload)
            self.payload_reads.append(rank)
            if rank:
                continue  # one TP rank's weights stand for all (tp 1 in fastarcher)
            flat = data["flattened_tensor"]
            self.kept_buffers.append((flat, flat.clone()))
            bucket = FlattenedTensorBucket(flattened_tensor=flat, metadata=data["metadata"])
            with torch.no_grad():
                for name, tensor in bucket.reconstruct_tensors():
                    if name not in self.params:
                        self.warnings.append(f"unknown parameter {name}")  # sglang only logs this
                        continue
                    self.params[name].copy_(tensor)
        return True, "Success"

    def flush_cache(self):
        self.calls.append("flush")
        return True

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        self.calls.append("generate")
        for tag in ("weights", "kv_cache"):
            if tag in self.released:
                self._fail(f"generate while {tag} is released")
        outs = []
        self.busy = True
        try:
            for prompt, sp in zip(input_ids, sampling_params):
                greedy = sp["temperature"] == 0.0
                params = SamplingParams(temperature=1.0 if greedy else sp["temperature"], top_p=sp["top_p"],
                                        max_new_tokens=sp["max_new_tokens"], greedy=greedy,
                                        stop_token_id=sp["stop_token_ids"][0])
                gen = torch.Generator().manual_seed(sp["sampling_seed"])
                out = self.hf.generate([prompt], params, gen)
                ids, lps = out.token_ids[0], out.logprobs[0]
                finish = "stop" if ids and ids[-1] == params.stop_token_id else "length"
                outs.append({"output_ids": ids, "meta_info": {
                    "output_token_logprobs": [(lp, tok, None) for lp, tok in zip(lps, ids)],
                    "finish_reason": {"type": finish}}})
        finally:
            self.busy = False
        return outs

    def shutdown(self):
        self.calls.append("shutdown")

    def buffers_unchanged(self) -> bool:
        """No bucket buffer the engine received was written to afterwards (a reused buffer would be)."""
        return all(torch.equal(buf.view(torch.uint8), copy_.view(torch.uint8)) for buf, copy_ in self.kept_buffers)
