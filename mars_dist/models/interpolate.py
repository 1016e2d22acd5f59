"""WiSE-FT (Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022): the fine-tuned weights W moved
back towards the pretrained ones W0 after training, W_a = W0 + a (W - W0). Pure math on state dicts, no process
group, no files (the command is mars_dist/commands/wise.py).

Anchors, chosen so that the constraint's ball scales with a (a layer within radius r of its anchor lands within
a r of it; docs/constraints.md, "WiSE-FT"):
- backbone parameters and buffers: the pretrained value, W_a = W0 + a (W - W0);
- the new head's Linear (weight and bias): zero, W_a = a W. The paper interpolates the zero-shot head, which a new
  head does not have; zero is the head's anchor in the constraint, and scaling the whole head by a only divides
  the logits by a temperature 1/a, so the predictions are the fine-tuned head on the interpolated features;
- BatchNorm weights (role 'bn'): in the space the constraint measures, the effective scale d = w / sqrt(var +
  eps_ref), d_a = d0 + a (d - d0) with the interpolated running variance var_a, then w_a = d_a sqrt(var_a + eps_ref).
  d is not linear in (w, var), so interpolating w and var separately would not land within a r of d0;
- integer buffers (BatchNorm's num_batches_tracked): the fine-tuned value.
Every value is computed in float64 and rounded once to its dtype: a = 1 returns W bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mars_dist.constraints import Constraint


def zero_anchored(constraints: Sequence[Constraint]) -> set[str]:
    """The keys anchored at zero: the head's constrained weights and their modules' biases."""
    heads = [c.name for c in constraints if c.role == "head"]
    return set(heads) | {n.rsplit(".", 1)[0] + ".bias" for n in heads}


def interpolate(fine: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], alpha: float,
                constraints: Sequence[Constraint]) -> dict[str, torch.Tensor]:
    """W_a for every key of `fine` (parameters and buffers, keyed as the training model), anchored as the module
    docstring says. `pretrained` holds the same keys (its head values are ignored)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: WiSE-FT interpolates between the pretrained (0) and fine-tuned (1) "
                         f"weights; choose a value in [0, 1]")
    zero = zero_anchored(constraints)
    out = {}
    for key, w in fine.items():
        if not w.is_floating_point():
            out[key] = w.clone()
            continue
        if key not in zero and (key not in pretrained or pretrained[key].shape != w.shape):
            raise KeyError(f"WiSE-FT: the pretrained weights have no {key!r} of shape {tuple(w.shape)} "
                           f"(found {tuple(pretrained[key].shape) if key in pretrained else None})")
        w0 = torch.zeros_like(w, dtype=torch.float64) if key in zero else pretrained[key].double()
        out[key] = (w0 + alpha * (w.double() - w0)).to(w.dtype)
    for c in constraints:
        if c.role == "bn":
            out[c.name] = _bn_weight(c, fine, pretrained, out, alpha)
    return out


def _bn_weight(c: Constraint, fine, pretrained, interpolated, alpha: float) -> torch.Tensor:
    """w_a from the interpolated effective scale d_a = d0 + a (d - d0) and the interpolated running variance."""
    var_key = c.name.rsplit(".", 1)[0] + ".running_var"
    for where, weights in (("fine-tuned", fine), ("pretrained", pretrained)):
        if var_key not in weights:
            raise KeyError(f"WiSE-FT: the {where} weights have no {var_key} (BatchNorm {c.name})")
    scale = torch.sqrt(fine[var_key].double() + c.bn_eps)
    scale0 = torch.sqrt(pretrained[var_key].double() + c.bn_eps)
    scale_a = torch.sqrt(interpolated[var_key].double() + c.bn_eps)
    d, d0 = fine[c.name].double() / scale, pretrained[c.name].double() / scale0
    return ((d0 + alpha * (d - d0)) * scale_a).to(fine[c.name].dtype)
