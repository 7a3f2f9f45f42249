"""Checkpoints that resume a run exactly: sharded models and optimizers (DCP), each rank's own state
(replay shard, random streams, episode counters), the run-wide state (iteration, guard counters, metric
history) and the config.

    torchrun --standalone --nproc_per_node=2 -m fastarcher.train --config configs/tiny_cpu.yaml \
        --checkpoint.save-every 5 --checkpoint.resume auto

The trainer hands `Checkpointer` a dict of named parts, each with `state_dict` / `load_state_dict` and a
`checkpoint_scope` ("sharded", "rank" or "run"; parts.py has the contract); the checkpointer never
reaches into the trainer. Layout of `<log.run_dir>/checkpoints/` (see docs/checkpointing.md):

    iter_000010/
      model/                       DCP: the "sharded" parts (policy, critic, target, optimizers that
                                   have stepped), one .distcp file per rank plus .metadata
      <part>/rank_00000.safetensors  each "rank" part of each rank: tensors, JSON values in the metadata
                                   (replay/, rng/, runner/, eval_runner/)
      state.json                   iteration, world size, device, config, the "run" parts
      manifest.json                written last: every file with its size and CRC-32
    latest                         text file naming the newest complete checkpoint

A save writes everything into `.tmp-iter_000010/`, fsyncs it, writes the manifest and then renames
the folder: a crash mid-write leaves only a hidden `.tmp-*` folder, which is never a resume candidate
and is removed by the next save. A checkpoint is untrusted input and loading it never runs code: DCP's
`.metadata` is unpickled through an allow-list of DCP's own classes, its non-tensor items (optimizer
hyperparameters) only where the state being loaded into expects one, with `weights_only=True` and a
type check; safetensors for the rest, JSON for metadata (docs/checkpointing.md, "Threat model").

`checkpoint.resume`:
- `auto`: the checkpoint named by `latest`, else the newest other one; a checkpoint that fails its
  manifest check (missing/truncated/corrupt file) is reported and the previous one is tried. With no
  checkpoint the run starts fresh; with checkpoints but none valid the run stops (nothing is deleted).
- `PATH`: a checkpoint folder, or a run folder / checkpoints folder (then as `auto` inside it);
  a bad checkpoint is an error, no fallback.
- `none`: start fresh; checkpoints already in the run folder are moved aside, never deleted.

Resuming with another world size works but is not bit-exact: DCP reshards the models and optimizers,
the "rank" parts get every old rank's state through `load_resharded` (replay shards are pooled and dealt
out again, oldest first; random streams are derived again from (seed, rank, iteration)).
"""

from fastarcher.checkpoint.compat import config_differences
from fastarcher.checkpoint.files import (
    FORMAT_VERSION, check_checkpoint, checkpoint_name, latest_checkpoint, list_checkpoints, read_run_state,
    resume_candidates,
)
from fastarcher.checkpoint.manager import Checkpointer, RankFile, load_rank_file, save_rank_file
from fastarcher.checkpoint.parts import ModelState, OptimizerState, tied_aliases
from fastarcher.checkpoint.safe_load import CheckpointError, SafeFileSystemReader, SafeLoadPlanner, load_dcp

__all__ = [
    "Checkpointer", "CheckpointError", "FORMAT_VERSION", "ModelState", "OptimizerState", "RankFile",
    "SafeFileSystemReader", "SafeLoadPlanner", "check_checkpoint", "checkpoint_name", "config_differences",
    "latest_checkpoint", "list_checkpoints", "load_dcp", "load_rank_file", "read_run_state", "resume_candidates",
    "save_rank_file", "tied_aliases",
]
