"""Resuming a run, in one place: which checkpoint, whether it can be resumed here (checked at start, before any
heavy work), and how its state is loaded — by accelerate, or through DeepSpeed's universal checkpoint when the world
size or the backend changed (sharding/zero_universal.py, sharding/zero_from_torch.py). The checks themselves are in
`checkpoint` (files, identity), `resume_guard` (settings, backend) and `elastic` (world size, data position)."""

from __future__ import annotations

import math
from pathlib import Path

from mars_dist.config import Config
from mars_dist.run import checkpoint as ckpt
from mars_dist.run import elastic, resume_guard


class ResumePlan:
    """checkpoint: the one to resume (None: a fresh run); universal: a ZeRO checkpoint of another world size;
    cross: 'from_zero' / 'to_zero' for a checkpoint of another backend (DeepSpeed <-> one process / DDP)."""

    def __init__(self, checkpoint: Path | None = None, universal: bool = False, cross: str | None = None):
        self.checkpoint, self.universal, self.cross = checkpoint, universal, cross

    @classmethod
    def check(cls, cfg: Config, accelerator, out: Path) -> ResumePlan:
        """Resolve `cfg.resume` and refuse what cannot be resumed here, naming why (a bad path fails now)."""
        checkpoint = ckpt.resolve_resume(cfg.resume, out, accelerator.print)
        if checkpoint is None:
            return cls()
        saved = ckpt.read_state(checkpoint)
        cross = resume_guard.check_backend(saved, cfg, accelerator, checkpoint)
        universal = elastic.check_world_size(saved, cfg, accelerator, checkpoint) and not cross
        return cls(checkpoint, universal, cross)

    def before_prepare(self, accelerator) -> None:
        """DeepSpeed must be told before the engine exists that it will load a universal checkpoint."""
        if self.universal or self.cross == "to_zero":
            from mars_dist.sharding import zero_universal

            zero_universal.enable(accelerator)

    def load(self, cfg: Config, accelerator, model, optimizer, identity: dict, per_epoch: int,
             total_updates: int) -> tuple[int, int, int, int]:
        """Load the checkpoint into the prepared model / optimizer (the constraint is attached: its state loads
        too). Returns (update, epoch, batch in epoch, total updates)."""
        from mars_dist.sharding import zero_from_torch, zero_universal

        saved = ckpt.read_state(self.checkpoint)
        resume_guard.check(saved, cfg, accelerator.num_processes, self.checkpoint, accelerator.print)
        ckpt.check_identity(saved, identity, self.checkpoint)
        if self.universal:  # anchors were packed from the pretrained weights at attach: rebuilt, checksum-checked
            zero_universal.load_state(accelerator, model, self.checkpoint)
        elif self.cross == "from_zero":
            zero_universal.load_state_without_deepspeed(accelerator, model, optimizer, self.checkpoint)
        elif self.cross == "to_zero":
            zero_from_torch.load_state(accelerator, model, self.checkpoint)
        else:
            accelerator.load_state(str(self.checkpoint))
        step, epoch = saved["step"], saved["epoch"]
        batch = elastic.position_for_layout(saved, cfg.train.batch_size, accelerator.num_processes,
                                            accelerator.print, identity["layout"]["global_batch"])
        if not cfg.train.max_steps and saved.get("layout", identity["layout"]) != identity["layout"]:
            # a length in epochs, counted in this layout's updates from where the epoch stands
            total_updates = step + per_epoch * (cfg.train.epochs - epoch) - math.ceil(batch / cfg.train.grad_accum)
        accelerator.print(f"resumed from {self.checkpoint} at update {step}")
        return step, epoch, batch, total_updates
