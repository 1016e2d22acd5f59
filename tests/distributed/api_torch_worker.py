"""A plain torch loop with the public API, no accelerate (2 CPU processes over gloo):

    torchrun --nproc_per_node 2 tests/distributed/api_torch_worker.py OUT_DIR

DDP and FSDP2 `fully_shard`, each: capture_pretrained, wrap/shard, a torch AdamW over the wrapped parameters,
mars_dist.attach, 4 updates of a global batch of 4 (2 per rank; BatchNorm frozen, so the split does not matter).
Rank 0 writes OUT_DIR/{ddp,fsdp2}.pt: the whole fp32 weights (fp32_state_dict) and the handle's worst ratio.
Also records the refusal of an optimizer built before fully_shard (it holds the parameters fully_shard replaced).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_common as common
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp2_worker import shard
from torch.distributed.device_mesh import init_device_mesh

import mars_dist

RADIUS, HEAD_RADIUS, UPDATES, PER_RANK = 0.05, 0.5, 4, 2


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(UPDATES, 2 * PER_RANK, 3, 32, 32, generator=g), torch.randint(0, 5, (UPDATES, 2 * PER_RANK),
                                                                                      generator=g)


def train_and_save(kind: str, out: Path, mesh) -> None:
    rank = dist.get_rank()
    model = common.build_model("effnet")
    pretrained = mars_dist.capture_pretrained(model)
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        shard(model, "effnet", mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=common.LR, eps=common.EPS, weight_decay=0.01)
    constrained = mars_dist.attach(model, opt, radius=RADIUS, head_radius=HEAD_RADIUS, pretrained=pretrained)
    common.set_train_mode(model, "eval")
    x, y = data()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for u in range(UPDATES):
        F.cross_entropy(model(x[u, mine]), y[u, mine]).backward()
        opt.step()
        opt.zero_grad()
    logs = constrained.log_dict()
    weights = constrained.fp32_state_dict()
    if rank == 0:
        torch.save({"weights": weights, "max_ratio": logs["bound/max_ratio"], "updates": constrained.updates,
                    "backend": constrained.backend.name}, out / f"{kind}.pt")


def optimizer_before_sharding(mesh) -> str:
    model = common.build_model("effnet")
    opt = torch.optim.AdamW(model.parameters())
    shard(model, "effnet", mesh)
    try:
        mars_dist.attach(model, opt, radius=RADIUS)
    except mars_dist.AttachError as e:
        return str(e)
    return "not refused"


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for kind in ("ddp", "fsdp2"):
        train_and_save(kind, out, mesh)
    refusal = optimizer_before_sharding(mesh)
    if dist.get_rank() == 0:
        (out / "refusal.json").write_text(json.dumps({"optimizer_before_sharding": refusal}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
