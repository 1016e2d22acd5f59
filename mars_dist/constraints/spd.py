"""Selective Projection Decay (Tian, Huang, Kira, "Rethinking Weight Decay for Robust Fine-Tuning of Foundation
Models", NeurIPS 2024; reference optimizer `adamSPD.py` in GT-RIPL/Selective-Projection-Decay) on the packed layout
of constraints/packed.py: pure math, the caller hands in fragments and a reduce function.

The reference rule, per constrained tensor (its "layer"), after the optimizer produced W~ from W_t:
    c = sum(g * (W_t - W0))                  g: the gradient of this update, W_t: the weights BEFORE it
    if c > 0  (the reference: `-sum(grad * (param - pre)) < 0`):
        r = hardtanh((||W~ - W0|| - ||W_t - W0||) / ||W~ - W0||, 0, 1)
        W <- W~ - lambda * r * (W~ - W0)
    (else W <- W~). lambda is the reference's `weight_decay`; with lambda = 1 a decayed layer lands back on the
    sphere of its previous distance. ||.|| is the Frobenius norm ('spd'); 'mars-spd' uses the MARS norm (maximum
    absolute row sum; elementwise max |w - w0| for diagonal layers) in r, the rest unchanged.
The anchor W0 is the pretrained tensor in PARAMETER space (BatchNorm weights too: the reference decays the raw
parameter, not the effective scale the projections use), and zero for the new head (the reference's `pre: None`
group). A layer whose update lands exactly on W0 (||W~ - W0|| = 0) is not decayed (the reference divides by 0).

Sharding: c and the norms are sums (MARS: per-row sums, then a max), so each rank adds up its fragments' part. The
pre-update parts (c, ||W_t - W0||) are taken in the optimizer's pre-step hook (`accumulate`, no collective), the
post-update part in the post-step hook (`apply`), and all of them travel in ONE reduce, with the BatchNorm running
variances as in the projection. Every rank then computes the same per-layer factor from the same reduced sums.

State: none between updates (the reference keeps none either: its `hyper` buffer is never read), so a checkpoint
of the weights and the optimizer resumes SPD exactly.
"""

from __future__ import annotations

import torch

from mars_dist.constraints.engine import rescale_rows, row_partials
from mars_dist.constraints.packed import Packed


