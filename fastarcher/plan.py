"""Memory per rank before a run: `python -m fastarcher.plan --config X [--nproc N] [train flags]`.

Resident parts come from exact parameter counts (the models are built on fake tensors: nothing is read from
disk or allocated): the policy's FSDP2 shard, its gradients and AdamW state (trainable parameters only, so
LoRA counts adapters), the rollout engine's full copy (bf16 under mixed precision), the critic with its target, gradients and AdamW state,
a reference policy where a KL term needs one, and the replay buffer. The peaks of one actor step and one
critic step are measured by running them on fake tensors under torch's `MemTracker` (activations and
temporaries of the real code paths at the configured batch and lengths), so they follow the model, the
fused head and activation checkpointing without a formula per architecture.

Not counted: the CUDA context and allocator fragmentation (add 10-20% on a GPU), a colocated sglang engine
(its `rollout.sglang_mem_fraction` of the GPU, released while training), and wandb or data loader memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fastarcher.rollout.buckets import tensor_bytes


@dataclass
class MemoryPlan:
    world_size: int
    resident: dict[str, int] = field(default_factory=dict)
    """Bytes held for the whole run, per rank."""
    phases: dict[str, int] = field(default_factory=dict)
    """Extra peak bytes of each training phase (activations, temporaries, transient gradients), per rank."""

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + max(self.phases.values(), default=0)

    def table(self) -> str:
        rows = [f"memory per rank ({self.world_size} process{'es' if self.world_size > 1 else ''}):"]
        rows += [f"  {name:<44} {nbytes / 2**20:>10.1f} MiB" for name, nbytes in self.resident.items()]
        rows += [f"  peak of {name:<36} {nbytes / 2**20:>10.1f} MiB" for name, nbytes in self.phases.items()]
        rows.append(f"  {'expected peak (resident + largest phase)':<44} {self.peak / 2**20:>10.1f} MiB")
        return "\n".join(rows)


class _SizedTokenizer:
    """Vocabulary size and pad id: all the planner needs of a tokenizer."""

    def __init__(self, vocab: int):
        self.vocab, self.pad_token_id, self.eos_token_id = vocab, 0, 0

    def __len__(self) -> int:
        return self.vocab


def _fake_policy(cfg):
    """The policy and tokenizer, the policy built on fake tensors (no weights read). A folder with only
    `config.json` (planning before the weights are downloaded) gets a stand-in tokenizer of the config's
    vocabulary size."""
    from fastarcher.model import build_builtin_model, load_tokenizer

    config = None
    if cfg.model.path is not None:  # read once: the model's shape, and the vocabulary size without tokenizer files
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.path,
                                            **({"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}))
    try:
        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError):
        if config is None or cfg.model.gguf_file:
            raise
        tokenizer = None
    if config is not None and (tokenizer is None or len(tokenizer) < 2):  # no tokenizer files there
        tokenizer = _SizedTokenizer(config.vocab_size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, cfg.model.dtype))  # fake parameters cannot be cast in place later
    try:
        if config is None:
            model = build_builtin_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.model.dtype))
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer


def _step_peak(modules: list[nn.Module], optimizer, step) -> int:
    """Peak bytes above what is held before the step (parameters, AdamW state) while `step()` runs a
    forward + backward, measured on fake tensors by MemTracker. Two steps: the first creates AdamW's state."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        # MemTracker hooks every parameter's gradient to label it, and a frozen one (LoRA's base weights, the
        # target critic) cannot take a hook. Without the label a gradient still counts in the total.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            frozen = any(not p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen)

    for _ in range(2):
        tracker = Tracker()
        tracker.track_external(*modules, optimizer)
        with tracker:
            step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    held = {k: v for k, v in snapshot.items() if str(k) in ("_MemRefType.PARAM", "_MemRefType.BUFFER", "_MemRefType.OPT")}
    return snapshot["Total"] - sum(held.values())


def _engine_in_bf16(cfg) -> bool:
    """Under torchrun the HF engine's copy takes the policy's mixed-precision dtype: bf16 when asked, or by
    default ('auto') on CUDA (device 'auto' resolved on this machine, as the trainer would)."""
    from fastarcher.dist import wants_cuda
    from fastarcher.parallel import mixed_precision_policy

    device = torch.device("cuda" if wants_cuda(cfg.device) else "cpu")
    return mixed_precision_policy(cfg.model.mixed_precision, device) is not None


def plan_memory(cfg, world_size: int = 1) -> MemoryPlan:
    """The memory plan of `cfg` on `world_size` processes (FSDP2 shards divide the resident model parts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastarcher.critic import DoubleCritic, make_target
    from fastarcher.lora import apply_lora
    from fastarcher.model import enable_activation_checkpointing
    from fastarcher.policy import action_logprobs
    from fastarcher.replay import ReplayBuffer

    out = MemoryPlan(world_size)
    w = world_size
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        policy, tokenizer = _fake_policy(cfg)
        plain = tensor_bytes(policy.parameters())
        if cfg.rollout.engine == "hf" and _engine_in_bf16(cfg):
            out.resident["rollout engine: full policy copy (hf, bf16)"] = 2 * sum(p.numel() for p in policy.parameters())
        elif cfg.rollout.engine == "hf":
            out.resident["rollout engine: full policy copy (hf)"] = plain
        else:
            out.resident["rollout engine: sglang (its own share, released)"] = 0
        if cfg.model.lora.enabled:
            # peft cannot place adapters on fake tensors: count them on a meta-device copy, and plan the step
            # with the target layers' own weights trainable (an upper bound by those weights' gradient bytes).
            with torch.device("meta"):
                counted = apply_lora(_fake_policy(cfg)[0], cfg.model.lora)
            weights, trainable_bytes = tensor_bytes(counted.parameters()), tensor_bytes(p for p in counted.parameters() if p.requires_grad)
            targets = tuple(cfg.model.lora.target_modules)
            for name, param in policy.named_parameters():
                param.requires_grad_(name.rsplit(".", 2)[-2] in targets)
        else:
            weights = trainable_bytes = plain
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(policy)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        out.resident["policy weights (FSDP2 shard)"] = weights // w
        out.resident["policy AdamW state (2 per trainable weight)"] = 2 * trainable_bytes // w
        if cfg.kl.coef > 0:  # the algorithms build a reference policy only for a KL term
            out.resident["reference policy (shard)"] = plain // w
        if w > 1:  # FSDP2 gathers one block at a time (and prefetches the next)
            blocks = [m for m in policy.modules() if type(m).__name__.endswith("DecoderLayer")]
            out.resident["FSDP2 all-gathered blocks (2)"] = 2 * max((tensor_bytes(b.parameters()) for b in blocks), default=0)

        a, r = cfg.archer, cfg.replay
        batch = a.batch_size
        state_len, action_len = r.max_state_len, r.max_action_len
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        vocab = len(tokenizer)

        def actor_step():
            state_ids = torch.randint(3, vocab, (batch, state_len))
            action_ids = torch.randint(3, vocab, (batch, action_len))
            lengths_s = torch.full((batch,), state_len)
            lengths_a = torch.full((batch,), action_len)
            logprob_sum, entropy, _ = action_logprobs(policy, state_ids, lengths_s, action_ids, lengths_a,
                                                      pad_id=tokenizer.pad_token_id, constraint=None,
                                                      fused_head=cfg.model.fused_head)
            (logprob_sum.sum() + entropy.sum()).backward()

        phase = _step_peak([policy], optimizer, actor_step)
        if cfg.rollout.constrain_actions:  # the allowed-token masks of the constrained distribution (bool)
            phase += batch * action_len * vocab
        out.phases["actor step (activations, gradients)"] = phase

        if cfg.algo in ("archer", "chai"):
            if cfg.critic.encoder != "separate":
                out.resident["critic: heads on another trunk (not planned)"] = 0
            else:
                critic = DoubleCritic(cfg.critic, vocab_size=vocab, pad_id=tokenizer.pad_token_id)
                target = make_target(critic)
                critic_bytes = tensor_bytes(critic.parameters())
                out.resident["critic weights + target (shards)"] = (critic_bytes + tensor_bytes(target.parameters())) // w
                out.resident["critic AdamW state"] = 2 * critic_bytes // w
                critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)

                def critic_step():
                    s = torch.randint(3, vocab, (batch, state_len))
                    act = torch.randint(3, vocab, (batch, action_len))
                    ones_s, ones_a = torch.ones(batch, state_len), torch.ones(batch, action_len)
                    with torch.no_grad():
                        target(s, ones_s, act, ones_a)
                    q1, q2, v1, v2 = critic(s, ones_s, act, ones_a)
                    ((q1 ** 2).mean() + (q2 ** 2).mean() + (v1 ** 2).mean() + (v2 ** 2).mean()).backward()

                out.phases["critic step (activations, gradients)"] = _step_peak([critic, target], critic_opt, critic_step)
            buffer = ReplayBuffer(r.capacity, r.max_state_len, r.max_action_len, r.max_obs_len, pad_id=0, device="meta")
            out.resident["replay buffer"] = buffer.nbytes
    return out


def main(argv: list[str] | None = None) -> None:
    from fastarcher.train import parse_config

    parser = argparse.ArgumentParser(prog="python -m fastarcher.plan", add_help=False)
    parser.add_argument("--nproc", type=int, default=1, help="processes (FSDP2 ranks) the run will use")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    known, rest = parser.parse_known_args(argv)
    cfg = parse_config(rest)
    cfg.validate(world_size=known.nproc)
    with warnings.catch_warnings():  # MemTracker's notes about fake tensors and unhooked modules
        warnings.simplefilter("ignore")
        result = plan_memory(cfg, known.nproc)
    if known.json:
        print(json.dumps({"world_size": result.world_size, "resident": result.resident, "phases": result.phases,
                          "peak": result.peak}))
    else:
        print(result.table())


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
