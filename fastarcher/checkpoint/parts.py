"""The state contract between the checkpointer and what it saves.

The trainer hands `Checkpointer` a dict of named parts. Each part has `state_dict()` and
`load_state_dict(state)` and declares where its state lives with a `checkpoint_scope` attribute:

- `"sharded"`: tensors sharded across ranks (models, optimizers), saved and loaded collectively with
  DCP into `model/`. Optional `has_state()`: False leaves the part out of a save (an optimizer that has
  not stepped). Optional `save_problem()`: a reason to refuse the save (collective; non-finite weights).
- `"rank"`: this rank's own state (replay shard, random streams, episode counters): its tensors go to
  `<name>/rank_<k>.safetensors`, its other values (JSON) into that file's metadata. When the world size
  or the device differs from the saving run, `load_resharded(shards, rank, world_size, iteration)` gets
  every old rank's state as lazy mappings instead; without that method the part starts fresh.
- `"run"`: JSON-able state that is the same on every rank (progress counters, guard counters, metric
  history): rank 0 writes it into `state.json`, every rank loads it.

The parts below wrap what torch keeps outside such a contract: modules and optimizers.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastarcher.guards import parameters_within

SCOPES = ("sharded", "rank", "run")


class Stateful(Protocol):
    checkpoint_scope: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_parts(parts: Mapping[str, Any]) -> None:
    """Refuse a part without the contract (a programming error, found when the checkpointer is built)."""
    for name, part in parts.items():
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(part, m, None))]
        scope = getattr(part, "checkpoint_scope", None)
        if missing or scope not in SCOPES:
            raise TypeError(f"checkpoint part {name!r} ({type(part).__name__}) needs state_dict, load_state_dict and "
                            f"checkpoint_scope in {SCOPES}; it lacks {missing or ['a valid checkpoint_scope']}")
        if "/" in name or name in ("model", "") or name.startswith("."):
            raise ValueError(f"checkpoint part name {name!r} cannot be a folder of the checkpoint")


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Second names of shared parameters (tied embeddings) → the first name; the same on every rank."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


class ModelState:
    """A module (FSDP2-sharded or not) as a checkpoint part; tied weights are stored once. trainable_only: only
    the parameters that train (LoRA adapters), the frozen rest being what the run loads from model.path."""

    checkpoint_scope = "sharded"

    def __init__(self, module: nn.Module, trainable_only: bool = False):
        self.module, self.trainable_only = module, trainable_only

    def _trainable(self) -> set[str]:
        return {name for name, p in self.module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.module)
        for alias in tied_aliases(self.module):  # a tied 152k-vocabulary embedding is stored once
            state.pop(alias, None)
        if self.trainable_only:
            keep = self._trainable()
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.trainable_only:
            set_model_state_dict(self.module, state, options=StateDictOptions(strict=False))
            return
        for alias, source in tied_aliases(self.module).items():
            state[alias] = state[source]
        set_model_state_dict(self.module, state)

    def save_problem(self) -> str | None:
        """The guards stop a run before diverged weights get here; this is the last line (collective)."""
        finite, _ = parameters_within(self.module.parameters(), 0.0)
        return None if finite else "weights are not finite (NaN/Inf)"


class OptimizerState:
    """An optimizer over `module` as a checkpoint part. A load keeps this run's learning rate and weight
    decay (a resume may lower the lr on purpose) and reports a changed lr through `log`."""

    checkpoint_scope = "sharded"

    def __init__(self, module: nn.Module, optimizer, name: str, log: Callable[[str], None] = lambda m: None):
        self.module, self.optimizer, self.name, self.log = module, optimizer, name, log

    def has_state(self) -> bool:
        # an optimizer that never stepped is left out: reading its state would make torch initialise it with
        # a zero step (AdamW's step counter would then be one ahead of a run that never saved)
        return bool(self.optimizer.state)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.module, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kept = [(g["lr"], g.get("weight_decay")) for g in self.optimizer.param_groups]
        set_optimizer_state_dict(self.module, self.optimizer, state)
        for group, (lr, wd) in zip(self.optimizer.param_groups, kept):
            if group["lr"] != lr:
                self.log(f"checkpoint: {self.name} lr {group['lr']} in the checkpoint, {lr} from this run's "
                         f"config: using {lr}")
            group["lr"] = lr
            if wd is not None:
                group["weight_decay"] = wd
