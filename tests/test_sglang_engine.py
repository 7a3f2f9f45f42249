"""The colocated SGLang engine's CPU-testable parts, with the real sglang package's classes.

- buckets (fastarcher/rollout/buckets.py): cap, oversize alone, no empty bucket, one dtype each, order per
  dtype; HF names, tied lm_head skipped, fp32 cast;
- payloads through sglang's own `FlattenedTensorBucket` and `MultiprocessingSerializer`: bit-exact round
  trip (NaN, ±Inf, −0.0, non-contiguous inputs), one payload per TP rank, each read once;
- the engine wrapper against a stand-in with sglang's semantics (tests/sglang_standin.py): the full
  colocation cycle, refusals, and a property test over random phase sequences;
- every argument name we pass, pinned against the installed package's source (no GPU or import of the
  engine module needed: it is parsed).
The FSDP2 → buckets → spawned consumer check runs under torchrun in tests/sglang_fsdp_check.py.
"""
import ast
import json
import importlib.util
import inspect
import random
from pathlib import Path

import pytest
import torch
from torch import nn

sglang = pytest.importorskip("sglang", reason="the sglang test extra is not installed (README test command)")

from dist_helpers import run_torchrun, describe, tiny_policy  # noqa: E402
from fastarcher.rollout.base import ActionConstraint, SamplingParams  # noqa: E402
from fastarcher.rollout.buckets import dtype_buckets, engine_tensors, tied_output_names  # noqa: E402
from fastarcher.rollout.hf_engine import HFEngine  # noqa: E402
from fastarcher.rollout import sglang_engine as se  # noqa: E402
from fastarcher.rollout.weight_sync import sync_weights  # noqa: E402
from sglang.srt.utils import MultiprocessingSerializer  # noqa: E402
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket  # noqa: E402
from sglang_standin import StandInEngine  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def nbytes(t):
    return t.numel() * t.element_size()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (compares NaN payloads and −0.0 exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def random_tensors(rng: random.Random, n: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for i in range(n):
        dtype = rng.choice(DTYPES)
        shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(0, 3)))
        t = torch.randn(shape) * 3 if dtype != torch.int64 else torch.randint(-5, 5, shape)
        out.append((f"t{i}", t.to(dtype)))
    return out


# ---- buckets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_dtype_buckets_cap_oversize_no_empty_one_dtype_order(seed):
    rng = random.Random(seed)
    named = random_tensors(rng, rng.randint(0, 25))
    cap = rng.choice([1, 8, 64, 300, 10**6])
    buckets = list(dtype_buckets(iter(named), cap))
    assert all(buckets), "an empty bucket"
    for bucket in buckets:
        assert len({t.dtype for _, t in bucket}) == 1
        assert sum(nbytes(t) for _, t in bucket) <= cap or len(bucket) == 1
        if len(bucket) > 1:
            assert all(nbytes(t) < cap for _, t in bucket)  # a tensor at or over the cap travels alone
    sent = [n for b in buckets for n, _ in b]
    assert sorted(sent) == sorted(n for n, _ in named)  # everything, once
    for dtype in DTYPES:  # order kept within a dtype
        want = [n for n, t in named if t.dtype == dtype]
        assert [n for n in sent if dict(named)[n].dtype == dtype] == want


def test_dtype_buckets_by_hand():
    f = [(f"f{i}", torch.zeros(n)) for i, n in enumerate([1, 1, 2, 5, 1])]  # fp32: 4, 4, 8, 20, 4 bytes
    h = [("h0", torch.zeros(3, dtype=torch.bfloat16))]  # 6 bytes
    buckets = list(dtype_buckets([f[0], h[0], f[1], f[2], f[3], f[4]], 10))
    assert [[n for n, _ in b] for b in buckets] == [["f0", "f1"], ["f2"], ["f3"], ["f4"], ["h0"]]
    with pytest.raises(ValueError, match="must be positive"):
        list(dtype_buckets(f, 0))


