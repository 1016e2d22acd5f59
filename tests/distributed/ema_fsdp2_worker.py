"""The weight EMA under torch FSDP2 (2 CPU processes, gloo), one launch for several cases:

    torchrun --nproc_per_node 2 tests/distributed/ema_fsdp2_worker.py OUT_DIR CASE [CASE ...]

accelerate turns FSDP off on CPU, so this drives `fully_shard` directly (as fsdp2_worker.py does), with the EMA of
mars_dist/run/ema.py on each rank's row blocks of the fp32 masters. Writes per case: the EMA applied and gathered
(`CASE_ema.pt`), the trained weights (`CASE.pt`), the EMA's bytes on each rank against the whole fp32 model's
(`CASE.json`) and the EMA's checkpoint files (`CASE_ema/`, one per rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dist_common as common
import torch
import torch.distributed as dist
from fsdp2_worker import Run
from torch.distributed.device_mesh import init_device_mesh

from mars_dist.run.ema import WeightEma

DECAY = 0.7  # with timm's warm-up: the 4 updates all weigh


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in sys.argv[2:]:
        run = Run(mesh, name)
        whole = sum(p.numel() * 4 for p in run.model.parameters())
        ema = WeightEma(run.backend, run.model, DECAY, True)
        run.train(range(common.UPDATES))
        with ema.applied():
            averaged = {n: p.full_tensor().detach().clone() for n, p in run.model.named_parameters()}
        (out / f"{name}_ema").mkdir(exist_ok=True)
        ema.save(out / f"{name}_ema")
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"bytes": ema.bytes_per_rank(), "whole": whole, "updates": ema.updates,
                                           "fragments": sum(t.numel() * 4 for t in ema.shadow)})
        if dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(per_rank))
            torch.save(averaged, out / f"{name}_ema.pt")
            torch.save(run.masters, out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
