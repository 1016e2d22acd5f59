"""FSDP2 resumed under another world size through torch.distributed.checkpoint (issue #10):

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_reshard_worker.py OUT save CASE
    torchrun --nproc_per_node N tests/distributed/fsdp2_reshard_worker.py OUT resume CASE   (N = 1 or 4)

`save` trains CASE uninterrupted on 2 ranks (fsdp2_worker.Run: fully_shard on a CPU mesh, AdamW, the projection
hook) and checkpoints {"model", "optim"} with DCP after update 2, as accelerate's SHARDED_STATE_DICT does. `resume`
builds the model afresh on this run's world size (anchors rebuilt from the pretrained weights, as the trainer does:
the per-rank anchors belong to the saving layout), loads the DCP checkpoint, which reshards the Shard(0) DTensors
and the optimizer state to the new mesh, and continues with the same images in every update (see `train`).
OUT/CASE_{save,resumeN}.json: anchor checksum and distance / radius after every update; OUT/CASE_{save,resumeN}.pt:
the final fp32 masters (rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_common as common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh

from fsdp2_worker import Run

SAVED_AFTER = 2  # updates


def train(run: Run, updates: range, world: int, on_update=None) -> None:
    """Every update is the mean loss over the same common.WORLD x ACCUM micro-batches as in the saving run (FSDP2
    averages over this run's ranks): with fewer ranks, rank k takes the micro-batches of saving ranks k, k + world,
    ...; with more, each saving rank's micro-batches are split image by image over world / WORLD ranks."""
    x, y = common.data()
    split = max(1, world // common.WORLD)
    mine = [r for r in range(common.WORLD) if r % world == run.rank] if split == 1 else [run.rank // split]
    part = slice(run.rank % split, None, split)  # this rank's images of each micro-batch
    common.set_train_mode(run.model, run.c["bn_mode"])
    for u in updates:
        for r in mine:
            for m in range(common.ACCUM):
                loss = F.cross_entropy(run.model(x[u, r, m][part]), y[u, r, m][part]) / (common.ACCUM * len(mine))
                loss.backward()
        run.opt.step()
        run.opt.zero_grad()
        run.record()
        if on_update:
            on_update(u)


def main() -> None:
    out, what, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    run = Run(mesh, name)
    ckpt = out / f"{name}_dcp"
    if what == "save":
        def save(u: int) -> None:
            if u == SAVED_AFTER - 1:
                dcp.save({"model": get_model_state_dict(run.model),
                          "optim": get_optimizer_state_dict(run.model, run.opt)}, checkpoint_id=ckpt)
        train(run, range(common.UPDATES), world, save)
    else:
        state = {"model": get_model_state_dict(run.model), "optim": get_optimizer_state_dict(run.model, run.opt)}
        dcp.load(state, checkpoint_id=ckpt)  # resharded from the saving world size to this one
        set_model_state_dict(run.model, state["model"])
        set_optimizer_state_dict(run.model, run.opt, state["optim"])
        train(run, range(SAVED_AFTER, common.UPDATES), world)
    result = {"world": world, "checksum": run.backend.anchor_checksum(), "ratio_master": run.log["ratio_master"],
              "clipped": run.log["clipped"]}
    tag = what if what == "save" else f"{what}{world}"
    if dist.get_rank() == 0:
        (out / f"{name}_{tag}.json").write_text(json.dumps(result))
        torch.save(run.masters, out / f"{name}_{tag}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