@pytest.mark.parametrize("tie", [True, False])
def test_engine_tensors_are_hf_names_cast_and_skip_the_tied_head(tie):
    model, _ = tiny_policy(torch.float32, tie_embeddings=tie)
    skip = tied_output_names(model)
    assert skip == ({"lm_head.weight"} if tie else set())
    named = list(engine_tensors(model, torch.bfloat16, skip))
    hf_keys = set(model.state_dict()) - skip
    assert [n for n, _ in named] == [n for n in model.state_dict() if n in hf_keys]
    state = model.state_dict()
    for name, tensor in named:
        assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous() and not tensor.requires_grad
        assert torch.equal(tensor, state[name].to(torch.bfloat16))


# ---- payloads with sglang's classes ---------------------------------------------------------------

def special_values(dtype):
    base = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-30, 65504.0, -3.5])
    return base.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_payload_round_trip_is_bit_exact(dtype):
    wide = torch.randn(6, 10).to(dtype)
    bucket = [
        ("specials", special_values(dtype)),
        ("noncontig", wide[:, ::3]),  # strided view
        ("transposed", wide.t()),
        ("scalar", torch.tensor(2.5, dtype=dtype)),
        ("odd", torch.randn(7).to(dtype)),
    ]
    assert not bucket[1][1].is_contiguous() and not bucket[2][1].is_contiguous()
    (payload,) = se.bucket_payloads(bucket)
    data = MultiprocessingSerializer.deserialize(payload)  # sglang's restricted unpickler
    rebuilt = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
    out = rebuilt.reconstruct_tensors()
    assert [n for n, _ in out] == [n for n, _ in bucket]
    for (_, want), (_, got) in zip(bucket, out):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(bits(got), bits(want))
    assert torch.isnan(out[0][1][0]) and torch.signbit(out[0][1][3])  # NaN and −0.0 survived


def test_mixed_dtype_bucket_is_refused_and_why():
    mixed = [("h", torch.zeros(3, dtype=torch.bfloat16)), ("f", torch.ones(2))]  # f starts at byte 6
    with pytest.raises(ValueError, match="one dtype"):
        se.bucket_payloads(mixed)
    # What would happen: sglang's own reconstruction cannot view fp32 from a byte offset of 6.
    flat = FlattenedTensorBucket(named_tensors=mixed)
    with pytest.raises(RuntimeError):
        FlattenedTensorBucket(flattened_tensor=flat.get_flattened_tensor(), metadata=flat.get_metadata()).reconstruct_tensors()


def test_one_payload_per_tp_rank_each_read_once():
    model, tok = tiny_policy(torch.float32)
    standin = StandInEngine(model, pad_id=tok.pad_token_id, tp_size=2)
    engine = se.SGLangEngine(standin, weight_names=dict(model.named_parameters()), weight_dtype=torch.float32,
                             tp_size=2)
    stats = sync_weights(model, engine, bucket_bytes=4096)
    assert standin.payload_reads == [0, 1] * int(stats["buckets"])
    assert len(se.bucket_payloads([("x", torch.ones(3))], tp_size=3)) == 3


# ---- the engine wrapper against the stand-in -----------------------------------------------------

def make(seed=0, session=True, dtype=torch.float32):
    policy, tok = tiny_policy(torch.float32, seed=seed, init_std=0.3)
    garbage, _ = tiny_policy(torch.float32, seed=seed + 100, init_std=0.3)  # "dummy" weights
    standin = StandInEngine(garbage, pad_id=tok.pad_token_id, session_required=session)
    engine = se.SGLangEngine(standin, weight_names=[n for n, _ in policy.named_parameters()],
                             weight_dtype=dtype, skip_names=tied_output_names(policy))
    return policy, tok, standin, engine


