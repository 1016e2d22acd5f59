"""An independent, deliberately naive implementation of the constraint formulas (docs/constraints.md, 'Semantics'),
used as the oracle for tests/constraints/test_constraints.py.

Whole tensors only, float64 throughout, no fragments, no tolerances, no in-place tricks: each function is the
formula as written in the paper / reference code, so that a bug in the fragment-wise library cannot be mirrored
here.
"""

from __future__ import annotations

import torch

EPS_REF = 1e-6


def _f64(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.float64) if x is None else x.detach().to(torch.float64)


def rows(x: torch.Tensor) -> torch.Tensor:
    """View a weight as (output units, everything else): rows of the MARS norm (PyTorch layout: dim 0)."""
    return x.reshape(x.shape[0], -1)


def mars_norm(x: torch.Tensor) -> float:
    """Maximum absolute row sum."""
    return float(rows(x.to(torch.float64)).abs().sum(dim=1).max())


def mars_project(w: torch.Tensor, w0: torch.Tensor | None, radius: float) -> torch.Tensor:
    """D_r <- D_r / max(1, ||D_r||_1 / gamma) for every row r, W = W0 + D (w0=None: anchor zero, the head)."""
    w64, a64 = w.detach().to(torch.float64), _f64(w0, w)
    d = rows(w64 - a64)
    out = d.clone()
    for r in range(d.shape[0]):
        out[r] = d[r] / max(1.0, float(d[r].abs().sum()) / radius)
    return a64 + out.reshape(w.shape)


def l2_project(w: torch.Tensor, w0: torch.Tensor | None, radius: float) -> torch.Tensor:
    """D <- D * min(1, gamma / ||D||_F) for the whole tensor."""
    w64, a64 = w.detach().to(torch.float64), _f64(w0, w)
    d = w64 - a64
    return a64 + d * min(1.0, radius / float(d.norm()))


def clip(w: torch.Tensor, w0: torch.Tensor | None, radius: float) -> torch.Tensor:
    """Elementwise clip to [w0 - gamma, w0 + gamma] (LayerNorm, embeddings)."""
    w64, a64 = w.detach().to(torch.float64), _f64(w0, w)
    return torch.minimum(torch.maximum(w64, a64 - radius), a64 + radius)


def bn_scale(w: torch.Tensor, var: torch.Tensor, eps: float = EPS_REF) -> torch.Tensor:
    """Effective scale of a BatchNorm layer, d = w / sqrt(running_var + eps_ref)."""
    return w.to(torch.float64) / torch.sqrt(var.to(torch.float64) + eps)


def bn_clip(w: torch.Tensor, w0: torch.Tensor, var: torch.Tensor, var0: torch.Tensor, radius: float,
            eps: float = EPS_REF) -> torch.Tensor:
    """Clip d to within gamma of d0 = w0 / sqrt(var0 + eps), return the weight w = clip(d) * sqrt(var + eps)."""
    d, d0 = bn_scale(w, var, eps), bn_scale(w0, var0, eps)
    clipped = torch.minimum(torch.maximum(d, d0 - radius), d0 + radius)
    return clipped * torch.sqrt(var.to(torch.float64) + eps)


# ---- penalties, written directly in torch so that autograd gives the reference gradient ------------------------
def mars_penalty(w: torch.Tensor, w0: torch.Tensor | None, lam: float) -> torch.Tensor:
    """lambda * ||W - W0||_MARS (differentiable in w)."""
    d = w if w0 is None else w - w0
    return lam * rows(d).abs().sum(dim=1).max()


def l2_penalty(w: torch.Tensor, w0: torch.Tensor | None, lam: float) -> torch.Tensor:
    """lambda * ||W - W0||_F^2, no 1/2."""
    d = w if w0 is None else w - w0
    return lam * (d * d).sum()


def bn_penalty(w: torch.Tensor, w0: torch.Tensor, var: torch.Tensor, var0: torch.Tensor, lam: float, norm: str,
               eps: float = EPS_REF) -> torch.Tensor:
    """lambda * ||d - d0||_1 (MARS-SP) or lambda * ||d - d0||^2 (L2-SP), through d = w / sqrt(var + eps)."""
    d = w / torch.sqrt(var + eps)
    dd = d - (w0 / torch.sqrt(var0 + eps))
    return lam * (dd.abs().sum() if norm == "mars" else (dd * dd).sum())
