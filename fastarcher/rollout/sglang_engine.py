"""SGLang as the rollout engine, colocated with FSDP2 training on the same GPU (one engine per rank, tp=1).

The engine and training take turns with the GPU memory. One iteration, in this order:

    generate ─► sleep(): release weights, kv_cache, cuda_graph  (the engine must be idle)
            ─► train (the trainer frees its cached blocks before the sync)
            ─► sync: resume weights ─► begin ─► buckets (flush_cache=False, a fresh buffer each) ─► end ─► flush
            ─► next generate: resume kv_cache and cuda_graph first

Resuming in two stages keeps the KV cache out of memory while the full-weight buckets are gathered, which
lowers the peak by about the weights' size. The engine starts from dummy weights (`load_format="dummy"`)
and refuses to generate before its first sync. Every `GenerationOutput` carries the policy version (the
number of syncs) its tokens were sampled with.

What sglang does quietly, checked here: a parameter name the model does not have is only logged by the
engine (its weights stay stale), so names are checked against the HF architecture before sending; from
0.5.21 an update outside `begin_weight_update` / `end_weight_update` returns success=False without raising,
so results are checked; a bucket mixing dtypes can put a tensor at a byte offset it cannot be viewed from,
so buckets hold one dtype (`fastarcher.rollout.buckets`).

The pieces that need no GPU (payloads with sglang's own classes, the phase order, argument names against
the installed package) are tested on CPU; `scripts/gpu_check_sglang.sh` runs the rest on a GPU.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from fastarcher.rollout.base import GenerationOutput, SamplingParams
from fastarcher.rollout.buckets import bucket_bytes

TESTED_VERSIONS = ("0.5.18", "0.5.19", "0.5.20", "0.5.21")
"""sglang releases whose API this module was checked against (each pins torch 2.13.0)."""
INSTALL_HINT = ("pip install --no-deps 'sglang>=0.5.18,<0.5.22' && pip install -c constraints.txt -e '.[sglang]' "
                "(sglang pins its torch exactly: --no-deps keeps yours)")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")

# Everything this module passes to sglang by name; tests/test_sglang_engine.py checks each against the
# installed package, so an upstream rename fails a test instead of a GPU run.
SERVER_ARGS_USED = ("model_path", "tp_size", "base_gpu_id", "enable_memory_saver", "mem_fraction_static",
                    "skip_tokenizer_init", "load_format", "dtype", "random_seed", "log_level", "context_length")
ENGINE_CALLS_USED = {
    "generate": ("input_ids", "sampling_params", "return_logprob"),
    "update_weights_from_tensor": ("named_tensors", "load_format", "flush_cache"),
    "release_memory_occupation": ("tags",),
    "resume_memory_occupation": ("tags",),
    "flush_cache": (),
    "shutdown": (),
}
SESSION_CALLS = ("begin_weight_update", "end_weight_update")
"""Present from 0.5.21: updates must sit between them. Called where the engine has them."""
SAMPLING_FIELDS_USED = ("max_new_tokens", "temperature", "top_p", "stop_token_ids", "skip_special_tokens",
                        "no_stop_trim", "sampling_seed")
OUTPUT_KEYS_USED = ("output_ids", "meta_info", "output_token_logprobs", "finish_reason")


def import_sglang():
    """The sglang module, or ImportError with the one line that installs it."""
    try:
        import sglang
    except ImportError as err:
        raise ImportError(f"--rollout.engine sglang needs the sglang package, which is not installed: {INSTALL_HINT}") from err
    return sglang


def bucket_payloads(bucket: list[tuple[str, Tensor]], tp_size: int = 1) -> list[str]:
    """One serialized flattened bucket per TP rank (each rank consumes its own payload once: with CUDA
    tensors the payload holds IPC handles whose reference counts drop as each rank loads it)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a bucket must hold one dtype (tensors at misaligned byte offsets cannot be viewed back); got {sorted(map(str, dtypes))}")
    flat = FlattenedTensorBucket(named_tensors=bucket)  # a fresh buffer: never reused while the engine reads it
    payload = {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
    return [MultiprocessingSerializer.serialize(payload, output_str=True) for _ in range(tp_size)]


def free_memory_gib(device: torch.device | None) -> float:
    """Free device memory in GiB (NaN off CUDA)."""
    if device is None or device.type != "cuda":
        return float("nan")
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


class SGLangEngine:
    """The RolloutEngine interface over an `sglang.Engine` (or anything with its methods: tests drive a
    stand-in with sglang's semantics). Tracks which memory is released and orders the resumes itself."""

    def __init__(self, engine: Any, *, weight_names: Iterable[str], weight_dtype: torch.dtype,
                 skip_names: Iterable[str] = (), tp_size: int = 1, device: torch.device | None = None,
                 log: Callable[[str], None] | None = None):
        self.engine = engine
        self.weight_names = frozenset(weight_names)
        self.weight_dtype = weight_dtype  # read by sync_weights: cast before bucketing
        self.skip_names = frozenset(skip_names)  # read by sync_weights: never sent (tied lm_head)
        self.tp_size = tp_size
        self.max_batch = 1 << 30  # one call takes any batch: sglang schedules it itself
        self.device = device
        self.log = log or (lambda line: None)
        self.released: set[str] = set()
        self.version = 0  # completed syncs; 0 = dummy weights
        self.weights_valid = False  # the engine's weights are the policy's (false at start and after release)
        self._in_update = False
        self._sent: set[str] = set()
        self._sync_bytes = 0
        self._sync_start = 0.0
        self.timings: dict[str, float] = {}
        """Seconds of the last release, resume and sync, the sync's GB/s, free GiB after each step."""

    # ---- memory -------------------------------------------------------------------------------------
    def _release(self, tags: list[str]) -> None:
        tags = [t for t in tags if t not in self.released]
        if not tags:
            return
        start = time.perf_counter()
        self.engine.release_memory_occupation(tags=tags)
        self.released.update(tags)
        if "weights" in tags:
            self.weights_valid = False  # the memory saver drops the contents, not only the mapping
        self.timings["release_s"] = time.perf_counter() - start
        self.timings["free_gib_after_release"] = free_memory_gib(self.device)

    def _resume(self, tags: list[str], key: str) -> None:
        tags = [t for t in tags if t in self.released]  # resuming a tag that is not released raises KeyError
        if not tags:
            return
        start = time.perf_counter()
        try:
            self.engine.resume_memory_occupation(tags=tags)
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"sglang could not resume {tags}: {free_memory_gib(self.device):.2f} GiB free on {self.device}. "
                "Lower --rollout.sglang-mem-fraction (the KV cache's share) or the training batch "
                "(--archer.batch-size, --rollout.max-batch)") from err
        self.released.difference_update(tags)
        self.timings[key] = time.perf_counter() - start
        self.timings[f"free_gib_after_{key}"] = free_memory_gib(self.device)

    def sleep(self) -> None:
        """Give the GPU to training: release weights, KV cache and CUDA graphs (the engine is idle here:
        generation is synchronous)."""
        self._release(list(MEMORY_TAGS))

    def release_cache(self) -> None:
        """Release the KV cache and CUDA graphs but keep the weights (training that samples again from
        the same policy before the next sync, e.g. ArCHer's critic phase)."""
        self._release(["kv_cache", "cuda_graph"])

    def wake(self) -> None:
        """Resume whatever is released (weights first). Weights released without a sync since hold no
        policy (generate refuses until the next sync)."""
        self._resume(["weights"], "resume_weights_s")
        self._resume(["kv_cache", "cuda_graph"], "resume_kv_s")

    # ---- weights ------------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        if self._in_update:
            raise RuntimeError("begin_weight_update called twice without end_weight_update")
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()  # training's cached blocks back to the driver before the weights return
        self._resume(["weights"], "resume_weights_s")
        if hasattr(self.engine, "begin_weight_update"):
            self._check(self.engine.begin_weight_update(), "begin_weight_update")
        self._in_update, self._sent, self._sync_bytes = True, set(), 0
        self._sync_start = time.perf_counter()

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        bucket = list(named_tensors)
        if not self._in_update:
            raise RuntimeError("update_weights outside begin_weight_update/end_weight_update (use sync_weights)")
        unknown = sorted(n for n, _ in bucket if n not in self.weight_names)
        if unknown:  # the engine would only log a warning and keep stale weights
            raise KeyError(f"sglang engine model has no parameter named {unknown[:3]} ({len(unknown)} unknown)")
        payloads = bucket_payloads(bucket, self.tp_size)
        result = self.engine.update_weights_from_tensor(named_tensors=payloads, load_format="flattened_bucket",
                                                        flush_cache=False)
        self._check(result, "update_weights_from_tensor")
        del payloads  # the call has returned: the engine holds its own copy now
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()
        self._sent.update(n for n, _ in bucket)
        self._sync_bytes += bucket_bytes(bucket)

    def end_weight_update(self) -> None:
        if not self._in_update:
            raise RuntimeError("end_weight_update without begin_weight_update")
        missing = sorted(self.weight_names - self._sent)
        if missing:
            raise RuntimeError(f"weight sync left {len(missing)} engine parameters stale, e.g. {missing[:3]}")
        if hasattr(self.engine, "end_weight_update"):
            self._check(self.engine.end_weight_update(), "end_weight_update")
        self.engine.flush_cache()  # once per sync, not per bucket: the prefix cache holds the old policy
        seconds = time.perf_counter() - self._sync_start
        self.timings["sync_s"] = seconds
        self.timings["sync_gb_per_s"] = self._sync_bytes / 1e9 / max(seconds, 1e-9)
        self.timings["free_gib_after_sync"] = free_memory_gib(self.device)
        self._in_update = False
        self.weights_valid = True
        self.version += 1
        self.log(f"sglang sync v{self.version}: {self._sync_bytes / 2**20:.0f} MiB in {seconds:.2f} s")

    @staticmethod
    def _check(result: Any, call: str) -> None:
        """sglang answers (success, message) and does not raise on failure."""
        if isinstance(result, tuple) and result and result[0] is False:
            raise RuntimeError(f"sglang {call} failed: {result[1] if len(result) > 1 else result}")

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None = None) -> GenerationOutput:
        if params.constraint is not None:
            raise ValueError("the sglang engine samples freely: run with --rollout.no-constrain-actions")
        if not self.weights_valid:
            raise RuntimeError("the sglang engine holds no policy weights (dummy at start, or released since the "
                               "last sync): sync the policy before generating")
        self._resume(["kv_cache", "cuda_graph"], "resume_kv_s")
        if not prompts:
            return GenerationOutput(token_ids=[], logprobs=[], policy_version=self.version)
        # Per-request seeds drawn from the caller's stream: the same stream gives the same samples.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        sampling = [{
            "max_new_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "stop_token_ids": [params.stop_token_id],
            "skip_special_tokens": False,
            "no_stop_trim": True,  # keep the stop token: the trainer scores it like any other action token
            "sampling_seed": seed,
        } for seed in seeds]
        outs = self.engine.generate(input_ids=[list(p) for p in prompts], sampling_params=sampling,
                                    return_logprob=True)
        token_ids, logprobs = [], []
        for out in outs:
            ids = list(out["output_ids"])
            lps = [float(entry[0]) for entry in out["meta_info"]["output_token_logprobs"]]
            if len(lps) != len(ids):
                raise RuntimeError(f"sglang returned {len(ids)} tokens and {len(lps)} log-probs")
            token_ids.append(ids)
            logprobs.append(lps)
        return GenerationOutput(token_ids=token_ids, logprobs=logprobs, num_calls=1, policy_version=self.version)

    def shutdown(self) -> None:
        self.engine.shutdown()