class SelectiveDecay:
    """Per-update buffers of the partial sums (this rank's), and the layout's per-row / per-element layer index."""

    def __init__(self, packing: Packed, strength: float, norm: str = "l2", weights: list[torch.Tensor] | None = None):
        """weights: this rank's fragments as they are now (before the first update: BatchNorm's exact anchors)."""
        if norm not in ("l2", "mars"):
            raise ValueError(f"SPD norm {norm!r}: expected 'l2' or 'mars'")
        p = self.p = packing
        self.strength, self.norm = float(strength), norm
        dev, n = p.device, len(p.cons)
        self.row_k = torch.tensor(p.row_cons, dtype=torch.long, device=dev)[p.row_con] if p.row_cons else \
            torch.zeros(0, dtype=torch.long, device=dev)
        self.diag_k = torch.tensor(p.diag_cons, dtype=torch.long, device=dev)[p.diag_con] if p.diag_cons else \
            torch.zeros(0, dtype=torch.long, device=dev)
        self.diag_anchor = self._raw_diag_anchor(weights)
        self._dot = torch.zeros(n, device=dev)
        self._pre: torch.Tensor | None = None  # pre-update distance partials, taken at the update's first firing
        self.decayed = 0
        """Layers decayed at the last update."""

    def _raw_diag_anchor(self, ws: list[torch.Tensor] | None) -> torch.Tensor:
        """The diagonal anchors in parameter space. BatchNorm's are stored as effective scales w0 / sqrt(var0 +
        eps); multiplying back recovers w0 only to ~1 ulp, and a 1-ulp W_t - W0 at the first update selects the
        layer with ratio ~1 (the reference has W_t - W0 = 0 there: no decay). So where the weights handed in are
        still the anchors (attach time: before any update, as the layout read them) their exact values are kept."""
        p = self.p
        parts, at = [], 0
        for i in p.diag:
            c, n = p.cons[p.con_of[i]], p.numels[i]
            a = p.diag_anchor[at:at + n]
            if c.role == "bn":
                now = ws[i].detach().float() if ws is not None else None
                denom = c.bn_denominator(c.running_var0, p.offsets[i], n).to(a.device)
                a = now.clone() if now is not None and torch.equal(now / denom, a) else a * denom
            parts.append(a)
            at += n
        return torch.cat(parts) if parts else p.diag_anchor

    # ---- partial sums ---------------------------------------------------------------------------------------------
    def _distance_parts(self, ws: list[torch.Tensor]) -> torch.Tensor:
        """This rank's part of every layer's ||W - W0||: l2: the sums of squares per layer; mars: the row L1 sums
        per global row, then |w - w0| per global diagonal element (each element lives on one rank)."""
        p = self.p
        d = torch.cat([ws[i] for i in p.diag]) - self.diag_anchor if p.diag else self.diag_anchor
        if self.norm == "l2":
            out = torch.zeros(len(p.cons), device=p.device)
            if p.row_cons:
                out.index_add_(0, self.row_k, row_partials(p, ws, False, True)[0])
            return out.index_add_(0, self.diag_k, d * d)
        rows = row_partials(p, ws, True, False)[0] if p.row_cons else torch.zeros(0, device=p.device)
        diag = torch.zeros(p.diag_total, device=p.device).index_copy_(0, p.diag_index, d.abs())
        return torch.cat([rows, diag])

    def _norms(self, totals: torch.Tensor) -> torch.Tensor:
        """Per layer (packing order) the norm, in float64, from the reduced distance sums."""
        p = self.p
        if self.norm == "l2":
            return totals.double().clamp_min(0).sqrt()
        out = torch.zeros(len(p.cons), dtype=torch.float64, device=p.device)
        R = p.num_rows
        if p.row_cons:
            out[p.row_cons] = torch.segment_reduce(totals[:R], "max", lengths=p.row_lengths).double()
        if p.diag_cons:
            out[p.diag_cons] = torch.segment_reduce(totals[R:], "max", lengths=p.diag_lengths).double()
        return out

    @torch.no_grad()
    def accumulate(self, ws: list[torch.Tensor], gs: list[torch.Tensor | None], reduce=None) -> None:
        """Pre-step hook, at every firing: this rank's part of sum g * (W_t - W0) for the fragments with a gradient
        now (a sharded optimizer with several groups steps, and holds gradients for, one group per firing; those
        weights are still pre-update). At the first firing of an update every weight is pre-update: the distances
        ||W_t - W0|| are taken then."""
        p = self.p
        if self._pre is None:
            self._pre = self._distance_parts(ws)
        if all(g is None for g in gs):
            return
        gs = [g if g is not None else torch.zeros_like(w) for g, w in zip(gs, ws)]
        rows = torch.zeros(p.num_rows, device=p.device)
        p.bind(ws)
        for ch in p.chunks:
            d = p.chunk_deviation(ch)  # (rows, L) in the shared scratch
            rows.index_add_(0, ch.rows, d.mul_(torch.cat(p.chunk_views(ch, gs))).sum(1))
        if p.pieces:
            prod = p.piece_deviation(ws) * torch.cat(p.piece_views(gs))
            rows.index_add_(0, p.piece_rows, p.piece_sums(prod))
        if p.row_cons:
            self._dot.index_add_(0, self.row_k, rows)
        if p.diag:
            d = torch.cat([ws[i] for i in p.diag]) - self.diag_anchor
            self._dot.index_add_(0, self.diag_k, torch.cat([gs[i] for i in p.diag]) * d)

    @torch.no_grad()
    def apply(self, ws: list[torch.Tensor], reduce) -> int:
        """Post-step hook, once per update (after the last group stepped): ||W~ - W0|| partials, ONE reduce of
        [c, pre-update distances, post-update distances, BatchNorm variances], then the decay. Returns the number
        of layers decayed."""
        p = self.p
        post = self._distance_parts(ws)
        pre = self._pre if self._pre is not None else post  # no pre-step firing: the weights did not move
        n = len(p.cons)
        totals, averaged = reduce(torch.cat([self._dot, pre, post]), p.running_vars())
        p.write_running_vars(averaged)
        dot, rest = totals[:n].double(), totals[n:]
        prev, curr = self._norms(rest[:pre.numel()]), self._norms(rest[pre.numel():])
        self._dot.zero_()
        self._pre = None
        ratio = torch.where(curr > 0, (curr - prev) / torch.where(curr > 0, curr, 1.0), 0.0).clamp(0.0, 1.0)
        decay = torch.where(dot > 0, self.strength * ratio, 0.0)  # lambda * r per layer, 0 where not selected
        self.decayed = int((decay > 0).sum())
        if self.decayed:
            self._decay(ws, decay)
        return self.decayed

    def _decay(self, ws: list[torch.Tensor], decay: torch.Tensor) -> None:
        """W <- W~ - decay (W~ - W0): rows through the projection's rescale (lerp(W0, W~, 1 - decay): a layer with
        decay 0 is untouched bit for bit), diagonal elements directly."""
        p = self.p
        if p.row_cons:
            rescale_rows(p, ws, (1.0 - decay).float()[self.row_k])
        if p.diag:
            w = torch.cat([ws[i] for i in p.diag])
            new = w - decay.float()[self.diag_k] * (w - self.diag_anchor)
            torch._foreach_copy_([ws[i] for i in p.diag], list(new.split([p.numels[i] for i in p.diag])))
