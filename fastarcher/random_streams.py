"""Every random stream of one rank, derived from the run's seed, as one checkpoint part.

The trainer draws from three torch.Generators (fresh-action sampling, replay sampling, minibatch orders)
and one python `random.Random` (demonstration picks); torch, numpy and python also keep global streams.
A checkpoint holds all of them, so a resume continues every stream exactly where it stopped.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

GENERATORS = ("sample_gen", "buffer_gen", "cpu_gen")


class RandomStreams:
    """This rank's generators (`sample_gen`, `buffer_gen` on `device`, `cpu_gen` on the CPU, `py_rng`)
    plus the global torch / numpy / python streams, as a per-rank checkpoint part."""

    checkpoint_scope = "rank"

    def __init__(self, seed: int, rank: int, device: torch.device | str = "cpu"):
        self.seed, self.rank = seed, rank
        rank_seed = seed * 1_000_003 + 7919 * rank
        self.sample_gen = torch.Generator(device=device).manual_seed(rank_seed)
        self.buffer_gen = torch.Generator(device=device).manual_seed(rank_seed + 1)
        self.py_rng = random.Random(rank_seed + 2)
        self.cpu_gen = torch.Generator().manual_seed(rank_seed + 3)

    def state_dict(self) -> dict:
        """Tensors (torch states, numpy's key array) and JSON values (python and numpy scalars)."""
        state: dict = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["torch_cuda"] = torch.cuda.get_rng_state()
        for name in GENERATORS:
            state[f"gen_{name}"] = getattr(self, name).get_state()
        np_state = np.random.get_state()
        state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
        state.update(python=_py_to_json(random.getstate()), py_rng=_py_to_json(self.py_rng.getstate()),
                     numpy=[np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(_byte_state(state, "torch_cpu"))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_byte_state(state, "torch_cuda"))
        for name in GENERATORS:
            getattr(self, name).set_state(_byte_state(state, f"gen_{name}"))
        name, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(_py_from_json(state["python"]))
        self.py_rng.setstate(_py_from_json(state["py_rng"]))

    def load_resharded(self, shards, rank: int, world_size: int, iteration: int) -> None:
        """Another world size or device: the saved streams do not map onto this rank's, so derive fresh
        ones from (seed, rank, iteration) — a resumed run is then not bit-identical to an uninterrupted one."""
        base = (self.seed * 1_000_003 + 7919 * rank + 104_729 * (iteration + 1)) % 2**63
        torch.manual_seed(base)
        np.random.seed(base % 2**32)
        random.seed(base)
        for k, name in enumerate(GENERATORS):
            getattr(self, name).manual_seed(base + 1 + k)
        self.py_rng.seed(base + 5)


def _byte_state(state: dict, key: str) -> Tensor:
    value = state[key]
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise ValueError(f"random state {key} is not a uint8 vector")
    return value


def _py_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_from_json(state: list) -> tuple:
    return state[0], tuple(state[1]), state[2]
