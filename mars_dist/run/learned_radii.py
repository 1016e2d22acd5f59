"""Learned radii (mars-ftp) in a run: the settings from the config, and their place in checkpoints.

The math is constraints/learned.py; this module only wires it into accelerate's checkpoints:
- the radii, their Adam moments and the update count are the same on every rank: a registered checkpoint object
  (accelerate writes it once, every rank loads it);
- the previous-direction buffer is this rank's (1/N of the constrained weights): each rank writes its fragments with
  their offsets in the flattened parameters, `learned_radii_rank{r}.pt`, inside the checkpoint (before the manifest,
  so it is verified like the rest); a replicated backend (one process, DDP) only from rank 0.
Loading reads, for each of this rank's fragments, the overlapping pieces from the saved files: the same layout, or
another world size that cuts the parameters elsewhere, gets back exactly the saved values. (The buffer is our own
state, not the optimizer's; DeepSpeed's universal checkpoint does not know it.)
"""

from __future__ import annotations

from pathlib import Path

import torch


def attach(accelerator, hook, backend, register: bool = True) -> list:
    """Register the learned radii of `hook` (if any) with the accelerator's save_state / load_state. register=False:
    the caller checkpoints `learned.state_dict()` itself (the public API's handle does); only the per-rank direction
    files are written here. Returns the removable handles of the save / load hooks."""
    learned = hook.learned
    if learned is None:
        return []
    if register:
        accelerator.register_for_checkpointing(learned)
    rank = accelerator.process_index
    replicated = backend.name == "replicated"  # every rank holds the same whole buffer: rank 0 writes it

    def save(_models, _weights, output_dir) -> None:
        if rank == 0 or not replicated:
            torch.save({"fragments": learned.direction_fragments()}, Path(output_dir) / f"learned_radii_rank{rank}.pt")

    def load(_models, input_dir) -> None:
        files = sorted(Path(input_dir).glob("learned_radii_rank*.pt"), key=lambda f: int(f.stem.rsplit("rank", 1)[1]))
        if not learned.load_directions(torch.load(f, weights_only=True)["fragments"] for f in files):
            learned.recover_direction = True  # not in the checkpoint: rebuilt from the weights (approximate)
            if rank == 0:
                print(f"resume: {input_dir} does not hold the learned radii's whole direction buffer; it is rebuilt "
                      f"from the resumed weights at the next update (float32-rounded; noise for radii at the floor)")

    return [accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)]
