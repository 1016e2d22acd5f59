"""torch FSDP2 worker (2 CPU processes, gloo), one launch for several cases:

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_worker.py OUT_DIR [--resume CASE] CASE [CASE ...]

accelerate turns FSDP off on CPU, so this drives `fully_shard` on `init_device_mesh("cpu", (2,))` directly, with a
plain torch AdamW and build_fsdp2_backend. After every update it gathers the fp32 masters (full_tensor) and the
weights forward uses (the unsharded parameters between unshard() / reshard()). --resume CASE checkpoints that case
after update 2 with torch.distributed.checkpoint ({"model", "optim", "anchor"}) and resumes it in a fresh model.
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
from torch.distributed.fsdp import FSDPModule, fully_shard

from mars_dist.run.hook import ProjectionHook
from mars_dist.sharding import build_fsdp2_backend


def shard(model: torch.nn.Module, kind: str, mesh) -> None:
    """Blocks first, then the root (the usual FSDP2 wrapping)."""
    if kind == "hf_vit":
        blocks = model.hf_model.vit.layers
    elif kind == "hf_resnet":
        blocks = [layer for stage in model.hf_model.resnet.encoder.stages for layer in stage.layers]
    else:
        blocks = model.blocks if kind == "vit" else [b for stage in model.blocks for b in stage]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_weights(model: torch.nn.Module) -> tuple[dict, dict]:
    with torch.no_grad():
        masters = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.unshard()
        forward = {n: p.detach().clone() for n, p in model.named_parameters()}
        for m in fsdp:
            m.reshard()
    return masters, forward


class Run:
    def __init__(self, mesh, name: str):
        self.c = common.case(name)
        self.model = common.build_model(self.c["model"])
        self.pretrained = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.constraints = common.constraints_for(self.model, self.c)
        shard(self.model, self.c["model"], mesh)
        self.opt = common.make_optimizer(self.model, self.c["groups"])
        self.backend = build_fsdp2_backend(self.model, self.opt, self.constraints, self.c["mode"])
        self.hook = ProjectionHook(self.backend)
        self.rank = dist.get_rank()
        self.log: dict = {"ratio_master": [], "ratio_forward": [], "master_vs_forward": [], "clipped": []}
        self.empty_fragments = sum(f.w.numel() == 0 for f in self.backend.fragments()) \
            if self.backend.name == "fsdp2" else 0

    def train(self, updates: range, on_update=None) -> None:
        x, y = common.data()
        common.set_train_mode(self.model, self.c["bn_mode"])
        for u in updates:
            for m in range(common.ACCUM):
                loss = F.cross_entropy(self.model(x[u, self.rank, m]), y[u, self.rank, m]) / common.ACCUM
                loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.record()
            if on_update:
                on_update(u)

    def record(self) -> None:
        if self.hook.learned is not None:  # mars-ftp: ratios against the radii learned so far
            self.hook.learned.sync_radii()
        masters, forward = full_weights(self.model)
        ratios = common.max_ratios(self.constraints, masters, self.pretrained)
        self.log["ratio_master"].append(max(ratios.values(), default=0.0))
        self.log["ratio_forward"].append(max(common.max_ratios(self.constraints, forward, self.pretrained).values(),
                                             default=0.0))
        self.log["master_vs_forward"].append(max(float((masters[k] - forward[k]).abs().max()) for k in masters))
        self.log["clipped"].append(self.hook.last_clipped)
        self.masters = masters

    def summary(self) -> dict:
        stats = self.hook.stats()
        return {**self.log, "updates": self.hook.updates, "checksum": self.backend.anchor_checksum(),
                "active_layers": sum(s.frac_at_bound > 0 for s in stats if s.radius is not None),
                "empty_fragments": self.empty_fragments, "backend": self.backend.name,
                "bn_var_sums": [c.running_var.double().sum().item() for c in self.constraints if c.role == "bn"]}


def checkpoint_state(run: Run) -> dict:
    return {"model": get_model_state_dict(run.model), "optim": get_optimizer_state_dict(run.model, run.opt),
            "anchor": run.backend.anchor_dtensors()}


def resume_case(mesh, name: str, out: Path) -> tuple[dict, dict]:
    ckpt = out / f"{name}_dcp"
    first = Run(mesh, name)
    first.train(range(common.UPDATES), lambda u: u == 1 and dcp.save(checkpoint_state(first), checkpoint_id=ckpt))
    result = first.summary()
    second = Run(mesh, name)
    for i, a in enumerate(second.backend.anchors):  # copies: perturb the packed storage itself
        if a is not None:
            second.backend.packing.set_anchor(i, a + 1.0)  # so that only a real load brings them back
    state = checkpoint_state(second)
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(second.model, state["model"])
    set_optimizer_state_dict(second.model, second.opt, state["optim"])
    second.backend.load_anchor_dtensors(state["anchor"])
    result["resumed_checksum"] = second.backend.anchor_checksum()
    second.train(range(2, common.UPDATES))
    result["resumed_ratio_master"] = second.log["ratio_master"]
    if second.rank == 0:
        torch.save(second.masters, out / f"{name}_resumed.pt")
    return result, first.masters


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    resume = None
    if "--resume" in args:
        i = args.index("--resume")
        resume = args[i + 1]
        args = args[:i] + args[i + 1:]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in args:
        if name == resume:
            result, final = resume_case(mesh, name, out)
        else:
            run = Run(mesh, name)
            run.train(range(common.UPDATES))
            result, final = run.summary(), run.masters
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, result)
        if dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(per_rank))
            torch.save(final, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