def reference(policy, tok, prompts, params, seeds):
    """What an HF engine on `policy` samples with the same per-request seeds."""
    hf = HFEngine(policy, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    out = [hf.generate([p], params, torch.Generator().manual_seed(s)) for p, s in zip(prompts, seeds)]
    return [o.token_ids[0] for o in out], [o.logprobs[0] for o in out]


def prompts_of(tok, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tok), (int(k),), generator=g).tolist() for k in torch.randint(2, 7, (n,), generator=g)]


@pytest.mark.parametrize("session", [True, False])
def test_cycle_matches_an_hf_forward_of_the_synced_weights(session):
    policy, tok, standin, engine = make(session=session)
    params = SamplingParams(temperature=0.8, max_new_tokens=5, stop_token_id=tok.eos_token_id)
    prompts = prompts_of(tok)
    with pytest.raises(RuntimeError, match="dummy at start"):
        engine.generate(prompts, params)
    engine.sleep()  # as build_sglang_engine leaves it
    sync_weights(policy, engine, bucket_bytes=2048)
    assert engine.version == 1 and engine.weights_valid
    gen = torch.Generator().manual_seed(5)
    out = engine.generate(prompts, params, gen)
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=torch.Generator().manual_seed(5)).tolist()
    ids, lps = reference(policy, tok, prompts, params, seeds)
    assert out.token_ids == ids and out.policy_version == 1
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b)) for a, b in zip(out.logprobs, lps))
    # release → train → staged resume + buckets → flush → resume KV → generate with the new weights
    engine.sleep()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sync_weights(policy, engine, bucket_bytes=2048)
    greedy = SamplingParams(max_new_tokens=5, greedy=True, stop_token_id=tok.eos_token_id)
    out2 = engine.generate(prompts, greedy)
    ids2, _ = reference(policy, tok, prompts, greedy, [0] * len(prompts))
    assert out2.token_ids == ids2 and out2.policy_version == 2
    tail = [c for c in standin.calls if not c.startswith("update")]
    expected = ["release weights,kv_cache,cuda_graph", "resume weights", *(["begin", "end"] if session else []),
                "flush", "resume kv_cache,cuda_graph", "generate"]
    assert tail[-len(expected):] == expected
    assert all(c == "update flush=False" for c in standin.calls if c.startswith("update"))
    assert not standin.errors and not standin.warnings and standin.buffers_unchanged()
    assert engine.timings["sync_gb_per_s"] > 0 and "resume_kv_s" in engine.timings


def test_refusals_are_clear_and_happen_before_sglang_sees_anything():
    policy, tok, standin, engine = make()
    with pytest.raises(RuntimeError, match="outside begin_weight_update"):
        engine.update_weights([("model.norm.weight", torch.ones(32))])
    engine.begin_weight_update()
    with pytest.raises(KeyError, match="no parameter named"):  # sglang would only log it
        engine.update_weights([("model.no_such.weight", torch.ones(2))])
    engine.update_weights([("model.norm.weight", torch.ones(32))])
    with pytest.raises(RuntimeError, match="stale"):  # most weights never arrived
        engine.end_weight_update()
    constrained = SamplingParams(constraint=ActionConstraint([[5, 1]], len(tok)))
    with pytest.raises(ValueError, match="no-constrain-actions"):
        engine.generate([[4, 5]], constrained)
    assert not standin.warnings and "update outside a weight-update session" not in standin.errors


def test_failed_update_answer_raises():
    policy, tok, standin, engine = make()
    standin.session_required = True
    engine._in_update = True  # bypass our own session: sglang answers (False, msg) and does not raise
    with pytest.raises(RuntimeError, match="sglang update_weights_from_tensor failed"):
        engine.update_weights([("model.norm.weight", torch.ones(32))])


