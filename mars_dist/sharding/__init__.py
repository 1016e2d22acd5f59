"""The only layer that knows about DDP / DeepSpeed ZeRO / FSDP: it finds this rank's fp32-master fragments of every
constrained parameter and does the one collective per update. One dispatch point: `build_backend` (accelerate), and
`build_fsdp2_backend` for a model sharded with torch `fully_shard` directly.

Backends: ReplicatedBackend (one process / DDP), ZeroBackend (DeepSpeed ZeRO-1/2/3, zero.py), FSDP2Backend
(fsdp2.py), GatherBackend (gather.py: the gather-everything reference, config `constraint.mode: gather`). Around
them: accelerate_setup.py (the Accelerator, how the model is built for this launch, precision, the export's state
dict), zero_init.py (whole or zero.Init construction under ZeRO-3), precision.py (BatchNorm in fp32 under DeepSpeed
bf16/fp16, fp32 masters for the export), zero_universal.py (a ZeRO checkpoint resumed under another world size
through DeepSpeed's universal checkpoint). Only these zero*.py and precision.py import deepspeed.
docs/sharding.md explains the design.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from mars_dist.constraints import Constraint
from mars_dist.sharding.base import Backend
from mars_dist.sharding.masters import PretrainedWeights
from mars_dist.sharding.replicated import ReplicatedBackend

MODES = ("sharded", "gather")


class AnchorLayoutError(ValueError):
    """A saved per-rank anchor state does not match this run's sharding layout (world size, stage, offsets).
    The caller should rebuild the anchors from the pretrained weights instead (layout-free, checksum-checked)."""


def check_anchor_layout(saved: dict, current: dict, source: str = "anchor state") -> None:
    """Raise AnchorLayoutError naming the first difference between two layout dicts."""
    for key in sorted(set(saved) | set(current)):
        if key == "params":
            continue
        if saved.get(key) != current.get(key):
            raise AnchorLayoutError(f"{source} was saved with {key}={saved.get(key)!r}, this run has "
                                    f"{key}={current.get(key)!r}: the per-rank anchor fragments cannot be loaded "
                                    f"under another layout; rebuild the anchors from the pretrained weights instead")
    sp, cp = saved.get("params", {}), current.get("params", {})
    for name in list(cp) + [n for n in sp if n not in cp]:
        if sp.get(name) != cp.get(name):
            raise AnchorLayoutError(f"{source}: parameter {name!r} has (offset, numel)={sp.get(name)!r} there and "
                                    f"{cp.get(name)!r} in this run (another sharding layout or model); rebuild the "
                                    f"anchors from the pretrained weights instead")


_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def named_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by the unwrapped model's names (drops DDP `module.`, torch.compile `_orig_mod.` and activation
    checkpoint wrapper prefixes), the names `select_constraints` recorded."""
    out = {}
    for name, p in module.named_parameters():
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        out[name.removeprefix("module.")] = p
    return out


def weak_callable(fn: Callable) -> Callable:
    """`fn` without keeping its object alive (global hooks outlive engines built and dropped in one process)."""
    if not hasattr(fn, "__self__"):
        return fn
    ref = weakref.WeakMethod(fn)

    def call(*args, **kwargs):
        method = ref()
        return None if method is None else method(*args, **kwargs)

    return call


def register_after_step_hook(optimizer: torch.optim.Optimizer, fn: Callable[[], None]):
    """Run `fn()` after every step of `optimizer`, AFTER all of its own step post hooks (the projection).

    torch runs an optimizer's own post hooks first and the global ones after them, so a global hook filtered on
    this optimizer is the one place that sees the projected weights before the caller (DeepSpeed) continues.
    Returns the removable handle. Holds `optimizer` and a bound `fn`'s object weakly.
    """
    opt_ref, call = weakref.ref(optimizer), weak_callable(fn)

    def hook(opt, _args, _kwargs):
        if opt is opt_ref():
            call()

    return register_optimizer_step_post_hook(hook)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (AcceleratedOptimizer.optimizer), whose step hooks fire once
    per real update."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"constraint.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def build_fsdp2_backend(model: nn.Module, optimizer, constraints: list[Constraint],
                        mode: str = "sharded") -> Backend:
    """Backend for a model sharded with torch FSDP2 `fully_shard` (Shard(0) DTensor parameters) and a plain torch
    optimizer over them. Call after sharding and before the first update (anchors are read then)."""
    from mars_dist.sharding.fsdp2 import FSDP2Backend
    from mars_dist.sharding.gather import GatherBackend

    _check_mode(mode)
    backend = FSDP2Backend(constraints, model, inner_optimizer(optimizer))
    backend.verify_coverage()
    return GatherBackend(backend) if mode == "gather" else backend


def build_replicated_backend(model: nn.Module, optimizer, constraints: list[Constraint]) -> Backend:
    """One process or DDP (`model` unwrapped): every rank holds whole fp32 parameters."""
    backend = ReplicatedBackend(constraints, model, inner_optimizer(optimizer))
    backend.verify_coverage()
    return backend


def build_zero_backend(engine, constraints: list[Constraint], mode: str = "sharded",
                       pretrained: PretrainedWeights | None = None) -> Backend:
    """A DeepSpeedEngine (ZeRO-1/2/3): `pretrained` is written into its fp32 masters first (required in bf16/fp16)."""
    from mars_dist.sharding.gather import GatherBackend
    from mars_dist.sharding.zero import ZeroBackend

    _check_mode(mode)
    backend = ZeroBackend(constraints, engine, pretrained)
    backend.verify_coverage()
    return GatherBackend(backend) if mode == "gather" else backend


def build_backend(accelerator, model: nn.Module, optimizer, constraints: list[Constraint],
                  mode: str = "sharded", pretrained: PretrainedWeights | None = None) -> Backend:
    """Pick the backend for how `accelerator` prepared `model` / `optimizer` (call right after prepare, before
    any update: anchors are read from the weights at that moment).

    mode 'sharded' projects this rank's fragments of the fp32 masters with one all-reduce of partial row sums;
    'gather' is the reference that gathers every constrained parameter (sharded setups only; replicated setups hold
    whole parameters already, so both modes are the same there).
    pretrained: the weights as loaded, captured before prepare (`PretrainedWeights.capture`). Under DeepSpeed they
    are written into the fp32 masters first (its bf16/fp16 modes build the masters from a rounded copy; required
    there); elsewhere the parameters never left fp32 and it is not needed.
    """
    from accelerate.utils import DistributedType

    _check_mode(mode)
    kind = accelerator.distributed_type
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return build_replicated_backend(accelerator.unwrap_model(model), optimizer, constraints)
    if kind == DistributedType.DEEPSPEED:
        return build_zero_backend(model, constraints, mode, pretrained)  # the DeepSpeedEngine accelerate returned
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise NotImplementedError(f"FSDP version {version}: only FSDP2 (fsdp_version: 2 in the accelerate config) "
                                      f"is supported; FSDP1 flattens parameters and cuts rows (use fsdp_version: 2)")
        return build_fsdp2_backend(model, optimizer, constraints, mode)
    raise NotImplementedError(f"no projection backend for distributed type {kind}")


__all__ = ["AnchorLayoutError", "Backend", "MODES", "PretrainedWeights", "ReplicatedBackend", "build_backend",
           "build_fsdp2_backend", "build_replicated_backend", "build_zero_backend",
           "check_anchor_layout", "inner_optimizer", "named_parameters", "register_after_step_hook",
           "weak_callable"]
