"""The projection hook: glue between the optimizer step, the sharding backend and the pure constraint math.

It hangs on the INNER torch optimizer (the object passed to accelerate / DeepSpeed) because that object's step
hooks fire exactly once per real update — not per micro-batch, not on skipped (overflow) steps — after the fp32
update and before DeepSpeed copies fp32 -> low precision. Projecting there means the weights forward uses are
already inside the ball; no extra synchronisation is needed (docs/distributed-notes: "Where to hook").
"""

from __future__ import annotations

from mars_dist.constraints import add_penalty_grads, measure, project
from mars_dist.sharding.base import Backend


class ProjectionHook:
    """Projects (PGM) after, or adds penalty gradients (SP) before, every real optimizer update."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.updates = 0
        self.last_clipped = 0
        self.last_penalty = 0.0
        self._handles = []
        actions = {c.action for c in backend.constraints}
        optimizer = backend.hook_optimizer()
        if "project" in actions:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if "penalty" in actions:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def _after_step(self, *_args, **_kwargs) -> None:
        if not self.backend.begin_hook():
            return
        self.last_clipped = project(self.backend.fragments(), self.backend.reduce, self.backend.packing)
        self.updates += 1

    def _before_step(self, *_args, **_kwargs) -> None:
        if not self.backend.begin_hook():
            return
        self.last_penalty = add_penalty_grads(self.backend.fragments(), self.backend.reduce, self.backend.packing)
        self.updates += 1

    def stats(self):
        """Per-layer distance / radius / layer norm (one reduce; call on logging steps, on every rank)."""
        return measure(self.backend.fragments(), self.backend.reduce, self.backend.packing)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
