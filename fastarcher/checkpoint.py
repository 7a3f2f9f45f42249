"""Checkpoints: sharded policy/critic/target/optimizer state with torch.distributed.checkpoint (DCP),
plus each rank's replay shard and the iteration counter.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict


def save_checkpoint(trainer, path: str | Path) -> Path:
    path = Path(path)
    state = {
        "policy": get_model_state_dict(trainer.policy),
        "critic": get_model_state_dict(trainer.critic),
        "target": get_model_state_dict(trainer.target),
        "actor_opt": get_optimizer_state_dict(trainer.policy, trainer.actor_opt),
        "critic_opt": get_optimizer_state_dict(trainer.critic, trainer.critic_opt),
    }
    dcp.save(state, checkpoint_id=str(path / "model"))
    torch.save(trainer.buffer.state_dict(), path / f"replay_rank{trainer.info.rank}.pt")
    return path
