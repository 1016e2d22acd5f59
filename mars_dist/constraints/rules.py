"""One constrained parameter: what it is, its norm, radius or penalty weight, and how its anchor is read
(semantics: docs/constraints.md, 'Semantics'). The math on this rank's fragments of ALL constrained parameters at
once lives in constraints/packed.py (layout) and constraints/engine.py (projection, penalties, telemetry).

Kinds:
- "rows":  a matrix (Linear, Conv: rows = output units = dim 0). MARS: per-row radial rescale of W - W0 so
           that ||D_r||_1 <= radius. L2: the whole tensor's Frobenius ball.
- "diag":  a diagonal layer (BatchNorm through its effective scale d = w / sqrt(running_var + eps_ref);
           LayerNorm / embeddings as w itself). Projection clips each element to within radius of its anchor,
           for both MARS and L2 PGM (the reference does so for BN).
The head is a "rows" rule whose anchor is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
    learned: bool = False
    """mars-ftp: the radius is learned during training (constraints/learned.py); `radius` then holds the latest
    learned value (written back on logging steps)."""
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
            return w.detach() / self.bn_denominator(self.running_var0, offset, w.numel())
        return w.detach().clone()

    def bn_denominator(self, var: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        """sqrt(running_var + eps_ref) on the fragment's elements: BN weights divided by it are effective scales."""
        return torch.sqrt(var.detach().flatten()[offset:offset + n].to(torch.float32) + self.bn_eps)
