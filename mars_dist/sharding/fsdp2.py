"""torch FSDP2 (`fully_shard`): parameters are fp32 DTensors sharded by rows (Shard(0)).

`p.to_local()` is this rank's block of whole rows of the fp32 master (MixedPrecisionPolicy casts only at the
all-gather), so a fragment starts at row `global_offset[0]` and holds whole rows; uneven splits give ranks one row
more or less, and a rank may hold no row at all (e.g. a (1, 17, C) position embedding on rank 1). The plain torch
optimizer steps the DTensors once per update: its step post hook sees final fp32 values and the next forward
all-gathers them, so projecting there needs no extra synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mars_dist.constraints import Constraint, Fragment
from mars_dist.constraints.selection import rebind_running_vars
from mars_dist.sharding import named_parameters, register_after_step_hook
from mars_dist.sharding.base import Backend


class FSDP2Backend(Backend):
    """Row blocks of FSDP2-sharded fp32 masters; one all-reduce of partial sums per update."""

    name = "fsdp2"

    def __init__(self, constraints: list[Constraint], model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(constraints)
        self.optimizer = optimizer
        params = named_parameters(model)
        missing = [c.name for c in constraints if c.name not in params]
        if missing:
            raise KeyError(f"constrained parameters not found in the FSDP2 model: {missing[:5]}")
        self.params = [params[c.name] for c in constraints]
        meshes = set()
        self.offsets = []
        for c, p in zip(constraints, self.params):
            if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(f"{c.name}: expected a DTensor sharded Shard(0) on a 1-D mesh (fully_shard "
                                          f"every module that holds a constrained parameter); got {type(p).__name__} "
                                          f"{getattr(p, 'placements', '')}")
            meshes.add(p.device_mesh)
            _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            self.offsets.append(global_offset[0] * (c.numel // c.shape[0]))
        if len(meshes) > 1:
            raise NotImplementedError("constrained parameters live on different device meshes")
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        orphans = [c.name for c, p in zip(constraints, self.params) if id(p) not in stepped]
        if orphans:  # fully_shard replaces the parameters: an optimizer built before it steps the old tensors
            raise ValueError(f"the optimizer does not hold the sharded parameters {orphans[:3]}: create it after "
                             f"fully_shard(model)")
        self._trainable = {n: p for n, p in params.items() if id(p) in stepped}
        self.mesh = meshes.pop() if meshes else None
        self.process_group = self.mesh.get_group() if self.mesh is not None else None
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        rebind_running_vars(constraints, model)
        self.pack(self.fragments())
        self.phase = "pre" if any(c.action == "penalty" for c in constraints) else "post"
        self.finishers: list = []
        self._finish_pending = False
        self._handle = register_after_step_hook(optimizer, self._after_projection)

    def hook_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local().detach().reshape(-1)  # a view: to_local of the parameter is the master itself

    def fragments(self) -> list[Fragment]:
        return [Fragment(c, self._local(p), None, off, None if p.grad is None else self._local(p.grad))
                for c, p, off in zip(self.constraints, self.params, self.offsets)]

    def master_tensors(self) -> list[torch.Tensor]:
        return [self._local(p) if isinstance(p, DTensor) else p.detach().reshape(-1) for p in self._trainable.values()]

    def master_layout(self) -> dict[str, tuple[int, int, int, int]]:
        out = {}
        for k, (n, p) in enumerate(self._trainable.items()):
            offset = 0
            if isinstance(p, DTensor):
                _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                offset = global_offset[0] * (p.numel() // p.shape[0]) if p.dim() else 0
            out[n] = (k, 0, self._local(p).numel() if isinstance(p, DTensor) else p.numel(), offset)
        return out

    def reduce(self, to_sum: torch.Tensor, to_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.params[0].device if self.params else to_sum.device  # NCCL needs the GPU
        buf = torch.cat([to_sum.to(device), to_average.to(device) / self.world_size])
        if buf.numel():
            dist.all_reduce(buf, group=self.process_group)
        return buf[:to_sum.numel()], buf[to_sum.numel():]

    def begin_hook(self) -> bool:
        self._finish_pending = True  # one optimizer step per update: every firing completes one
        return True

    def _after_projection(self) -> None:
        if self._finish_pending:
            self._finish_pending = False
            for fn in self.finishers:
                fn()

    # ---- gather reference support (gather.py) ----------------------------------------------------------------
    def full_param(self, i: int) -> torch.Tensor:
        """The whole fp32 master of constraint i, flattened, in a fresh buffer (an all-gather)."""
        with torch.no_grad():
            return self.params[i].full_tensor().reshape(-1)

    def write_full(self, i: int, full: torch.Tensor) -> None:
        local = self._local(self.params[i])
        local.copy_(full[self.offsets[i]:self.offsets[i] + local.numel()])

    # ---- anchors in checkpoints --------------------------------------------------------------------------------
    def layout(self) -> dict:
        return {"backend": self.name, "world_size": self.world_size, "rank": self.rank,
                "params": {c.name: [off, self._local(p).numel()]
                           for c, p, off in zip(self.constraints, self.params, self.offsets)}}


    def anchor_dtensors(self) -> dict[str, DTensor]:
        """The anchors as Shard(0) DTensors (copies of the packed anchors), for torch.distributed.checkpoint
        ({"model", "optim", "anchor": this}); DCP can reshard to another world size. After a DCP load, pass the
        same dict to `load_anchor_dtensors`."""
        out = {}
        for c, p, a in zip(self.constraints, self.params, self.anchors):  # copies: loaded back by name below
            if a is not None:
                local = a.view(p.to_local().shape)
                out[c.name] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride())
        return out

    def load_anchor_dtensors(self, anchors: dict[str, DTensor]) -> None:
        """Copy anchors loaded by DCP (a no-op when DCP filled the tensors of `anchor_dtensors` in place)."""
        for i, c in enumerate(self.constraints):
            if c.name in anchors:
                self.packing.set_anchor(i, anchors[c.name].to_local().reshape(-1))

    def remove(self) -> None:
        self._handle.remove()
