"""Which parameters are constrained, how, and with which radius — found from the module types, not names.

Policy (documented in docs/constraints.md):
- Conv1d/2d/3d (incl. depthwise: one row per output channel) and Linear (incl. fused qkv) weights: "matrix".
- The classifier head (module names given by the caller, found from the model itself): "head", around zero.
- BatchNorm weights: "bn" (effective scale, eps_ref). LayerNorm / GroupNorm / RMSNorm weights: "norm"
  (diagonal layer, clipped elementwise) when `norm_layers="clip"`.
- pos_embed / cls_token / dist_token / nn.Embedding: "embed", elementwise clip when `embeddings="clip"`; by default
  unconstrained (they are not layers of the bound).
- Biases (and BN/LN beta): never.
- `groups`: (fnmatch pattern, radius or None) pairs checked first, in order; None leaves the parameter free.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

from torch import nn

from mars_dist.constraints.methods import layer_action
from mars_dist.constraints.methods import method as method_named
from mars_dist.constraints.rules import Constraint

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_EMBED_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "position_embeddings", "mask_token")


def _role_of(module: nn.Module, pname: str, module_name: str, head_modules: Sequence[str]) -> str | None:
    if pname != "weight":
        return None
    in_head = any(module_name == h or module_name.startswith(h + ".") for h in head_modules)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return "head" if in_head else "matrix"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, _NORM_TYPES) or type(module).__name__ in ("LayerNorm2d", "RmsNorm", "RMSNorm"):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embed"
    return None


def select_constraints(model: nn.Module, head_modules: Sequence[str], method: str, radius: float,
                       head_radius: float, penalty: float = 0.0, head_penalty: float = 0.0,
                       groups: Sequence[tuple[str, float | None]] = (), norm_layers: str = "clip",
                       embeddings: str = "none", bn_eps: float = 1e-6) -> list[Constraint]:
    """Build one Constraint per constrained parameter of `model`, in `named_parameters()` order.

    Must be called on the model holding its PRETRAINED weights (BatchNorm anchors copy the running variance).
    Method "none" still returns every layer (action "none") so plain fine-tuning is measured the same way.
    """
    declared = method_named(method)
    norm = declared.norm
    if not head_modules:
        raise ValueError("no classifier head module given: the head must be constrained around zero")
    roles: dict[str, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            role = _role_of(module, pname, module_name, head_modules)
            if role is None and pname in _EMBED_NAMES:
                role = "embed"
            if role is not None:
                roles[full] = (role, module)
    found_head = any(r == "head" for r, _ in roles.values())
    if not found_head:
        raise ValueError(f"classifier head {list(head_modules)} has no Linear/Conv weight to constrain")

    out = []
    for name, param in model.named_parameters():
        if name not in roles or not param.requires_grad:
            continue
        role, module = roles[name]
        if role == "norm" and norm_layers == "none" or role == "embed" and embeddings == "none":
            continue
        r = head_radius if role == "head" else radius
        # learned: matrices, norm layers, embeddings. Fixed, as in MARS-PGM: the head (head_radius, around zero) and
        # BatchNorm effective scales (radius): a learned radius starts at 1e-8, and an effective scale pinned that
        # close to its anchor ties the BN weight to the moving running variance (measured: BN in train mode then
        # collapses to chance accuracy within an epoch)
        learned = declared.learned and role not in ("head", "bn")
        matched = next((g for g in groups if fnmatch.fnmatchcase(name, g[0])), None)
        if matched is not None:
            learned = False  # a group's number is a fixed radius, also under a learned-radius method
            r = matched[1]
            if r is None:
                continue
        shape = full_shape(param)
        if math.prod(shape) == 0:
            raise ValueError(f"parameter {name!r} has shape {shape} (no elements): nothing to constrain; a model "
                             f"partitioned by ZeRO-3 must carry its full shape in `ds_shape`")
        c = Constraint(name=name, shape=shape, role=role, action=layer_action(declared, role), norm=norm,
                       radius=float(r),
                       weight=head_penalty if role == "head" else penalty, bn_eps=bn_eps, learned=learned)
        if role == "bn":
            if module.running_var is None:
                continue  # track_running_stats=False: no effective scale to constrain
            c.running_var = module.running_var
            c.running_var0 = module.running_var.detach().clone()
        out.append(c)
    return out


def full_shape(param) -> tuple[int, ...]:
    """The parameter's whole shape, also when ZeRO-3 has partitioned it (then `param.shape` is (0,) and the true
    shape is `ds_shape`); the math must never see a partitioned shape."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def summary(constraints: Sequence[Constraint]) -> dict:
    """Counts per role, for the run's log and the resolved-selection file."""
    counts: dict[str, int] = {}
    for c in constraints:
        counts[c.role] = counts.get(c.role, 0) + 1
    return {"count": len(constraints), "by_role": counts,
            "parameters": sum(c.numel for c in constraints)}


def rebind_running_vars(constraints: Sequence[Constraint], model: nn.Module) -> None:
    """Point BN constraints at the running_var buffers of `model` (after a wrapper replaced or moved them)."""
    buffers = dict(model.named_buffers())
    for c in constraints:
        if c.role == "bn":
            key = c.name.rsplit(".", 1)[0] + ".running_var"
            if key in buffers:  # exact name first: "bn2.running_var" must not match "blocks.1.0.bn2.running_var"
                c.running_var = buffers[key]
                continue
            found = [buf for k, buf in buffers.items() if k.endswith("." + key) or key.endswith("." + k)]
            if len(found) != 1:
                raise KeyError(f"running_var of {c.name}: {len(found)} buffers of the wrapped model match {key!r}")
            c.running_var = found[0]
