"""The projection hook: glue between the optimizer step, the sharding backend and the pure constraint math.

It hangs on the INNER torch optimizer (the object passed to accelerate / DeepSpeed) because that object's step
hooks fire exactly once per real update — not per micro-batch, not on skipped (overflow) steps — after the fp32
update and before DeepSpeed copies fp32 -> low precision. Projecting there means the weights forward uses are
already inside the ball; no extra synchronisation is needed (docs/sharding.md, "Where the hook sits, and why").
"""

from __future__ import annotations

from mars_dist.constraints import add_penalty_grads, measure, project
from mars_dist.config import FtpConfig, SpdConfig
from mars_dist.constraints.learned import LearnedRadii
from mars_dist.constraints.spd import SelectiveDecay
from mars_dist.sharding.base import Backend


class ProjectionHook:
    """Projects (PGM) after, or adds penalty gradients (SP) before, every real optimizer update. With learned radii
    (mars-ftp) or selective decay (SPD) it also reads the gradients before the update (this rank's partial sums,
    reduced with the post-step ones in the one collective)."""

    def __init__(self, backend: Backend, ftp: FtpConfig | None = None, spd: SpdConfig | None = None):
        self.backend = backend
        self.updates = 0
        self.last_clipped = 0
        self.last_penalty = 0.0
        self._handles = []
        actions = {c.action for c in backend.constraints}
        optimizer = backend.hook_optimizer()
        self.learned = self.decay = None
        if any(c.learned for c in backend.constraints) or "decay" in actions:
            if backend.name == "gather":
                raise NotImplementedError("learned radii (mars-ftp) and SPD run on the sharded fragments only; the "
                                          "gather reference (constraint.mode: gather) is for fixed radii")
            if "decay" in actions:
                norm = next(c.norm for c in backend.constraints if c.action == "decay")
                ws = [f.w for f in backend.weight_fragments()]  # still the pretrained weights (attach time)
                self.decay = SelectiveDecay(backend.packing, (spd or SpdConfig()).strength, norm, ws)
            else:
                self.learned = LearnedRadii(backend.packing, ftp)
            self._handles.append(optimizer.register_step_pre_hook(self._read_gradients))
        if "project" in actions or "decay" in actions:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        if "penalty" in actions:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    @property
    def count_metric(self) -> str:
        """The metric `last_clipped` is logged as: rows (and diagonal elements) clipped by a projection, or layers
        decayed by SPD (a count of another thing: one name for both would mix them on a dashboard)."""
        return "constraint/layers_decayed" if self.decay is not None else "constraint/rows_clipped"

    def _after_step(self, *_args, **_kwargs) -> None:
        if not self.backend.begin_hook():
            return
        if self.learned is not None or self.decay is not None:
            ws = [f.w for f in self.backend.weight_fragments()]
            rule = self.learned.project if self.learned is not None else self.decay.apply
            self.last_clipped = rule(ws, self.backend.reduce)  # rows clipped / layers decayed
        else:
            self.last_clipped = project(self.backend.weight_fragments(), self.backend.reduce, self.backend.packing)
        self.updates += 1

    def _read_gradients(self, *_args, **_kwargs) -> None:
        # every firing: a sharded optimizer with several groups has only the stepping groups' gradients now
        frags, stepping = self.backend.fragments(), self.backend.stepping_mask()
        grads = [f.grad if stepping is None or stepping[i] else None for i, f in enumerate(frags)]
        (self.learned or self.decay).accumulate([f.w for f in frags], grads, self.backend.reduce)

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