@pytest.mark.parametrize("seed", range(25))
def test_random_phase_sequences_never_misuse_sglang(seed):
    """Drive the wrapper like any trainer could (generate, sleep, wake, train, sync in random order):
    sglang's rules are never broken, a generate either refuses with our message or returns exactly what
    the last synced policy gives, and the version counts syncs."""
    rng = random.Random(seed)
    policy, tok, standin, engine = make(seed=seed % 3, session=seed % 2 == 0)
    params = SamplingParams(max_new_tokens=4, greedy=True, stop_token_id=tok.eos_token_id)
    prompts = prompts_of(tok, n=2, seed=seed)
    synced = None  # the policy state the engine should hold
    syncs = 0
    for _ in range(14):
        op = rng.choice(["generate", "generate", "sleep", "wake", "train", "sync", "sync"])
        if op == "generate":
            if synced is None or "weights" in engine.released or not engine.weights_valid:
                with pytest.raises(RuntimeError, match="sync the policy before generating"):
                    engine.generate(prompts, params)
            else:
                out = engine.generate(prompts, params)
                snapshot, _ = tiny_policy(torch.float32)
                snapshot.load_state_dict(synced)
                assert out.token_ids == reference(snapshot, tok, prompts, params, [0, 0])[0]
                assert out.policy_version == syncs
        elif op == "sleep":
            engine.sleep()
            synced = None  # released weights are gone
        elif op == "wake":
            engine.wake()
        elif op == "train":
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        else:
            sync_weights(policy, engine, bucket_bytes=rng.choice([512, 4096, 10**6]))
            synced = {k: v.clone() for k, v in policy.state_dict().items()}
            syncs += 1
        assert engine.version == syncs
    assert not standin.errors and not standin.warnings and standin.buffers_unchanged(), standin.errors


# ---- argument names pinned against the installed package -----------------------------------------

def _source(module: str) -> str:
    return Path(importlib.util.find_spec(module).origin).read_text()


