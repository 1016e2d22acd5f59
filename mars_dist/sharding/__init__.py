"""The only layer that knows about DDP / DeepSpeed ZeRO / FSDP: it finds this rank's fp32-master fragments of every
constrained parameter and does the one collective per update. One dispatch point: `build_backend`."""

from __future__ import annotations

import torch
from torch import nn

from mars_dist.constraints import Constraint
from mars_dist.sharding.base import Backend
from mars_dist.sharding.replicated import ReplicatedBackend


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (AcceleratedOptimizer.optimizer), whose step hooks fire once
    per real update."""
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


def build_backend(accelerator, model: nn.Module, optimizer, constraints: list[Constraint],
                  mode: str = "sharded") -> Backend:
    """Pick the backend for how `accelerator` prepared `model` / `optimizer` (call right after prepare, before
    any update: anchors are read from the weights at that moment)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return ReplicatedBackend(constraints, accelerator.unwrap_model(model), inner_optimizer(optimizer))
    raise NotImplementedError(f"no projection backend for distributed type {kind}")


__all__ = ["Backend", "ReplicatedBackend", "build_backend", "inner_optimizer"]
