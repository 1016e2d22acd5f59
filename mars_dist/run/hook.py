"""The projection hook: glue between the optimizer step, the sharding backend and the pure constraint math.

It hangs on the INNER torch optimizer (the object passed to accelerate / DeepSpeed) because that object's step
hooks fire exactly once per real update — not per micro-batch, not on skipped (overflow) steps — after the fp32
update and before DeepSpeed copies fp32 -> low precision. Projecting there means the weights forward uses are
already inside the ball; no extra synchronisation is needed (docs/sharding.md, "Where the hook sits, and why").
"""

from __future__ import annotations

from mars_dist.constraints import add_penalty_grads, measure, project
from mars_dist.config import FtpConfig
from mars_dist.constraints.learned import LearnedRadii
from mars_dist.sharding.base import Backend


class ProjectionHook:
    """Projects (PGM) after, or adds penalty gradients (SP) before, every real optimizer update. With learned radii
    (mars-ftp) it also reads the gradients before the update (this rank's part of each radius gradient)."""

    def __init__(self, backend: Backend, ftp: FtpConfig | None = None):
        self.backend = backend
        self.updates = 0
        self.last_clipped = 0
        self.last_penalty = 0.0
        self._handles = []
        actions = {c.action for c in backend.constraints}
        optimizer = backend.hook_optimizer()
        self.learned = None
        if any(c.learned for c in backend.constraints):
            if backend.name == "gather":
                raise NotImplementedError("learned radii (mars-ftp) run on the sharded fragments only; the gather "
                                          "reference (constraint.mode: gather) is for fixed radii")
            self.learned = LearnedRadii(backend.packing, ftp)
            self._handles.append(optimizer.register_step_pre_hook(self._read_gradients))
        if "project" in actions:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if "penalty" in actions:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def _after_step(self, *_args, **_kwargs) -> None:
        if not self.backend.begin_hook():
            return
        if self.learned is not None:
            ws = [f.w for f in self.backend.weight_fragments()]
            self.last_clipped = self.learned.project(ws, self.backend.reduce)
        else:
            self.last_clipped = project(self.backend.weight_fragments(), self.backend.reduce, self.backend.packing)
        self.updates += 1

    def _read_gradients(self, *_args, **_kwargs) -> None:
        # every firing: a sharded optimizer with several groups has only the stepping groups' gradients now
        frags, stepping = self.backend.fragments(), self.backend.stepping_mask()
        self.learned.accumulate([f.w for f in frags], [f.grad if stepping is None or stepping[i] else None
                                                       for i, f in enumerate(frags)], self.backend.reduce)

    def _before_step(self, *_args, **_kwargs) -> None:
        if not self.backend.begin_hook():
            return
        self.last_penalty = add_penalty_grads(self.backend.fragments(), self.backend.reduce, self.backend.packing)
        self.updates += 1

    def stats(self):
        """Per-layer distance / radius / layer norm (one reduce; call on logging steps, on every rank)."""
        if self.learned is not None:
            self.learned.sync_radii()  # the learned radii into the constraints, where measure reads them
        return measure(self.backend.weight_fragments(), self.backend.reduce, self.backend.packing)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