def test_every_sglang_name_we_use_exists_in_the_installed_release():
    assert sglang.__version__ in se.TESTED_VERSIONS, f"sglang {sglang.__version__}: re-check this module and extend TESTED_VERSIONS"
    tree = ast.parse(_source("sglang.srt.entrypoints.engine"))  # importing it needs GPU-side packages
    (engine_cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine"]
    methods = {f.name: f for f in engine_cls.body if isinstance(f, ast.FunctionDef)}
    for name, used in se.ENGINE_CALLS_USED.items():
        assert name in methods, f"Engine.{name} is gone"
        args = methods[name].args
        params = [a.arg for a in args.args + args.kwonlyargs]
        assert all(u in params for u in used), (name, used, params)
    if tuple(int(x) for x in sglang.__version__.split(".")[:3]) >= (0, 5, 21):
        assert all(name in methods for name in se.SESSION_CALLS)
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

    fields = inspect.signature(ServerArgs).parameters
    assert all(name in fields for name in se.SERVER_ARGS_USED), [n for n in se.SERVER_ARGS_USED if n not in fields]
    assert "dummy" in fields["load_format"].annotation.__metadata__[0].choices
    assert all(name in SGLSamplingParams.__struct_fields__ for name in se.SAMPLING_FIELDS_USED)
    outputs = _source("sglang.srt.managers.tokenizer_manager")
    assert all(f'"{key}"' in outputs for key in se.OUTPUT_KEYS_USED)
    assert 'load_format == "flattened_bucket"' in _source("sglang.srt.entrypoints.engine")
    assert {"weights", "kv_cache", "cuda_graph"} <= set(_tags_in_source())


def _tags_in_source() -> list[str]:
    text = _source("sglang.srt.constants") if importlib.util.find_spec("sglang.srt.constants") else ""
    return [t for t in ("weights", "kv_cache", "cuda_graph") if f'"{t}"' in text]


def test_missing_sglang_is_one_line_naming_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sglang(name, *args, **kwargs):
        if name == "sglang" or name.startswith("sglang."):
            raise ImportError("No module named 'sglang'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sglang)
    with pytest.raises(ImportError) as info:
        se.import_sglang()
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps 'sglang>=0.5.18,<0.5.22'" in message


# ---- FSDP2 shards → gather → buckets → another process -------------------------------------------

def test_fsdp2_shards_reach_a_spawned_consumer_bit_exact(tmp_path):
    proc = run_torchrun([str(Path(__file__).with_name("sglang_fsdp_check.py")), str(tmp_path)], timeout=240)
    assert proc.returncode == 0, describe(proc)
    import json

    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["uneven"], "no parameter was sharded unevenly"
        assert result["names"] == result["expected_names"]
        assert result["all_equal"], result["mismatch"]
        assert result["dtypes"] == ["torch.bfloat16"]
        assert result["buckets"] > 1


# ---- the trainer's loop with the engine (the stand-in in place of sglang.Engine) -------------------

@pytest.mark.parametrize("algo", ["archer", "ppo"])
def test_trainer_loop_drives_the_engine_without_misuse(tmp_path, monkeypatch, algo):
    from fastarcher import config as config_module
    from fastarcher.dist import DistInfo
    from fastarcher.train import parse_config
    from fastarcher.trainer import Trainer

    standins = []

    def fake_build(model_path, *, weight_names, skip_names, dtype, device, mem_fraction, seed, log=None, **_):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)  # the folder the trainer wrote for sglang
        assert config.architectures == ["LlamaForCausalLM"] and 0 < mem_fraction < 1
        model, tok = tiny_policy(torch.float32, seed=123, hidden_size=config.hidden_size,
                                 num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                 intermediate_size=config.intermediate_size)
        standins.append(StandInEngine(model, pad_id=tok.pad_token_id))
        engine = se.SGLangEngine(standins[-1], weight_names=weight_names, weight_dtype=dtype, skip_names=skip_names)
        engine.sleep()
        return engine

    monkeypatch.setattr(config_module, "cuda_visible", lambda: True)
    monkeypatch.setattr(se, "build_sglang_engine", fake_build)
    flags = ("--config configs/tiny_cpu.yaml --rollout.num-envs 4 --eval.episodes 4 --eval.no-random-baseline "
             "--archer.batch-size 6 --archer.warmup-iterations 1 --archer.critic-epochs 2 --archer.actor-epochs 2 "
             "--replay.capacity 64 --model.num-layers 1 --critic.num-layers 1 --log.no-progress --eval.every 1 "
             "--checkpoint.no-export-hf --checkpoint.no-save-on-sigterm --iterations 3 --device cpu "
             "--rollout.engine sglang --rollout.no-constrain-actions --replay.max-action-len 5").split()
    cfg = parse_config([*flags, "--algo", algo, "--log.run-dir", str(tmp_path / "run")])
    cfg.validate(world_size=1)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    # a row left by an attempt that died before its first checkpoint: a fresh start drops it (as with hf)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as stale:
        stale.write(json.dumps({"iteration": 99, "stale": 1}) + "\n")
    trainer.fit()
    (standin,) = standins
    assert not standin.errors and not standin.warnings and standin.buffers_unchanged(), standin.errors
    engine = trainer.engine
    # syncs: the first (dummy weights), then one per actor step (archer: 2 epochs × 2 iterations) or update
    assert engine.version == (1 + 2 * 2 if algo == "archer" else 1 + 3)
    releases = [c for c in standin.calls if c.startswith("release")]
    assert "release weights,kv_cache,cuda_graph" in releases
    if algo == "archer":
        assert "release kv_cache,cuda_graph" in releases  # after the critic phase's fresh actions
    assert engine.weight_dtype == torch.bfloat16  # mixed precision 'auto' is bf16 on the GPU sglang needs
    for name, p in trainer.policy.named_parameters():  # the engine holds the trained policy, as bf16
        assert torch.equal(standin.params[name], p.detach().to(torch.bfloat16).float()), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("engine/sync_gb_per_s" in row for row in rows)
    assert not any("stale" in row for row in rows)
