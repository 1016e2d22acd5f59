"""Learned radii: Fast Trainable Projection (Tian et al., "Fast Trainable Projection for Robust Fine-Tuning",
NeurIPS 2023; reference code GT-RIPL/FTP) with the MARS row norm, on the packed layout of constraints/packed.py.

Per learned constraint j (one radius gamma_j per layer), at update t, with W~ the weights the optimizer just
produced and c = W~ - W0 (BatchNorm: in effective-scale space), row norms n_r = ||c_r||_1 + 1e-8, and u_j the
layer's unit (`FtpConfig.scale`: 'reference' u_j = 1, the paper's code; 'layer' u_j = ||W0_j||_MARS, the pretrained
layer's max row L1 norm, max |w0| for a diagonal layer; 1 for an all-zero layer). The learned variable is
rho_j = gamma_j / u_j:
1. t = 1: gamma_j = init u_j (init 1e-8 in the reference: the first update is pulled back onto the pretrained
   weights).
2. t > 1: the gradient of the loss w.r.t. gamma_j is  sum_r g_r . c'_r / n'_r  with g the gradient of this update
   and c', n' the previous update's unconstrained displacement and row norms (dW_r/dgamma for a clipped row);
   positive gradients are multiplied by k (annealing); rho_j takes one Adam step on u_j times that gradient (own
   lr, betas, eps, bias correction with t, as the reference), i.e. gamma_j moves by lr u_j at most (about);
   then gamma_j is clipped to [1e-8, max_r n_r].
3. Projection with gamma_j: rows with n_r above gamma_j are rescaled radially onto it (`lerp(W0, W~, s)`, exactly as
   the fixed-radius projection: rows inside are bit-exact no-ops); diagonal layers clip |d - d0| <= gamma_j.
Why 'layer' (the default): Adam normalises the radius gradient, so the radius moves by about lr per update whatever
the layer's size; with absolute units one lr is too slow for a large layer and too fast for a small one (pretrained
||W0||_MARS spans 2 to 72 in EfficientNet-Lite0, plain fine-tuning's distances 0.03 to 11, but only 0.01 to 0.23 of
their layer's ||W0||_MARS; docs/constraints.md). The bound's own complexity term measures layers the same way
(sum_j D_j / B_j, engine.py). u_j is summed over the ranks' anchor fragments in the first update's reduce (no extra
collective) and checkpointed.
Which constraints learn is decided by the selection (`Constraint.learned`: matrices, norm layers, embeddings when
clipped); the others keep their fixed radius here (the head, BatchNorm effective scales, numeric `groups` entries:
docs/constraints.md says why). The math below also handles a learned diagonal/BatchNorm constraint.

Sharding: g_r . c'_r / n'_r is a sum over elements, so each rank adds up its fragments' part (`accumulate`, in the
optimizer's pre-step hook, no collective) and the per-layer sums travel in the SAME single reduce as the row norms
(`project`, post-step hook). Every rank then computes the same gamma from the same reduced sums.

Memory: ONE buffer the size of this rank's constrained fragments (1/N of the model): the previous direction
c'/n' (`direction`), packed like the anchors. It cannot be recovered from the weights: for a clipped row
(W - W0) / gamma_prev is c'/n' in exact arithmetic, but with gamma ~ 1e-8 (the reference's start) W - W0 is below
the float32 resolution of W, so the recovered direction would be rounding noise and gamma would never grow.
"""

from __future__ import annotations

import math

import torch

from mars_dist.config import FtpConfig  # a plain dataclass (no torch, no processes)
from mars_dist.constraints.engine import clip_diag, rescale_rows, row_partials
from mars_dist.constraints.fragments import radial_scales
from mars_dist.constraints.packed import Packed

NORM_EPS = 1e-8  # added to every row norm, and gamma's lower clip, as the reference


