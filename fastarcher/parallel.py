"""Apply FSDP2 (`fully_shard`) to a model: each repeated block first, then the root.

Parameters become DTensors sharded over the data-parallel mesh; gradients are reduce-scattered and
averaged across ranks. Model code never imports torch.distributed: all sharding lives here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def data_parallel_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def mixed_precision_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 parameters/compute with fp32 gradient reduce-scatter (the sharded fp32 parameters stay the
    optimizer's master weights), or None for full fp32. auto: bf16 on CUDA only."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def parallelize(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh,
                mp_policy: MixedPrecisionPolicy | None = None, offload: bool = False) -> nn.Module:
    """Shard each block as its own unit (all-gathered just in time), then the remaining root params.
    offload: shards, gradients and optimizer state live in (pinned) CPU memory (FSDP2 CPUOffloadPolicy)."""
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    # The root reshards after forward too: by default FSDP2 keeps root parameters unsharded after a
    # forward, which would leave a no-grad module (the target critic) holding full tensors.
    fully_shard(model, mesh=mesh, reshard_after_forward=True, **kwargs)
    return model
