"""What every sharding backend provides to the projection hook (the contract; no backend logic here)."""

from __future__ import annotations

import torch

from mars_dist.constraints import Constraint, Fragment, full_shape
from mars_dist.constraints.packed import Packed


class Backend:
    """Enumerates this rank's fp32-master fragments of every constrained parameter and reduces partial sums.

    Subclasses: ReplicatedBackend (one process, DDP), and the sharded ones (ZeRO-1/2/3, FSDP2).
    """

    name = "base"
    world_size = 1
    packing: Packed | None = None
    """The packed layout of this rank's fragments and their anchors (constraints/packed.py), built once."""

    def __init__(self, constraints: list[Constraint]):
        self.constraints = constraints

    def pack(self, fragments: list[Fragment]) -> None:
        """Compute the layout once from this rank's fragments and read their anchors from the weights they hold now
        (the pretrained values: call before any update). BatchNorm running variances ride in the collective only
        where they can differ: several ranks (and the trainer switches it off for frozen statistics,
        `sync_batchnorm_statistics(False)`)."""
        anchored = [Fragment(f.constraint, f.w, f.constraint.anchor_fragment(f.w, f.offset), f.offset)
                    for f in fragments]
        self.packing = Packed(anchored, average_running_vars=self.world_size > 1)

    def sync_batchnorm_statistics(self, enabled: bool) -> None:
        """Average BatchNorm running variances across ranks at each update (BN in train mode) or not (frozen)."""
        if self.packing is not None:
            self.packing.average_running_vars = enabled and self.world_size > 1

    @property
    def anchors(self) -> list[torch.Tensor | None]:
        """This rank's anchor fragments, one flat tensor per constraint (copies out of the packed storage; None for
        the head, anchored at zero)."""
        if self.packing is None:
            return [None] * len(self.constraints)
        return [self.packing.anchor(i) for i in range(len(self.constraints))]

    # the optimizer whose step hooks fire once per real fp32 update
    def hook_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def fragments(self) -> list[Fragment]:
        """Fragments (with grads where they exist) valid inside the optimizer step hooks."""
        raise NotImplementedError

    def weight_fragments(self) -> list[Fragment]:
        """The fragments without grads (what a projection and telemetry read); a backend may cache them."""
        return self.fragments()

    def reduce(self, to_sum: torch.Tensor, to_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ONE collective: sum `to_sum`, average `to_average` over ranks."""
        raise NotImplementedError

    def begin_hook(self) -> bool:
        """Called at each firing of the inner optimizer's step hook; True when this firing completes an update
        (sharded optimizers call the inner step once per parameter group / sub-group)."""
        return True

    def stepping_mask(self) -> list[bool] | None:
        """Inside a step pre-hook: which fragments the inner optimizer steps at this firing (None = all). Sharded
        optimizers with several groups step, and hold gradients for, one group per firing."""
        return None

    # ---- the fp32 masters of EVERY trainable parameter (the weight EMA, run/ema.py) ---------------------------
    def master_tensors(self) -> list[torch.Tensor]:
        """This rank's fp32 masters of all trainable parameters, as the flat tensors the inner optimizer steps (one
        per ZeRO group / sub-group; one per parameter elsewhere). Cheap: call at every update (a checkpoint load
        may swap the tensors)."""
        raise NotImplementedError(f"the {self.name} backend does not expose its fp32 masters (weight EMA)")

    def master_layout(self) -> dict[str, tuple[int, int, int, int]]:
        """Where each trainable parameter's fragment is in `master_tensors()`: name -> (tensor index, start, numel,
        offset in the flattened parameter). numel 0 where this rank holds nothing of it. Fixed for a run."""
        raise NotImplementedError(f"the {self.name} backend does not expose its fp32 masters (weight EMA)")

    def completes_update(self) -> bool:
        """Inside a step post-hook of `hook_optimizer()`: True when this firing finished an update (sharded
        optimizers step one group / sub-group per firing; the projection runs on the last)."""
        return True

    def sync_forward_weights(self) -> None:
        """Copy projected fp32 masters into the weights forward uses, when the hook ran too late for the
        optimizer's own copy (fallback path). Nothing to do where forward uses the master itself."""

    def full_shapes(self) -> list[tuple[int, ...]]:
        """The whole shape of each constrained parameter as this backend's model holds it (not a shard's; an FSDP2
        DTensor's shape is the global one)."""
        return [full_shape(p) for p in self.params]

    def verify_coverage(self) -> None:
        """Stop before the first update if any constraint would be silently skipped: a parameter with no elements,
        a constraint shape that is not the parameter's full shape, or fragments that do not cover the parameter
        exactly once across ranks (one reduce). The error names the parameter."""
        for c, shape in zip(self.constraints, self.full_shapes()):
            if c.numel == 0 or tuple(shape) != tuple(c.shape):
                raise ValueError(f"constraint on {c.name!r}: shape {tuple(c.shape)} but the parameter's full shape is "
                                 f"{tuple(shape)}; the constraints were selected on a partitioned or different "
                                 f"model, the projection would miss it")
        local = torch.tensor([float(f.w.numel()) for f in self.fragments()], dtype=torch.float64)
        covered, _ = self.reduce(local, torch.zeros(0, dtype=torch.float64))
        for c, n in zip(self.constraints, covered.tolist()):
            if int(n) != c.numel:
                raise ValueError(f"constraint on {c.name!r}: this run's fragments cover {int(n)} of its {c.numel} "
                                 f"elements across ranks; the projection would not see the whole parameter")

    def layout(self) -> dict:
        """Backend, world size, rank and per-parameter (offset, numel) of this rank's fragments."""
        raise NotImplementedError

    def anchor_state(self) -> dict:
        """This rank's anchor fragments with their layout (one file per rank; sharded backends share this)."""
        return {"layout": self.layout(),
                "anchors": {c.name: a.clone() for c, a in zip(self.constraints, self.anchors) if a is not None}}

    def load_anchor_state(self, state: dict) -> None:
        """Restore anchor fragments saved by `anchor_state` under the SAME layout; AnchorLayoutError otherwise."""
        from mars_dist.sharding import check_anchor_layout  # the package imports this module

        check_anchor_layout(state["layout"], self.layout())
        for i, c in enumerate(self.constraints):
            if c.name in state["anchors"]:
                self.packing.set_anchor(i, state["anchors"][c.name])

    def anchor_checksum(self) -> list[float]:
        """Layout-free checksum of all anchors (sum, sum of squares, index-weighted sum), reduced over ranks."""
        frags = self.fragments()
        parts = []
        for f, anchor in zip(frags, self.anchors):
            if anchor is None:
                parts.append(torch.zeros(3, dtype=torch.float64))
                continue
            a = anchor.detach().to("cpu", torch.float64)
            idx = torch.arange(f.offset, f.offset + a.numel(), dtype=torch.float64) % 9973 + 1
            parts.append(torch.stack([a.sum(), (a * a).sum(), (a * idx).sum()]))
        buf = torch.stack(parts).sum(0) if parts else torch.zeros(3, dtype=torch.float64)
        total, _ = self.reduce(buf, torch.zeros(0, dtype=torch.float64))
        return [float(x) for x in total]
