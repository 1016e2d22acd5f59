"""Project / penalise / measure a set of fragments with ONE reduction of partial sums.

The caller (the sharding layer) hands in, for each constrained parameter, this rank's fragment of the fp32
master weights, and a `reduce` function that sums a 1-D buffer over ranks (identity in one process). The three
steps are always: partial sums of every fragment into one buffer -> one reduce -> each fragment updated locally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mars_dist.constraints.rules import Constraint

Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""reduce(to_sum, to_average) -> (summed over ranks, averaged over ranks); both float64 1-D. A backend does this
with ONE collective (e.g. all-reduce of [to_sum, to_average / world]); replicated backends (DDP) need not sum
partials that are already whole."""


def identity_reduce(to_sum: torch.Tensor, to_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return to_sum, to_average


@dataclass
class Fragment:
    """This process's piece of one constrained parameter (a flat view into the fp32 master weights)."""
    constraint: Constraint
    w: torch.Tensor
    anchor: torch.Tensor | None
    offset: int = 0
    grad: torch.Tensor | None = None


def _running_vars(fragments: Sequence[Fragment]) -> list[torch.Tensor]:
    seen, out = set(), []
    for frag in fragments:
        var = frag.constraint.running_var
        if frag.constraint.role == "bn" and var is not None and id(var) not in seen:
            seen.add(id(var))
            out.append(var)
    return out


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.detach().flatten().to(torch.float64) for p in parts])


def _reduce_parts(parts: list[torch.Tensor], reduce: Reduce, fragments: Sequence[Fragment] = ()) -> list[torch.Tensor]:
    """Concatenate partial sums, reduce once, split back.

    BatchNorm running variances differ per rank (each saw its own micro-batches), but the BN projection and
    penalty must read the same values on every rank: they ride along in the same collective, averaged over ranks,
    and the mean is written back into the buffers (a documented choice, like SyncBN for the statistics only).
    """
    variances = _running_vars(fragments)
    if not parts and not variances:
        return []
    summed, averaged = reduce(_cat(parts), _cat(variances))
    with torch.no_grad():
        for var, mean in zip(variances, torch.split(averaged, [v.numel() for v in variances])):
            var.copy_(mean.view_as(var).to(var.dtype))
    return list(torch.split(summed, [p.numel() for p in parts])) if parts else []


def project(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce) -> int:
    """Project every fragment into its ball (PGM). Returns the number of rows/elements clipped on this rank."""
    active = [f for f in fragments if f.constraint.action == "project" and f.constraint.radius is not None]
    sums = [f for f in active if f.constraint.projection_slots()]
    totals = _reduce_parts([f.constraint.projection_partial(f.w, f.anchor, f.offset) for f in sums], reduce,
                           active)
    by_frag = dict(zip(map(id, sums), totals))
    clipped = 0
    with torch.no_grad():
        for f in active:
            clipped += f.constraint.project_(f.w, f.anchor, f.offset, by_frag.get(id(f)))
    return clipped


def add_penalty_grads(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce) -> float:
    """Add the penalty gradients (SP methods) to each fragment's grad; return the total penalty value."""
    active = [f for f in fragments if f.constraint.penalty_slots()]
    totals = _reduce_parts([f.constraint.penalty_partial(f.w, f.anchor, f.offset) for f in active], reduce,
                           active)
    value = 0.0
    with torch.no_grad():
        for f, tot in zip(active, totals):
            value += f.constraint.penalty_value(tot)
            if f.grad is not None:
                f.constraint.add_penalty_grad_(f.grad, f.w, f.anchor, f.offset, tot)
    return value


@dataclass
class LayerStats:
    name: str
    role: str
    radius: float | None
    distance: float
    """D_j = ||W - W0||_MARS (max row L1 norm of the deviation; max |d - d0| for diagonal layers)."""
    layer_norm: float
    """B_j = ||W||_MARS."""
    frac_at_bound: float
    """Fraction of rows whose norm is at the radius (within 1e-5 relative): the constraint is active there."""
    frobenius: float
    """||W - W0||_F (the L2-PGM norm), reported for every layer."""

    @property
    def ratio(self) -> float:
        return self.distance / self.radius if self.radius else float("nan")


def measure(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce) -> list[LayerStats]:
    """Per-parameter distance, layer norm and fraction of rows at the bound (one reduce for all)."""
    parts = []
    for f in fragments:
        d = f.constraint.deviation(f.w, f.anchor, f.offset)
        parts.append(torch.cat([f.constraint.telemetry_partial(f.w, f.anchor, f.offset),
                                (d * d).sum(dtype=torch.float64).reshape(1)]))
    totals = _reduce_parts(parts, reduce, fragments)
    stats = []
    for f, tot in zip(fragments, totals):
        c = f.constraint
        dist_rows, norm_rows, sq = tot[:c.num_rows], tot[c.num_rows:2 * c.num_rows], tot[-1]
        radius = c.radius if c.action == "project" else None
        if radius is not None and c.norm == "l2" and c.kind == "rows":
            at_bound = float(math.sqrt(float(sq)) >= radius * (1 - 1e-5))
        elif radius is not None:
            at_bound = float((dist_rows >= radius * (1 - 1e-5)).double().mean())
        else:
            at_bound = 0.0
        stats.append(LayerStats(c.name, c.role, radius, float(dist_rows.max()), float(norm_rows.max()),
                                at_bound, math.sqrt(float(sq))))
    return stats


def bound_term(stats: Sequence[LayerStats]) -> float:
    """C = sum_j log(2 B_j) + log(sum_j D_j / B_j): the log-domain form of the paper's bound (the product of
    the B_j overflows over 100+ layers). Layers with B_j = 0 are skipped."""
    layers = [s for s in stats if s.layer_norm > 0]
    if not layers:
        return float("nan")
    rel = sum(s.distance / s.layer_norm for s in layers)
    return sum(math.log(2 * s.layer_norm) for s in layers) + (math.log(rel) if rel > 0 else float("-inf"))
