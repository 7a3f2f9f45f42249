"""Apply FSDP2 (`fully_shard`) to a model: each repeated block first, then the root.

Parameters become DTensors sharded over the data-parallel mesh; gradients are reduce-scattered and
averaged across ranks. Model code never imports torch.distributed: all sharding lives here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard


def data_parallel_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def parallelize(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh) -> nn.Module:
    """Shard each block as its own unit (all-gathered just in time), then the remaining root params."""
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # The root reshards after forward too: by default FSDP2 keeps root parameters unsharded after a
    # forward, which would leave a no-grad module (the target critic) holding full tensors.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model