def build_sglang_engine(model_path: str, *, weight_names: Iterable[str], skip_names: Iterable[str],
                        dtype: torch.dtype, device: torch.device, mem_fraction: float, seed: int,
                        context_length: int | None = None, log: Callable[[str], None] | None = None) -> SGLangEngine:
    """Start one engine on this rank's GPU with dummy weights and the memory saver, then release all its
    memory (the first sync resumes the weights)."""
    sglang = import_sglang()
    if device.type != "cuda":
        raise ValueError(f"--rollout.engine sglang runs on a CUDA device; this run uses {device} (use --rollout.engine hf)")
    version = getattr(sglang, "__version__", "?")
    if version not in TESTED_VERSIONS and log is not None:
        log(f"note: sglang {version} is outside the tested releases {TESTED_VERSIONS[0]}–{TESTED_VERSIONS[-1]}")
    kwargs = dict(model_path=model_path, tp_size=1, base_gpu_id=device.index or 0, enable_memory_saver=True,
                  mem_fraction_static=mem_fraction, skip_tokenizer_init=True, load_format="dummy",
                  dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype],
                  random_seed=seed, log_level="error")
    if context_length is not None:
        kwargs["context_length"] = context_length
    engine = SGLangEngine(sglang.Engine(**kwargs), weight_names=weight_names, weight_dtype=dtype,
                          skip_names=skip_names, device=device, log=log)
    engine.sleep()
    return engine
