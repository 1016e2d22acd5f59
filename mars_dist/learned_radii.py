"""Learned radii (mars-ftp) in a run: the settings from the config, and their place in checkpoints.

The math is constraints/learned.py; this module only wires it into accelerate's checkpoints:
- the radii, their Adam moments and the update count are the same on every rank: a registered checkpoint object
  (accelerate writes it once, every rank loads it);
- the previous-direction buffer is this rank's (1/N of the constrained weights, the layout of its fragments): each
  rank writes `learned_radii_rank{r}.pt` inside the checkpoint (before the manifest, so it is verified like the rest).
A replicated backend (one process, DDP) holds whole tensors, so any world size reads rank 0's buffer. A sharded
backend under another layout (another world size) rebuilds the buffer from the resumed weights instead
(`LearnedRadii.recover_direction`: exact in exact arithmetic, float32-rounded in practice).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from mars_dist.constraints.learned import FtpSettings


def settings(cfg) -> FtpSettings:
    return FtpSettings(**asdict(cfg.constraint.ftp))


def _layout(backend) -> dict:
    if backend.name == "replicated":
        return {"backend": "replicated"}
    return backend.layout()


def attach(accelerator, hook, backend) -> None:
    """Register the learned radii of `hook` (if any) with the accelerator's save_state / load_state."""
    learned = hook.learned
    if learned is None:
        return
    accelerator.register_for_checkpointing(learned)
    rank = accelerator.process_index

    def save(_models, _weights, output_dir) -> None:
        torch.save(learned.rank_state(_layout(backend)), Path(output_dir) / f"learned_radii_rank{rank}.pt")

    def load(_models, input_dir) -> None:
        replicated = backend.name == "replicated"
        path = Path(input_dir) / f"learned_radii_rank{0 if replicated else rank}.pt"
        state = torch.load(path, weights_only=True) if path.exists() else None
        if state is not None and (replicated or state["layout"] == _layout(backend)):
            learned.load_rank_state(state)
        else:  # another world size: the buffer is in another layout; rebuilt from the resumed weights
            learned.recover_direction = True
            if rank == 0:
                print(f"resume: learned radii's direction buffer saved under another layout ({path.name}); it is "
                      f"rebuilt from the resumed weights at the next update (float32-exact unless a radius is at "
                      f"its 1e-8 floor)")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
