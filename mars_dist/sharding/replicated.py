"""No sharding: one process, or DDP where every rank holds the whole fp32 parameter (identical replicas)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mars_dist.constraints import Constraint, Fragment
from mars_dist.sharding.base import Backend


class ReplicatedBackend(Backend):
    """Fragments are whole parameters (offset 0). Partial row sums are already complete on every rank, so only the
    BatchNorm running variances are averaged (one all-reduce, and none at all without BN)."""

    name = "replicated"

    def __init__(self, constraints: list[Constraint], model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(constraints)
        self.optimizer = optimizer
        params = dict(model.named_parameters())
        missing = [c.name for c in constraints if c.name not in params]
        if missing:
            raise KeyError(f"constrained parameters not found in the model: {missing[:5]}")
        self.params = [params[c.name] for c in constraints]
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._trainable = {n: p for n, p in params.items() if id(p) in stepped}  # what the optimizer moves
        # Anchors are read from the weights as they are now (pretrained, before any update).
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.pack(self.fragments())

    def hook_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def fragments(self) -> list[Fragment]:
        if getattr(self, "_flat", None) is None or any(f.data_ptr() != p.data_ptr()
                                                       for f, p in zip(self._flat, self.params)):
            self._flat = [p.data.view(-1) for p in self.params]  # cached: rebuilt only if a parameter moved
        return [Fragment(c, w, None, 0, None if p.grad is None else p.grad.view(-1))
                for c, w, p in zip(self.constraints, self._flat, self.params)]

    def master_tensors(self) -> list[torch.Tensor]:
        return [p.data.view(-1) for p in self._trainable.values()]  # the parameters are the masters

    def master_layout(self) -> dict[str, tuple[int, int, int, int]]:
        return {n: (k, 0, p.numel(), 0) for k, (n, p) in enumerate(self._trainable.items())}

    def reduce(self, to_sum, to_average):
        if self.world_size > 1 and to_average.numel():
            to_average = to_average.clone()
            dist.all_reduce(to_average)
            to_average /= self.world_size
        return to_sum, to_average  # to_sum: every rank already holds whole rows

    def anchor_state(self) -> dict:
        return {"layout": {"backend": self.name, "world_size": 1},
                "anchors": {c.name: a for c, a in zip(self.constraints, self.anchors) if a is not None}}

    def load_anchor_state(self, state: dict) -> None:
        for i, c in enumerate(self.constraints):
            if c.name in state["anchors"]:
                self.packing.set_anchor(i, state["anchors"][c.name])
