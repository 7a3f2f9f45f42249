"""Module selection, projection sizes and seeded Rademacher projections for the influence trace.

For a traced `nn.Linear` with weight W (d_out x d_in), input x (d_in) and output gradient dy (d_out),
the per-position weight gradient is dy x^T. With fixed random matrices P_in (k_in x d_in) and
P_out (k_out x d_out) its projection is

    P_out (dy x^T) P_in^T = u v^T,   u = P_out dy (k_out),   v = P_in x (k_in),

so only u and v are ever computed; the full d_out x d_in gradient never exists. Entries of P are
+-1/sqrt(k) (Rademacher), so E[P^T P] = I and inner products are preserved in expectation
(Johnson-Lindenstrauss). Each module's matrices come from a CPU generator seeded by
(seed, crc32(module name)): every rank and every device builds the same P.

Sizes (`projection_sizes`): k = ceil(d / projection_dim_factor) per side, then, if the sum over
modules of k_in + k_out exceeds `max_proj_vector_sum`, every k is scaled by that ratio (floored,
at least 1); then, if D = sum of k_in * k_out exceeds `max_hessian_dim`, every k is scaled by
sqrt(max_hessian_dim / D) (floored, at least 1).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

__all__ = ["ModuleProjection", "select_linear_modules", "projection_sizes", "rademacher_matrix", "Projector"]


@dataclass(frozen=True)
class ModuleProjection:
    """Projection sizes of one traced module; its block of the D-dim gradient is vec(u v^T), row-major."""

    name: str
    in_features: int
    out_features: int
    k_in: int
    k_out: int

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out


def select_linear_modules(model: nn.Module, name_filter: Sequence[str],
                          max_modules: int) -> list[tuple[str, nn.Linear]]:
    """nn.Linear modules whose name contains any substring of `name_filter` (all if empty), keeping the
    deepest `max_modules` (last in `named_modules` order, which follows the forward order of HF models)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (not name_filter or any(s in name for s in name_filter))
    ]
    if max_modules > 0:
        found = found[-max_modules:]
    return found


def projection_sizes(
    shapes: Sequence[tuple[int, int]], *, dim_factor: int, max_vector_sum: int, max_hessian_dim: int
) -> list[tuple[int, int]]:
    """(k_in, k_out) for each (d_in, d_out) following the rule in the module docstring."""
    if not shapes:
        return []
    sizes = [(min(d_in, math.ceil(d_in / dim_factor)), min(d_out, math.ceil(d_out / dim_factor)))
             for d_in, d_out in shapes]

    def scaled(ratio: float) -> list[tuple[int, int]]:
        return [(max(1, math.floor(a * ratio)), max(1, math.floor(b * ratio))) for a, b in sizes]

    vector_sum = sum(a + b for a, b in sizes)
    if vector_sum > max_vector_sum:
        sizes = scaled(max_vector_sum / vector_sum)
    dim = sum(a * b for a, b in sizes)
    if dim > max_hessian_dim:
        sizes = scaled(math.sqrt(max_hessian_dim / dim))
    vector_sum = sum(a + b for a, b in sizes)
    dim = sum(a * b for a, b in sizes)
    if vector_sum > max_vector_sum:
        raise ValueError(
            f"trace.influence.max_proj_vector_sum ({max_vector_sum}) is below the minimum of 2 per traced module "
            f"({len(shapes)} modules need {vector_sum}); lower trace.influence.max_modules"
        )
    if dim > max_hessian_dim:
        raise ValueError(
            f"trace.influence.max_hessian_dim ({max_hessian_dim}) is below the minimum of 1 per traced module "
            f"({len(shapes)} modules need {dim}); lower trace.influence.max_modules"
        )
    return sizes


def rademacher_matrix(rows: int, cols: int, *, seed: int, name: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, cols) matrix of +-1/sqrt(rows), the same for a given (seed, name) on every machine."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    signs = torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1) / math.sqrt(rows)


class Projector:
    """P_in (k_in, d_in) and P_out (k_out, d_out) per traced module, built once per (device, dtype)."""

    def __init__(self, projections: Sequence[ModuleProjection], seed: int):
        self.projections = list(projections)
        self.seed = seed
        self._cache: dict[tuple[int, str, torch.device, torch.dtype], torch.Tensor] = {}

    def matrix(self, index: int, side: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (index, side, torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            proj = self.projections[index]
            rows, cols = (proj.k_in, proj.in_features) if side == "in" else (proj.k_out, proj.out_features)
            # Built in float64 on CPU, so the float32 and float64 matrices hold the same values.
            cached = rademacher_matrix(rows, cols, seed=self.seed, name=f"{proj.name}:{side}", dtype=torch.float64)
            cached = cached.to(device=device, dtype=dtype)
            self._cache[key] = cached
        return cached

    def project(self, index: int, side: str, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> x P^T (..., k) in float64 for float64 inputs, else float32."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(dtype) @ self.matrix(index, side, x.device, dtype).T
