"""The gather reference (config `constraint.mode: gather`): project whole parameters, for comparison only.

At each update every constrained parameter's full fp32 master is gathered on every rank (one collective per
parameter), projected whole (offset 0, nothing left to sum over ranks), and each rank writes its own part back
into the master. Every rank also holds the whole anchor. This is the obvious implementation the sharded backends
are measured against (bench/projection_bench.py): same results, N x the anchor memory, O(parameters)
communication instead of O(rows).

It wraps a sharded backend (ZeroBackend or FSDP2Backend), which provides `full_param(i)` / `write_full(i, full)`
and knows where in the optimizer step an update ends; the write-back runs right after the projection (the
backend's finishers) and before DeepSpeed copies fp32 to the low-precision weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mars_dist.constraints import Fragment, add_penalty_grads
from mars_dist.sharding.base import Backend


class GatherBackend(Backend):
    """Whole-parameter projection on gathered fp32 masters, written back shard by shard."""

    name = "gather"

    def __init__(self, sharded: Backend):
        super().__init__(sharded.constraints)
        self.sharded = sharded
        self.world_size = sharded.world_size
        self.process_group = sharded.process_group
        self._full: list[torch.Tensor] | None = None
        # Whole anchors on every rank, read from the gathered masters now (before any update).
        whole = [self.sharded.full_param(i) for i in range(len(self.constraints))]
        self.pack([Fragment(c, w, None, 0) for c, w in zip(self.constraints, whole)])
        sharded.packing = None  # the reference holds whole anchors only
        sharded.finishers.insert(0, self._write_back)
        self.phase = "pre" if any(c.action == "penalty" for c in self.constraints) else "post"
        if self.phase == "pre" and getattr(sharded, "num_groups", 1) > 1:
            raise NotImplementedError("gather mode with penalties needs one param group / ZeRO-3 sub-group")

    def hook_optimizer(self) -> torch.optim.Optimizer:
        return self.sharded.hook_optimizer()

    def master_tensors(self) -> list[torch.Tensor]:
        return self.sharded.master_tensors()

    def master_layout(self) -> dict[str, tuple[int, int, int, int]]:
        return self.sharded.master_layout()

    def completes_update(self) -> bool:
        return self.sharded.completes_update()

    def sync_forward_weights(self) -> None:
        self.sharded.sync_forward_weights()  # the masters are the sharded backend's

    def begin_hook(self) -> bool:
        if not self.sharded.begin_hook():
            return False
        self._full = [self.sharded.full_param(i) for i in range(len(self.constraints))]
        if self.phase == "pre":
            self._add_penalty_grads()
        return True

    def _add_penalty_grads(self) -> None:
        """Penalty gradients of the whole parameters; each rank adds its part to its fp32 grad fragment. (The
        ProjectionHook then evaluates the same penalty again on fragments without grads, for its value.)"""
        grads = [torch.zeros_like(w) for w in self._full]
        frags = [Fragment(c, w, None, 0, g) for c, w, g in zip(self.constraints, self._full, grads)]
        add_penalty_grads(frags, self.reduce, self.packing)
        for f, full_grad in zip(self.sharded.fragments(), grads):
            if f.grad is not None and f.w.numel():
                f.grad.add_(full_grad[f.offset:f.offset + f.w.numel()])

    def fragments(self) -> list[Fragment]:
        """Whole-parameter fragments: the copies gathered for this update inside the hook, a fresh gather
        otherwise (telemetry, checksums). Never with grads (penalty grads are added in begin_hook)."""
        full = self._full if self._full is not None else \
            [self.sharded.full_param(i) for i in range(len(self.constraints))]
        if self.phase == "pre":
            self._full = None  # the step about to run changes the weights: these copies are for this call only
        return [Fragment(c, w, None, 0, None) for c, w in zip(self.constraints, full)]

    def _write_back(self) -> None:
        if self._full is None:
            return
        if self.phase == "post":
            with torch.no_grad():
                for i, full in enumerate(self._full):
                    self.sharded.write_full(i, full)
        self._full = None

    def reduce(self, to_sum: torch.Tensor, to_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums are over whole parameters already: only the BatchNorm running variances are averaged."""
        if self.world_size > 1 and to_average.numel():
            to_average = to_average / self.world_size
            dist.all_reduce(to_average, group=self.process_group)
        return to_sum, to_average

    def anchor_checksum(self) -> list[float]:
        """As Backend's, but anchors are whole on every rank: no sum over ranks."""
        parts = []
        for a in self.anchors:
            if a is None:
                parts.append(torch.zeros(3, dtype=torch.float64))
                continue
            a = a.detach().to("cpu", torch.float64)
            idx = torch.arange(a.numel(), dtype=torch.float64) % 9973 + 1
            parts.append(torch.stack([a.sum(), (a * a).sum(), (a * idx).sum()]))
        buf = torch.stack(parts).sum(0) if parts else torch.zeros(3, dtype=torch.float64)
        return [float(x) for x in buf]

    def anchor_state(self) -> dict:
        return {"layout": {"backend": self.name, "world_size": 1},
                "anchors": {c.name: a.clone() for c, a in zip(self.constraints, self.anchors) if a is not None}}

    def load_anchor_state(self, state: dict) -> None:
        for i, c in enumerate(self.constraints):
            if c.name in state["anchors"]:
                self.packing.set_anchor(i, state["anchors"][c.name])

    def remove(self) -> None:
        self.sharded.remove()
