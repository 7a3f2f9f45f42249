"""LoRA adapters on the policy (peft), and the merged weights that leave the trainer.

peft's `inject_adapter_in_model` puts `lora_A`/`lora_B` beside each targeted linear layer in place, so the
policy keeps its Hugging Face class (the fused LM head, FSDP2's per-block sharding and the checkpoint code
see the same module tree) and only the adapters train. The rollout engine and the exported folder hold the
plain architecture: `merged_tensors` yields W + scaling · B A under the base names, gathering FSDP2 shards
on the way (a collective: every rank iterates in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

ADAPTER = "default"


@dataclass(kw_only=True)
class LoraSettings:
    rank: int = 0
    """LoRA rank of the policy's adapters (0: off, every weight trains)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / rank) · B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters (Llama/Qwen/SmolLM names by default)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank ({self.rank}) must not be negative")
        if self.rank and (self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.target_modules):
            raise ValueError(f"model.lora: alpha ({self.alpha}) must be positive, dropout ({self.dropout}) in [0, 1), "
                             f"target_modules ({self.target_modules}) not empty")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Add adapters to `model` in place and freeze everything else; ValueError if no layer matches."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as error:
        raise ValueError(f"model.lora.target_modules {settings.target_modules}: {error}") from None
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in model.named_parameters())


def _full(param: Tensor) -> Tensor:
    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, int, Callable[[], Tensor]]]:
    """(name in the plain architecture, bytes, gather) for every weight of `model`; with adapters the base
    weight comes back merged, W + scaling · B A, and the adapters themselves are not listed. `gather` returns
    the full tensor (an all-gather for FSDP2 shards)."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".lora_" in name:
            continue
        nbytes = param.numel() * param.element_size()
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            layer = model.get_submodule(prefix)
            a, b = params[f"{prefix}.lora_A.{ADAPTER}.weight"], params[f"{prefix}.lora_B.{ADAPTER}.weight"]

            def gather(param=param, a=a, b=b, scale=layer.scaling[ADAPTER]) -> Tensor:
                weight = _full(param)
                dtype = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: the product in fp32
                return (weight.to(dtype) + scale * (_full(b).to(dtype) @ _full(a).to(dtype))).to(weight.dtype)

            yield prefix + ".weight", nbytes, gather
        else:
            yield name.replace(".base_layer.", "."), nbytes, (lambda param=param: _full(param))