class LearnedRadii:
    """The radii, their Adam moments and step count (replicated on every rank) and this rank's direction buffer."""

    def __init__(self, packing: Packed, settings: FtpConfig | None = None):
        p = self.p = packing
        self.s = settings or FtpConfig()
        if self.s.scale not in ("layer", "reference"):  # the API's settings skip the config's validation
            raise ValueError(f"constraint.ftp.scale = {self.s.scale!r} is not one of layer, reference")
        dev = p.device
        self.learned = torch.tensor([c.learned for c in p.cons], dtype=torch.bool,
                                    device=dev)
        n = len(p.cons)
        fixed = [c.radius if c.action == "project" and c.radius is not None else math.inf for c in p.cons]
        self.fixed = torch.tensor(fixed, dtype=torch.float64, device=dev)
        self.unit = torch.ones(n, dtype=torch.float64, device=dev)
        """u_j (module docstring): ones until the first update measures ||W0_j||_MARS under scale 'layer'."""
        self.gamma = torch.where(self.learned, torch.full((n,), self.s.init_radius, dtype=torch.float64,
                                                          device=dev), self.fixed)
        self.m = torch.zeros(n, dtype=torch.float64, device=dev)
        self.v = torch.zeros(n, dtype=torch.float64, device=dev)
        self.t = 0
        self.row_k = torch.tensor(p.row_cons, dtype=torch.long, device=dev)[p.row_con] if p.row_cons else \
            torch.zeros(0, dtype=torch.long, device=dev)
        self.diag_k = torch.tensor(p.diag_cons, dtype=torch.long, device=dev)[p.diag_con] if p.diag_cons else \
            torch.zeros(0, dtype=torch.long, device=dev)
        self.dir_chunks = [torch.zeros_like(ch.anchor) for ch in p.chunks]
        self.dir_pieces = torch.zeros_like(p.piece_anchor)
        self.dir_diag = torch.zeros_like(p.diag_anchor)
        self._dot = torch.zeros(n, device=dev)
        self.recover_direction = False
        """Set after a resume whose direction buffer was saved under another layout: rebuilt from the weights."""

    # ---- pre-step: this rank's part of sum g . c'/n' per layer (no collective) ----------------------------------
    @torch.no_grad()
    def accumulate(self, ws: list[torch.Tensor], gs: list[torch.Tensor | None], reduce=None) -> None:
        """Add this rank's g . direction for the fragments with a gradient now (a sharded optimizer with several
        groups hands them in group by group; a fragment without one is skipped). Call it at the first firing of an
        update before any group has stepped (the weights are then all pre-update)."""
        p = self.p
        if self.t == 0:
            return  # no previous displacement yet: the first update sets gamma to init
        if self.recover_direction:
            self._direction_from_weights(ws, reduce)
        rows = torch.zeros(p.num_rows, device=p.device)
        for ch, d in zip(p.chunks, self.dir_chunks):
            have = [gs[i] is not None for i, _, _ in ch.blocks]
            if not any(have):
                continue
            m, _ = p.scratch_blocks(ch)
            torch.cat(p.chunk_views(ch, [g if g is not None else w for g, w in zip(gs, ws)]), out=m)
            dots = m.mul_(d).sum(1)
            if not all(have):
                dots *= torch.cat([torch.full((r,), float(h), device=p.device)
                                   for (_, _, r), h in zip(ch.blocks, have)])
            rows.index_add_(0, ch.rows, dots)
        if p.pieces:
            g = torch.cat(p.piece_views([g if g is not None else w for g, w in zip(gs, ws)])) * self.dir_pieces
            if any(gs[i] is None for i, _, _ in p.pieces):
                g *= torch.cat([torch.full((e - s,), float(gs[i] is not None), device=p.device)
                                for i, s, e in p.pieces])
            rows.index_add_(0, p.piece_rows, p.piece_sums(g))
        self._dot.index_add_(0, self.row_k, rows)
        if p.diag:
            _, _, denom = p.diag_values(ws)
            g = torch.cat([gs[i] if gs[i] is not None else torch.zeros_like(ws[i]) for i in p.diag])
            # BatchNorm: the radius lives in effective-scale space d = w / denom, so dL/dd = dL/dw * denom
            self._dot.index_add_(0, self.diag_k, g * denom * self.dir_diag)

    # ---- post-step: one reduce, radius update, projection -----------------------------------------------------
    @torch.no_grad()
    def project(self, ws: list[torch.Tensor], reduce) -> int:
        """Row norms of c = W~ - W0 and the accumulated dot products in ONE reduce; update gamma; store c/n as the
        next direction; project onto gamma. Returns the rows (and diagonal elements) clipped."""
        p = self.p
        row_part = row_partials(p, ws, True, False)[0]
        _, d, _ = p.diag_values(ws)
        diag_abs = torch.zeros(p.diag_total, device=p.device).index_copy_(0, p.diag_index, (d - p.diag_anchor).abs())
        measure_unit = self.t == 0 and self.s.scale == "layer"
        parts = [row_part, diag_abs, self._dot] + (self._anchor_partials() if measure_unit else [])
        totals, averaged = reduce(torch.cat(parts), p.running_vars())
        p.write_running_vars(averaged)
        R, E, n = p.num_rows, p.diag_total, len(p.cons)
        row_l1, diag_l1, dot = totals[:R], totals[R:R + E], totals[R + E:R + E + n]
        if measure_unit:
            self._set_unit(totals[R + E + n:R + E + n + R], totals[R + E + n + R:])
        self._dot.zero_()
        self.t += 1
        self._update_gamma(row_l1, diag_l1, dot)
        radius = self.gamma.float()
        scale = radial_scales(row_l1, radius[self.row_k])
        inv_n = 1.0 / (row_l1 + NORM_EPS)
        self._store_direction_rows(ws, inv_n)
        clipped = int((scale < 1).sum())
        if clipped:
            rescale_rows(p, ws, scale)
        if p.diag:
            _, d, _ = p.diag_values(ws)  # with the BatchNorm variances the reduce may have averaged
            dev_d = d - p.diag_anchor
            self.dir_diag.copy_(dev_d / (dev_d.abs() + NORM_EPS))
            clipped += clip_diag(p, ws, radius[self.diag_k])
        return clipped

    def _anchor_partials(self) -> list[torch.Tensor]:
        """This rank's part of every row's ||W0_r||_1 and its |d0| elements (the reduce adds up the ranks)."""
        p = self.p
        rows = torch.zeros(p.num_rows, device=p.device)
        for ch in p.chunks:
            rows.index_add_(0, ch.rows, ch.anchor.abs().sum(1))
        if p.pieces:
            rows.index_add_(0, p.piece_rows, p.piece_sums(p.piece_anchor.abs()))
        diag = torch.zeros(p.diag_total, device=p.device).index_copy_(0, p.diag_index, p.diag_anchor.abs())
        return [rows, diag]

    def _set_unit(self, rows: torch.Tensor, diag: torch.Tensor) -> None:
        """u_j = ||W0_j||_MARS of every learned layer (1 where it is zero: no scale to measure in)."""
        p = self.p
        unit = torch.zeros(len(p.cons), dtype=torch.float64, device=p.device)
        if p.row_cons:
            unit[p.row_cons] = torch.segment_reduce(rows, "max", lengths=p.row_lengths).double()
        if p.diag_cons:
            unit[p.diag_cons] = torch.segment_reduce(diag, "max", lengths=p.diag_lengths).double()
        self.unit = torch.where(self.learned & (unit > 0), unit, torch.ones_like(unit))

    def _update_gamma(self, row_l1: torch.Tensor, diag_l1: torch.Tensor, dot: torch.Tensor) -> None:
        p, s = self.p, self.s
        n = len(p.cons)
        top = torch.zeros(n, dtype=torch.float64, device=p.device)  # max_r n_r per layer (the upper clip)
        if p.row_cons:
            top[p.row_cons] = torch.segment_reduce(row_l1 + NORM_EPS, "max", lengths=p.row_lengths).double()
        if p.diag_cons:
            top[p.diag_cons] = torch.segment_reduce(diag_l1 + NORM_EPS, "max", lengths=p.diag_lengths).double()
        if self.t == 1:
            new = s.init_radius * self.unit
        else:
            g = dot.double()
            g = torch.where(g > 0, g * s.k, g) * self.unit  # d loss / d rho_j (u_j = 1: the reference, bit for bit)
            m = s.beta1 * self.m + (1 - s.beta1) * g
            v = s.beta2 * self.v + (1 - s.beta2) * g * g
            self.m = torch.where(self.learned, m, self.m)
            self.v = torch.where(self.learned, v, self.v)
            m_hat = m / (1 - s.beta1 ** self.t)
            v_hat = v / (1 - s.beta2 ** self.t)
            new = self.gamma - self.unit * (s.lr * m_hat / (v_hat.sqrt() + s.eps))
            new = torch.minimum(torch.maximum(new, torch.full_like(new, NORM_EPS)), top)
        self.gamma = torch.where(self.learned, new, self.fixed)

    def _direction_from_weights(self, ws, reduce) -> None:
        """c'/n' from the projected weights W = W0 + min(1, gamma/n') c': per row (W - W0) / min(||W - W0||_1 +
        1e-8, gamma_prev): exact in exact arithmetic for clipped and free rows alike; in float32 it is as good as
        W - W0 resolves the displacement (not at all for a radius at its 1e-8 floor). One extra reduce, once."""
        p = self.p
        row_part = row_partials(p, ws, True, False)[0]
        totals, _ = reduce(row_part, torch.zeros(0, device=p.device))
        radius = self.gamma.float()
        self._store_direction_rows(ws, 1.0 / torch.minimum(totals + NORM_EPS, radius[self.row_k]))
        if p.diag:
            _, d, _ = p.diag_values(ws)
            dev_d = d - p.diag_anchor
            self.dir_diag.copy_(dev_d / torch.minimum(dev_d.abs() + NORM_EPS, radius[self.diag_k]))
        self.recover_direction = False

    def _store_direction_rows(self, ws, inv_n: torch.Tensor) -> None:
        p = self.p
        p.bind(ws)
        for ch, d in zip(p.chunks, self.dir_chunks):
            torch.cat(p.chunk_views(ch), out=d)
            d.sub_(ch.anchor).mul_(inv_n[ch.rows].unsqueeze(1))
        if p.pieces:
            self.dir_pieces.copy_(p.piece_deviation(ws) * inv_n[p.piece_elem_row])

    # ---- reading and checkpoints ------------------------------------------------------------------------------
    def radii(self) -> list[float]:
        """The current radius of every constraint (packing order; inf where not projected). One host sync."""
        return self.gamma.tolist()

    def sync_radii(self) -> None:
        """Write the learned radii into the constraints (what measure / logs / the model card read)."""
        for c, r, learned in zip(self.p.cons, self.radii(), self.learned.tolist()):
            if learned:
                c.radius = r

    def state_dict(self) -> dict:
        """Replicated part (identical on every rank): radii, Adam moments, update count, units."""
        return {"gamma": self.gamma.cpu(), "m": self.m.cpu(), "v": self.v.cpu(), "t": self.t,
                "names": [c.name for c in self.p.cons], "scale": self.s.scale, "unit": self.unit.cpu()}

    def load_state_dict(self, state: dict) -> None:
        names = [c.name for c in self.p.cons]
        if state["names"] != names:
            raise ValueError(f"learned radii in the checkpoint are for {len(state['names'])} layers "
                             f"({state['names'][:2]}...), this run constrains {len(names)} ({names[:2]}...)")
        saved = state.get("scale", "reference")  # checkpoints from before the setting: absolute units
        if saved != self.s.scale:
            raise ValueError(f"learned radii in the checkpoint were learned with constraint.ftp.scale={saved!r}, "
                             f"this run has {self.s.scale!r}: set constraint.ftp.scale={saved} to resume it")
        dev = self.p.device
        self.gamma, self.m, self.v = (state[k].to(dev, torch.float64) for k in ("gamma", "m", "v"))
        if "unit" in state:
            self.unit = state["unit"].to(dev, torch.float64)
        self.t = int(state["t"])
        self.sync_radii()

    def _stores(self):
        return self.dir_chunks, self.dir_pieces, self.dir_diag

    def direction_fragments(self) -> list[tuple[str, int, torch.Tensor]]:
        """This rank's direction buffer as (parameter name, offset in the flattened parameter, values): readable
        under any other layout (another world size cuts the parameters elsewhere)."""
        p = self.p
        return [(p.cons[p.con_of[i]].name, p.offsets[i], p.read_fragment(i, self._stores()).cpu())
                for i in range(p.n) if p.numels[i]]

    def load_directions(self, saved) -> bool:
        """Fill this rank's direction from saved `direction_fragments` lists (an iterable, e.g. one per saving rank,
        read lazily; stops once every element is found). True when complete; otherwise nothing is written."""
        p = self.p
        mine: dict[str, list[int]] = {}
        for i in range(p.n):
            if p.numels[i]:
                mine.setdefault(p.cons[p.con_of[i]].name, []).append(i)
        values = {i: torch.zeros(p.numels[i]) for ids in mine.values() for i in ids}
        found = dict.fromkeys(values, 0)
        for fragments in saved:
            for name, offset, t in fragments:
                for i in mine.get(name, ()):
                    lo, hi = max(offset, p.offsets[i]), min(offset + t.numel(), p.offsets[i] + p.numels[i])
                    if lo < hi:
                        values[i][lo - p.offsets[i]:hi - p.offsets[i]] = t[lo - offset:hi - offset]
                        found[i] += hi - lo
            if all(found[i] >= p.numels[i] for i in found):
                break
        if any(found[i] != p.numels[i] for i in found):
            return False
        for i, v in values.items():
            p.write_fragment(i, v, self._stores())
        return True
