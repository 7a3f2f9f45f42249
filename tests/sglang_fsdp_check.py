"""Under torchrun (2 gloo processes): an FSDP2-sharded policy with unevenly split parameters, trained a few
steps, gathered, cast to bf16, bucketed and serialized with sglang's classes; each rank's payloads go to a
consumer process it spawns, which rebuilds them with sglang's unpickler and `FlattenedTensorBucket` and
sends back what it rebuilt. Each rank writes rank{r}.json for tests/test_sglang_engine.py."""
import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def consumer(inbox, outbox) -> None:
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    while True:
        payload = inbox.get()
        if payload is None:
            return
        data = MultiprocessingSerializer.deserialize(payload)
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
        # Send back plain copies (the received tensors live in the producer's shared memory).
        outbox.put([(name, t.clone().reshape(-1).view(torch.uint8).tolist(), str(t.dtype), list(t.shape))
                    for name, t in bucket.reconstruct_tensors()])


def main(out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from dist_helpers import tiny_policy
    from fastarcher.dist import init_distributed, shutdown_distributed
    from fastarcher.model import transformer_blocks
    from fastarcher.parallel import data_parallel_mesh, parallelize
    from fastarcher.rollout import sglang_engine as se
    from fastarcher.rollout.buckets import tied_output_names
    from fastarcher.rollout.weight_sync import full_parameter_buckets

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        # 5 heads of 8 and 49 intermediate rows: dim 0 of several weights does not split evenly in two
        policy, tok = tiny_policy(torch.float32, seed=0, hidden_size=40, num_heads=5, intermediate_size=49)
        expected_names = [n for n in policy.state_dict() if n not in tied_output_names(policy)]
        parallelize(policy, transformer_blocks(policy), data_parallel_mesh(torch.device("cpu"), info.world_size))
        uneven = any(isinstance(p, DTensor) and p.shape[0] % info.world_size for p in policy.parameters())
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(100 + info.rank)
        for _ in range(2):
            ids = torch.randint(3, len(tok), (2, 6), generator=data)
            policy(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach()).to(torch.bfloat16)
                for n, p in policy.named_parameters()}

        ctx = mp.get_context("spawn")
        inbox, outbox = ctx.Queue(), ctx.Queue()
        child = ctx.Process(target=consumer, args=(inbox, outbox), daemon=True)
        child.start()
        rebuilt, buckets = {}, 0
        for bucket in full_parameter_buckets(policy, 30_000, torch.bfloat16, frozenset(tied_output_names(policy))):
            (payload,) = se.bucket_payloads(bucket)
            inbox.put(payload)
            for name, raw, dtype, shape in outbox.get(timeout=120):  # the producer keeps `bucket` alive meanwhile
                rebuilt[name] = (torch.tensor(raw, dtype=torch.uint8), dtype, shape)
            buckets += 1
        inbox.put(None)
        child.join(timeout=60)
        mismatch = [n for n, t in full.items()
                    if n not in rebuilt or not torch.equal(rebuilt[n][0], t.contiguous().view(-1).view(torch.uint8))
                    or rebuilt[n][2] != list(t.shape)]
        result = {"uneven": bool(uneven), "names": list(rebuilt), "expected_names": expected_names,
                  "all_equal": not mismatch, "mismatch": mismatch[:5], "buckets": buckets,
                  "dtypes": sorted({d for _, d, _ in rebuilt.values()})}
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    from fastarcher.dist import exit_now, exit_with_launcher

    exit_with_launcher()
    main(sys.argv[1])
    # done and flushed: skip the interpreter teardown, which sometimes aborts a finished torchrun worker
    # ("terminate called without an active exception"; fastarcher/train.py does the same)
    exit_now(0)
