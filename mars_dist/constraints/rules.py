"""One constrained parameter and the math on its fragments (reference semantics: docs/mars-reference).

Every rule works on a flat fp32 fragment `w` of the parameter, the matching fragment `w0` of its anchor and the
fragment's `offset` in the flattened parameter. Rules with a norm over more than one fragment element expose
`slots` partial sums; the caller adds the partial sums of all fragments (identity in one process, one all-reduce
when sharded) and hands the totals back.

Kinds:
- "rows":  a matrix (Linear, Conv: rows = output units = dim 0). MARS: per-row radial rescale of W - W0 so
           that ||D_r||_1 <= radius. L2: the whole tensor's Frobenius ball.
- "diag":  a diagonal layer (BatchNorm through its effective scale d = w / sqrt(running_var + eps_ref);
           LayerNorm / embeddings as w itself). Projection clips each element to within radius of its anchor,
           for both MARS and L2 PGM (the reference does so for BN).
The head is a "rows" rule whose anchor is zero (w0 is None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mars_dist.constraints.fragments import RELATIVE_TOLERANCE, radial_scales, rescale_rows_, row_sums, row_values


@dataclass
class Constraint:
    name: str
    """Parameter name in the (unwrapped) model."""
    shape: tuple[int, ...]
    role: str
    """'matrix', 'head', 'bn', 'norm' or 'embed' (what the parameter is; decides the kind and the radius)."""
    action: str
    """'project' (PGM), 'penalty' (SP) or 'none' (measured only)."""
    norm: str = "mars"
    """'mars' or 'l2'."""
    radius: float | None = None
    weight: float = 0.0
    """Penalty weight (SP methods)."""
    running_var: torch.Tensor | None = field(default=None, repr=False)
    """BatchNorm only: the live running variance buffer (never sharded)."""
    running_var0: torch.Tensor | None = field(default=None, repr=False)
    """BatchNorm only: the pretrained running variance (defines the anchor d0)."""
    bn_eps: float = 1e-6

    @property
    def kind(self) -> str:
        return "rows" if self.role in ("matrix", "head") else "diag"

    @property
    def centered(self) -> bool:
        """False for the new head: it is constrained around zero, not around its random init."""
        return self.role != "head"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_rows(self) -> int:
        """Rows of the MARS norm: output units for matrices, elements for diagonal layers."""
        return self.shape[0] if self.kind == "rows" else self.numel

    @property
    def row_len(self) -> int:
        return self.numel // self.shape[0] if self.kind == "rows" else 1

    # ---- anchors -------------------------------------------------------------------------------------------
    def anchor_fragment(self, w: torch.Tensor, offset: int) -> torch.Tensor | None:
        """The anchor for a fragment read from the weights at the start of fine-tuning (the pretrained values,
        exactly as the optimizer's master copy holds them). BN anchors live in effective-scale space."""
        if not self.centered:
            return None
        if self.role == "bn":
            return w.detach() / self._bn_denominator(self.running_var0, offset, w.numel())
        return w.detach().clone()

    def _bn_denominator(self, var: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        return torch.sqrt(var.detach().flatten()[offset:offset + n].to(torch.float32) + self.bn_eps)

    def deviation(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int) -> torch.Tensor:
        """D = W - W0 on the fragment (in effective-scale space for BN)."""
        x = w / self._bn_denominator(self.running_var, offset, w.numel()) if self.role == "bn" else w
        return x if w0 is None else x - w0

    def scale_values(self, w: torch.Tensor, offset: int) -> torch.Tensor:
        """The layer's own values in the space of its norm (effective scale for BN), for B_j = ||W||_MARS."""
        return w / self._bn_denominator(self.running_var, offset, w.numel()) if self.role == "bn" else w

    # ---- projection (PGM) -------------------------------------------------------------------------------------
    def projection_slots(self) -> int:
        if self.action != "project" or self.radius is None:
            return 0
        if self.kind == "diag":
            return 0
        return self.num_rows if self.norm == "mars" else 1

    def projection_partial(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int) -> torch.Tensor:
        d = self.deviation(w, w0, offset)
        if self.norm == "mars":
            return row_sums(d.abs(), offset, self.row_len, self.num_rows)
        return (d * d).sum(dtype=torch.float64).reshape(1)

    def project_(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int, totals: torch.Tensor) -> int:
        """Project the fragment in place given the reduced partial sums; return the number of rows clipped here."""
        if self.action != "project" or self.radius is None or w.numel() == 0:
            return 0
        if self.kind == "diag":
            return self._clip_diag_(w, w0, offset)
        if self.norm == "mars":
            scales = radial_scales(totals, self.radius)
            rescale_rows_(w, w0, offset, self.row_len, scales)
            return int((scales < 1).sum())
        norm = float(totals.sqrt())
        if norm <= self.radius * (1 + RELATIVE_TOLERANCE):
            return 0
        scale = torch.full((1,), self.radius / norm, dtype=w.dtype, device=w.device)
        rescale_rows_(w, w0, 0, w.numel(), scale)  # the whole fragment as one "row"
        return 1

    def _clip_diag_(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int) -> int:
        lo, hi = (w0 - self.radius, w0 + self.radius) if w0 is not None else (-self.radius, self.radius)
        if self.role == "bn":
            denom = self._bn_denominator(self.running_var, offset, w.numel())
            d = w / denom
            over = (d < lo) | (d > hi)
            if over.any():
                w[over] = (torch.clamp(d, lo, hi) * denom)[over]
            return int(over.sum())
        over = (w < lo) | (w > hi)
        if over.any():
            w[over] = torch.clamp(w, lo, hi)[over]
        return int(over.sum())

    # ---- penalties (SP) ---------------------------------------------------------------------------------------
    def penalty_slots(self) -> int:
        if self.action != "penalty" or self.weight == 0:
            return 0
        return self.num_rows if (self.kind == "rows" and self.norm == "mars") else 1

    def penalty_partial(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int) -> torch.Tensor:
        d = self.deviation(w, w0, offset)
        if self.kind == "rows" and self.norm == "mars":
            return row_sums(d.abs(), offset, self.row_len, self.num_rows)
        return (d.abs().sum(dtype=torch.float64) if self.norm == "mars"
                else (d * d).sum(dtype=torch.float64)).reshape(1)

    def penalty_value(self, totals: torch.Tensor) -> float:
        """lambda * ||D||_MARS (rows), lambda * ||d - d0||_1 (diag), lambda * ||D||_F^2 (l2): no 1/2."""
        if self.kind == "rows" and self.norm == "mars":
            return self.weight * float(totals.max())
        return self.weight * float(totals.sum())

    def add_penalty_grad_(self, grad: torch.Tensor, w: torch.Tensor, w0: torch.Tensor | None, offset: int,
                          totals: torch.Tensor) -> None:
        """grad += d(penalty)/dw on the fragment (the penalty's gradient, added before the optimizer step)."""
        d = self.deviation(w, w0, offset)
        if self.kind == "rows" and self.norm == "mars":
            # d max_r ||D_r||_1 / dW = sign(D) on the arg-max row (the first one on ties), 0 elsewhere.
            pick = torch.zeros_like(totals)
            pick[int(torch.argmax(totals))] = 1.0
            g = torch.sign(d) * row_values(pick, offset, w.numel(), self.row_len)
        elif self.norm == "mars":
            g = torch.sign(d)
        else:
            g = 2.0 * d
        if self.role == "bn":  # chain rule through d = w / sqrt(var + eps)
            g = g / self._bn_denominator(self.running_var, offset, w.numel())
        grad.add_(self.weight * g.to(grad.dtype))

    # ---- telemetry -------------------------------------------------------------------------------------------
    def telemetry_partial(self, w: torch.Tensor, w0: torch.Tensor | None, offset: int) -> torch.Tensor:
        """Partial row sums of |D| and of |W| (2 * num_rows slots): distance D_j and layer norm B_j, MARS norm."""
        d = self.deviation(w, w0, offset).abs()
        v = self.scale_values(w, offset).abs()
        return torch.cat([row_sums(d, offset, self.row_len, self.num_rows),
                          row_sums(v, offset, self.row_len, self.num_rows)])
