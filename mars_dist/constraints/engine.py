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

from mars_dist.constraints.fragments import RELATIVE_TOLERANCE, radial_scales
from mars_dist.constraints.kernels import rescale_, row_l1
from mars_dist.constraints.packed import Packed
from mars_dist.constraints.rules import Constraint
from mars_dist.constraints.segments import gathered

Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""reduce(to_sum, to_average) -> (summed over ranks, averaged over ranks); both float32 1-D. A backend does this
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


def _packed(fragments: Sequence[Fragment], packing: Packed | None) -> Packed:
    """The caller's layout (a backend computes it once), or a fresh one for a one-off call."""
    if packing is None:
        return Packed(fragments)
    if packing.n != len(fragments):
        raise ValueError(f"layout of {packing.n} fragments used with {len(fragments)}")
    return packing


def _row_kinds(p: Packed, action: str) -> tuple[torch.Tensor, bool, bool]:
    """Per global row: is its constraint L2? And whether any row constraint with this action (and a radius /
    weight) is MARS / L2."""
    if getattr(p, "_is_l2_rows", None) is None:
        p._is_l2_rows = p.row_constraint_is_l2()[p.row_con]
    return (p._is_l2_rows, *p.row_selection(action))


def _row_radius(p: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Per global row: the projected radius and radius * (1 + RELATIVE_TOLERANCE), the norm above which a row is
    rescaled (kept while the radii are the same tensor: one pass over the rows less per update)."""
    radius = p.row_radius()
    hit = getattr(p, "_row_threshold", None)
    if hit is None or hit[0] is not radius:
        hit = p._row_threshold = (radius, radius * (1 + RELATIVE_TOLERANCE))
    return hit


def row_partials(p: Packed, ws, l1: bool, sq: bool, of_w: bool = False) -> list[torch.Tensor]:
    """Per global row partial sums over this rank's fragments: [|W| (of_w)], [|D|] (l1), [D^2] (sq).

    The projection's case (l1 only) reads each row once with the fused kernel, where the row lies when it can
    (constraints/segments.py); telemetry and penalties (several sums) compute D = W - W0 once per segment."""
    p.bind(ws)
    pairs, _ = p.all_segments()
    vals = [torch.empty(p.block_rows.numel(), device=p.device) for _ in range(int(of_w) + int(l1) + int(sq))]
    for ch, sg in pairs:  # vals: in block_rows order
        if l1 and not (sq or of_w):
            if sg.view is not None:
                row_l1(sg.view, sg.anchor, p.compiled, out=vals[0][sg.rows], work=p.gather_scratch)
            else:  # the gathered copy is scratch: the deviation may overwrite it
                row_l1(gathered(sg, p.gather_scratch, ch.length), sg.anchor, p.compiled, out=vals[0][sg.rows],
                       scratch=True)
            continue
        w = sg.view if sg.view is not None else gathered(sg, p.gather_scratch, ch.length)
        got = [w.abs().sum(1)] if of_w else []
        d = w - sg.anchor
        if sq:
            sq_vals = torch.linalg.vector_norm(d, 2, dim=1).square()
        if l1:
            got.append(d.abs_().sum(1))
        if sq:
            got.append(sq_vals)
        for v, g in zip(vals, got):
            v[sg.rows] = g
    if p.rows_in_order:  # every global row is one block row, in order: no scatter
        out = vals
    else:
        out = [torch.zeros(p.num_rows, device=p.device).index_add_(0, p.block_rows, v) for v in vals]
    if p.pieces:
        raw = torch.cat(p.piece_views(ws))
        d = raw - p.piece_anchor
        vals = ([raw.abs()] if of_w else []) + ([d.abs()] if l1 else []) + ([d * d] if sq else [])
        for o, v in zip(out, vals):
            o.index_add_(0, p.piece_rows, p.piece_sums(v))
    return out


def project(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce, packing: Packed | None = None) -> int:
    """Project every fragment into its ball (PGM), with one reduce. Returns the number of rows (MARS), tensors
    (L2) and diagonal elements clipped."""
    p = _packed(fragments, packing)
    ws = [f.w for f in fragments]
    is_l2, l1, sq = _row_kinds(p, "project")
    parts = row_partials(p, ws, l1, sq) if (l1 or sq) else []
    to_sum = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(0, device=p.device)
    totals, averaged = reduce(to_sum, p.running_vars())
    p.write_running_vars(averaged)  # the BatchNorm clip below reads the averaged variances
    clipped = 0
    with torch.no_grad():
        if l1 or sq:
            scale = None
            if l1:  # MARS: one scale per row. Without a projected L2 constraint (not sq) every L2 row has radius
                # inf, so its scale is 1 already and the masks are not needed (they cost per row, every update)
                mars = radial_scales(totals[:p.num_rows], *_row_radius(p))
                scale = torch.where(is_l2, 1.0, mars) if sq else mars
                below = scale < 1
                clipped += int((below & ~is_l2).sum()) if sq else int(below.sum(dtype=torch.int32))
            if sq:  # L2: one scale per tensor, from the sum of its rows' squares
                con_sq = torch.zeros(len(p.row_cons), device=p.device).index_add_(0, p.row_con, totals[-p.num_rows:])
                con_scale = radial_scales(con_sq.sqrt(), p.row_constraint_radius())
                scale = torch.where(is_l2, con_scale[p.row_con], 1.0 if scale is None else scale)
                clipped += int(((con_scale < 1) & p.row_constraint_is_l2()).sum())
            if clipped:
                rescale_rows(p, ws, scale)
        clipped += clip_diag(p, ws)
    return clipped


def rescale_rows(p: Packed, ws, scale: torch.Tensor) -> None:
    """W <- lerp(W0, W, s) per row: in place where the rows lie (one pass: read W, W0, write W), or on a gathered
    copy written back with one foreach. torch's lerp returns W0 + s (W - W0) for s < 0.5 and W - (1 - s)(W - W0)
    otherwise, where 1 - s is exact (Sterbenz), so the row lands on its radius to rounding and a row with s = 1 is
    returned bit-exactly. (An in-place `_foreach_lerp_(W, W0, 1 - s)` rounds 1 - s: 1e-5 off the radius for
    s ~ 1e-2.) Segments without a clipped row are skipped (one host sync for all of them)."""
    p.bind(ws)
    pairs, lengths = p.all_segments()
    if pairs:
        s_all = (scale if p.rows_in_order else scale.index_select(0, p.block_rows)).unsqueeze(1)
        for (ch, sg), h in zip(pairs, _segments_hit(p, s_all.view(-1), lengths)):
            if not h:
                continue
            s = s_all[sg.rows]
            if sg.view is not None:
                rescale_(sg.view, sg.anchor, s)
            else:
                m = gathered(sg, p.gather_scratch, ch.length)
                rescale_(m, sg.anchor, s)
                torch._foreach_copy_(sg.blocks, m.split(sg.sizes))
    if p.pieces:
        lengths = p.piece_lengths.tolist()
        views = p.piece_views(ws)
        new = torch.lerp(p.piece_anchor, torch.cat(views), scale[p.piece_elem_row])
        torch._foreach_copy_(views, list(new.split(lengths)))


def _segments_hit(p: Packed, s: torch.Tensor, lengths: torch.Tensor) -> list[bool]:
    """Per segment (`lengths` rows each, in order): whether any of its scales `s` is < 1, with one host sync.
    A running count of the scales below 1 read at the segment boundaries: two passes over the rows (a
    `segment_reduce` min over 128K rows cost 5x more, on the CPU)."""
    hit = getattr(p, "_segment_bounds", None)
    if hit is None or hit[0] is not lengths:
        bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        hit = p._segment_bounds = (lengths, bounds[:-1], bounds[1:])
    _, starts, stops = hit
    count = torch.cat([s.new_zeros(1, dtype=torch.int32), (s < 1).cumsum(0, dtype=torch.int32)])
    return (count[stops] > count[starts]).tolist()


def clip_diag(p: Packed, ws, radius: torch.Tensor | None = None) -> int:
    """Diagonal layers: each element (BatchNorm: its effective scale) clipped to within radius of its anchor
    (`radius` per local diagonal element; default: the constraints' fixed radii)."""
    radius = p.diag_radius() if radius is None else radius
    if not p.diag:
        return 0
    hit = getattr(p, "_diag_bounds", None)  # the fixed radii come back as the same tensor while unchanged
    if hit is None or hit[0] is not radius:
        finite = bool(torch.isfinite(radius).any())
        hit = p._diag_bounds = (radius, finite, p.diag_anchor - radius, p.diag_anchor + radius)
    _, finite, lo, hi = hit
    if not finite:
        return 0
    w, d, denom = p.diag_values(ws)
    over = (d < lo) | (d > hi)
    count = int(over.sum())
    if count:
        new = torch.where(over, torch.clamp(d, lo, hi) * denom, w)
        torch._foreach_copy_([ws[i] for i in p.diag], list(new.split([p.numels[i] for i in p.diag])))
    return count


def add_penalty_grads(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce,
                      packing: Packed | None = None) -> float:
    """Add the penalty gradients (SP methods) to each fragment's grad; return the total penalty value:
    lambda ||D||_MARS (rows), lambda ||d - d0||_1 (diagonal), lambda ||D||_F^2 (L2; no 1/2)."""
    p = _packed(fragments, packing)
    ws, gs = [f.w for f in fragments], [f.grad for f in fragments]
    penalised = lambda c: c.action == "penalty" and c.weight != 0  # noqa: E731
    is_l2, l1, sq = _row_kinds(p, "penalty")
    parts = row_partials(p, ws, l1, sq) if (l1 or sq) else []
    diag_w = torch.tensor([p.cons[k].weight if penalised(p.cons[k]) else 0.0 for k in p.diag_cons],
                          device=p.device)
    diag_l2 = torch.tensor([p.cons[k].norm == "l2" for k in p.diag_cons], dtype=torch.bool, device=p.device)
    if p.diag_cons:  # every rank sends the same buffer layout, also one holding no diagonal element
        _, d, denom = p.diag_values(ws)
        dev = d - p.diag_anchor
        elem_l2 = diag_l2[p.diag_con]
        parts.append(torch.zeros(len(p.diag_cons), device=p.device).index_add_(
            0, p.diag_con, torch.where(elem_l2, dev * dev, dev.abs())))
    if not parts:
        return 0.0
    totals, averaged = reduce(torch.cat(parts), p.running_vars())
    p.write_running_vars(averaged)
    value, coef = 0.0, None
    with torch.no_grad():
        if l1 or sq:
            row_w = torch.tensor([p.cons[k].weight if penalised(p.cons[k]) else 0.0 for k in p.row_cons],
                                 device=p.device)
            rows = totals[:p.num_rows] if l1 else None
            con_l1_max = torch.segment_reduce(rows, "max", lengths=p.row_lengths) if l1 else None
            con_sq = torch.segment_reduce(totals[int(l1) * p.num_rows:(int(l1) + 1) * p.num_rows], "sum",
                                          lengths=p.row_lengths) if sq else None
            cons_l2 = p.row_constraint_is_l2()
            if l1:  # d max_r ||D_r||_1 / dW = sign(D) on the arg-max row (the first on ties)
                at_max = rows == con_l1_max[p.row_con]
                idx = torch.arange(p.num_rows, device=p.device)
                first = torch.full((len(p.row_cons),), p.num_rows, device=p.device, dtype=torch.long)
                first.scatter_reduce_(0, p.row_con[at_max], idx[at_max], "amin")
                coef = torch.where(idx == first[p.row_con], row_w[p.row_con], torch.zeros_like(rows))
                value += float((row_w * torch.where(cons_l2, torch.zeros_like(con_l1_max), con_l1_max)).sum())
            if sq:
                coef_l2 = 2.0 * row_w[p.row_con]
                coef = coef_l2 if coef is None else torch.where(is_l2, coef_l2, coef)
                value += float((row_w * torch.where(cons_l2, con_sq, torch.zeros_like(con_sq))).sum())
            _add_row_grads(p, ws, gs, coef, is_l2)
        if p.diag_cons:
            diag_tot = totals[-len(p.diag_cons):]
            value += float((diag_w * diag_tot).sum())
            wt = diag_w[p.diag_con]
            g = torch.where(elem_l2, 2.0 * dev, torch.sign(dev)) * wt / denom
            keep = [j for j, i in enumerate(p.diag) if gs[i] is not None]
            parts_g = g.split([p.numels[i] for i in p.diag])
            if keep:
                torch._foreach_add_([gs[p.diag[j]] for j in keep], [parts_g[j].to(gs[p.diag[j]].dtype) for j in keep])
    return value


def _add_row_grads(p: Packed, ws, gs, coef: torch.Tensor, is_l2: torch.Tensor) -> None:
    """grad += coef_row * (sign(D) for MARS rows, D for L2 rows), chunk by chunk."""
    p.bind(ws)
    for ch in p.chunks:
        keep = [j for j, b in enumerate(ch.blocks) if gs[b[0]] is not None]
        if not keep:
            continue
        m = p.chunk_deviation(ch)
        m.copy_(torch.where(is_l2[ch.rows].unsqueeze(1), m, m.sign()) * coef[ch.rows].unsqueeze(1))
        deltas = m.split([b[2] for b in ch.blocks])
        grads = p.chunk_views(ch, [g if g is not None else w for g, w in zip(gs, ws)])
        torch._foreach_add_([grads[j] for j in keep], [deltas[j] for j in keep])
    if p.pieces:
        d = p.piece_deviation(ws)
        delta = torch.where(is_l2[p.piece_elem_row], d, d.sign()) * coef[p.piece_elem_row]
        parts = delta.split(p.piece_lengths.tolist())
        views = p.piece_views([g if g is not None else w for g, w in zip(gs, ws)])
        keep = [j for j, (i, _, _) in enumerate(p.pieces) if gs[i] is not None]
        if keep:
            torch._foreach_add_([views[j] for j in keep], [parts[j] for j in keep])


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


def measure(fragments: Sequence[Fragment], reduce: Reduce = identity_reduce,
            packing: Packed | None = None) -> list[LayerStats]:
    """Per-fragment distance, layer norm and fraction of rows at the bound (one reduce for all)."""
    p = _packed(fragments, packing)
    ws = [f.w for f in fragments]
    parts = row_partials(p, ws, True, True, of_w=True)  # |W|, |D|, D^2 per global row
    if p.diag:
        _, d, _ = p.diag_values(ws)
        dev = d - p.diag_anchor
        for v in (dev.abs(), d.abs(), dev * dev):
            parts.append(torch.zeros(p.diag_total, device=p.device).index_copy_(0, p.diag_index, v))
    else:
        parts += [torch.zeros(p.diag_total, device=p.device)] * 3
    totals, averaged = reduce(torch.cat(parts), p.running_vars())
    p.write_running_vars(averaged)
    R, E = p.num_rows, p.diag_total
    w_rows, d_rows, sq_rows = totals[:R], totals[R:2 * R], totals[2 * R:3 * R]
    d_el, w_el, sq_el = totals[3 * R:3 * R + E], totals[3 * R + E:3 * R + 2 * E], totals[3 * R + 2 * E:]
    stats_of = {}
    for kind, cons, lengths, dist, norm, sq in (("rows", p.row_cons, p.row_lengths, d_rows, w_rows, sq_rows),
                                                ("diag", p.diag_cons, p.diag_lengths, d_el, w_el, sq_el)):
        if not cons:
            continue
        dmax = torch.segment_reduce(dist, "max", lengths=lengths).tolist()
        nmax = torch.segment_reduce(norm, "max", lengths=lengths).tolist()
        sqs = torch.segment_reduce(sq, "sum", lengths=lengths).tolist()
        radius = [p.cons[k].radius if p.cons[k].action == "project" else None for k in cons]
        r_el = torch.tensor([r if r is not None else math.inf for r in radius], device=p.device)
        r_el = torch.repeat_interleave(r_el, lengths)
        at = torch.segment_reduce((dist >= r_el * (1 - 1e-5)).float(), "mean", lengths=lengths).tolist()
        for j, k in enumerate(cons):
            c, r = p.cons[k], radius[j]
            if r is not None and c.norm == "l2" and c.kind == "rows":
                frac = float(math.sqrt(sqs[j]) >= r * (1 - 1e-5))
            else:
                frac = at[j] if r is not None else 0.0
            stats_of[k] = LayerStats(c.name, c.role, r, dmax[j], nmax[j], frac, math.sqrt(sqs[j]))
    return [stats_of[p.con_of[i]] for i in range(len(fragments))]


def bound_term(stats: Sequence[LayerStats]) -> float:
    """C = sum_j log(2 B_j) + log(sum_j D_j / B_j): the log-domain form of the paper's bound (the product of
    the B_j overflows over 100+ layers). Layers with B_j = 0 are skipped."""
    layers = [s for s in stats if s.layer_norm > 0]
    if not layers:
        return float("nan")
    rel = sum(s.distance / s.layer_norm for s in layers)
    return sum(math.log(2 * s.layer_norm) for s in layers) + (math.log(rel) if rel > 0 else float("-inf"))
