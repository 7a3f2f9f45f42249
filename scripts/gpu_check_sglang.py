"""GPU check of the colocated sglang engine's pieces (`scripts/gpu_check_sglang.sh` runs it).

Tier A (torch only): full tensors of a random model of Qwen2.5-0.5B's shape, cast to bf16, packed in
one-dtype buckets (fastarcher.rollout.buckets) and sent as CUDA tensors to a spawned consumer on the same
GPU (CUDA IPC through a torch.multiprocessing queue); the consumer rebuilds each bucket and returns a
checksum per tensor: bit-exact or not, GB/s, free memory around the transfer. Then the memory saver, where
`torch_memory_saver` is installed: pause/resume of a region, free memory before and after.

Tier B (only where sglang and its GPU packages are installed): an engine on a random-init small model,
generate, release, one training step, staged resume + bucketed sync, generate again; the engine's
log-probs of the new tokens match an HF forward of the updated weights and did not match before the sync.

Prints one table; writes gpu_check_sglang.json to $OUT (or /tmp).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastarcher.rollout.buckets import dtype_buckets  # noqa: E402

QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def checksum(t: torch.Tensor) -> int:
    """An exact fingerprint of a tensor's bytes (int64 sum of its 32-bit words, with positions mixed in)."""
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    words = raw.view(torch.int32).to(torch.int64)
    weights = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64) % 1_000_003
    return int((words * weights).sum().item())


def consumer(inbox, outbox) -> None:
    torch.cuda.set_device(0)
    while True:
        item = inbox.get()
        if item is None:
            return
        flat, meta = item  # a CUDA tensor received through IPC: the producer's memory, no copy
        sums = []
        for name, dtype, shape, start, end in meta:
            sums.append((name, checksum(flat[start:end].view(dtype).reshape(shape))))
        torch.cuda.synchronize()
        outbox.put(sums)
        del flat


def pack(bucket):
    """One flat uint8 CUDA buffer per bucket (a fresh one each) and the (name, dtype, shape, start, end) rows."""
    parts, meta, offset = [], [], 0
    for name, t in bucket:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        meta.append((name, t.dtype, tuple(t.shape), offset, offset + raw.numel()))
        offset += raw.numel()
    return torch.cat(parts), meta


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def tier_a(result: dict) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN05B)).to(torch.float32)  # fp32 master weights, as FSDP2 holds
    named = [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]
    expected = {n: checksum(t) for n, t in named}
    total = sum(t.numel() * t.element_size() for _, t in named)
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=consumer, args=(inbox, outbox), daemon=True)
    child.start()
    inbox.put((torch.zeros(4, device="cuda", dtype=torch.uint8), []))  # warm the IPC path
    outbox.get(timeout=120)
    for cap_mb in (64, 512):
        torch.cuda.synchronize()
        before = free_gib()
        got, buckets, low = {}, 0, before
        start = time.perf_counter()
        for bucket in dtype_buckets(iter(named), cap_mb << 20):
            flat, meta = pack(bucket)
            inbox.put((flat, meta))
            got.update(outbox.get(timeout=300))  # the buffer stays alive until the consumer is done with it
            low = min(low, free_gib())
            del flat
            buckets += 1
        seconds = time.perf_counter() - start
        torch.cuda.ipc_collect()
        result[f"ipc_{cap_mb}mb"] = {
            "bit_exact": got == expected, "tensors": len(got), "buckets": buckets, "gb": total / 1e9,
            "seconds": seconds, "gb_per_s": total / 1e9 / seconds, "s_per_1b_params": seconds / (sum(p.numel() for p in model.parameters()) / 1e9),
            "free_gib_before": before, "free_gib_lowest": low, "free_gib_after": free_gib()}
    inbox.put(None)
    child.join(timeout=60)
    del model, named
    torch.cuda.empty_cache()
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError:
        result["memory_saver"] = "torch_memory_saver not installed: pause/resume not measured"
        return
    with torch_memory_saver.region():
        block = torch.ones(4 << 28, dtype=torch.uint8, device="cuda")  # 1 GiB
    torch.cuda.synchronize()
    held = free_gib()
    t0 = time.perf_counter()
    torch_memory_saver.pause()
    paused = free_gib()
    t1 = time.perf_counter()
    torch_memory_saver.resume()
    resumed = free_gib()
    t2 = time.perf_counter()
    result["memory_saver"] = {"free_gib_held": held, "free_gib_paused": paused, "free_gib_resumed": resumed,
                              "pause_s": t1 - t0, "resume_s": t2 - t1, "block_gib": block.numel() / 2**30}


def tier_b(result: dict, folder: Path) -> None:
    try:
        import sglang  # noqa: F401
    except ImportError:
        result["tier_b"] = "sglang not installed: engine cycle not run"
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastarcher.rollout.base import SamplingParams
    from fastarcher.rollout.buckets import tied_output_names
    from fastarcher.rollout.sglang_engine import build_sglang_engine
    from fastarcher.rollout.weight_sync import sync_weights

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    config.save_pretrained(folder)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).cuda().to(torch.float32)
    engine = build_sglang_engine(str(folder), weight_names=[n for n, _ in policy.named_parameters()],
                                 skip_names=tied_output_names(policy), dtype=torch.bfloat16,
                                 device=torch.device("cuda", 0), mem_fraction=0.3, seed=0, log=print)
    stats0 = sync_weights(policy, engine, 64 << 20)
    params = SamplingParams(max_new_tokens=16, greedy=True, stop_token_id=config.vocab_size - 1)
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12]]

    def hf_logprobs(model, prompt, tokens):
        ids = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():
            logits = copy.deepcopy(model).to(torch.bfloat16)(ids).logits.float()  # the engine's dtype
        lp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1)
        return lp.gather(-1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(-1)

    out1 = engine.generate(prompts, params)
    engine.sleep()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.randint(0, config.vocab_size, (4, 32), device="cuda")
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stale = [hf_logprobs(policy, p, t) for p, t in zip(prompts, out1.token_ids)]
    stats = sync_weights(policy, engine, 64 << 20)
    out2 = engine.generate(prompts, params)
    fresh = [hf_logprobs(policy, p, t) for p, t in zip(prompts, out2.token_ids)]
    err_new = max((torch.tensor(a, device="cuda") - b).abs().max().item() for a, b in zip(out2.logprobs, fresh))
    err_old = max((torch.tensor(a, device="cuda") - b).abs().max().item() for a, b in zip(out1.logprobs, stale))
    n_params = sum(p.numel() for p in policy.parameters())
    result["tier_b"] = {"sync_s": stats["seconds"], "first_sync_s": stats0["seconds"],
                        "s_per_1b_params": stats["seconds"] / (n_params / 1e9), "timings": engine.timings,
                        "max_abs_logprob_err_after_sync": err_new,
                        "max_abs_logprob_err_old_tokens_vs_new_weights": err_old,
                        "versions": [out1.policy_version, out2.policy_version]}
    engine.shutdown()


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check_sglang: no CUDA device")
        return 2
    out = Path(os.environ.get("OUT", "/tmp"))
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tier_a(result)
    tier_b(result, out / "sglang_tiny_model")
    text = json.dumps(result, indent=1, default=str)
    (out / "gpu_check_sglang.json").write_text(text)
    print(text)
    ok = all(v["bit_exact"] for k, v in result.items() if k.startswith("ipc_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
