"""What the sharded projection costs, against the gather-everything reference, on ZeRO-3 and FSDP2 (2 processes).

    .venv/bin/python bench/projection_bench.py                 # re-launches itself with torchrun, 2 processes
    .venv/bin/python bench/projection_bench.py --batch 4 --updates 2 --models vit_small_patch16_224

For each model (random init: the cost does not depend on the weights) x backend (ZeRO-3 through deepspeed.initialize,
FSDP2 through fully_shard) x mode (sharded, gather), it runs warm-up + `--updates` real updates of AdamW on random
224 px images with MARS-PGM at a small radius (most rows clip every update: the projection's worst case), and
reports per update:
- projection time: from the first step post hook of the inner optimizer to the end of the write-back /
  low-precision re-copy (everything the projection adds to the step), mean over updates, max over ranks;
- update time: forward + backward + optimizer step including the projection;
- bytes the projection communicates per update, counted ANALYTICALLY from what is sent: sharded = one all-reduce
  of the float32 buffer (partial row sums, + BN running variances with --bn-mode train); gather = one all-gather of
  every constrained
  fp32 parameter (ZeRO-3: world * ceil(numel/world) elements; FSDP2: world * ceil(rows/world) rows) plus the same
  running-variance all-reduce. Given as payload (buffer size) and per-rank ring traffic (all-reduce moves
  2 (N-1)/N x payload per rank, all-gather (N-1)/N x payload);
- anchor memory per rank, against params x 4 / N.
Prints a table and writes bench/results/projection_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADS = {"tf_efficientnet_lite0": "classifier", "vit_small_patch16_224": "head"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"], choices=["zero3", "fsdp2"])
    ap.add_argument("--batch", type=int, default=8, help="images per rank per update")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--updates", type=int, default=3, help="measured updates (after one warm-up update)")
    ap.add_argument("--radius", type=float, default=0.05)
    ap.add_argument("--head-radius", type=float, default=0.5)
    ap.add_argument("--bn-mode", choices=["train", "eval"], default="eval",
                    help="train: BN running variances ride in the projection's collective (they differ per rank)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "projection_cpu2.json"))
    return ap.parse_args()


def relaunch(argv: list[str]) -> int:
    """Run this file under torchrun with 2 processes (1 thread each: 2 cores)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           os.environ.get("BENCH_PORT", "29637"), __file__, *argv]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def shard_fsdp2(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    blocks = model.blocks
    units = list(blocks) if not isinstance(blocks[0], type(blocks)) else [b for stage in blocks for b in stage]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def traffic(backend, constraints, world: int, mode: str, bn_train: bool) -> dict:
    """Analytic bytes of the projection's collectives per update (see the module docstring): float32 partial row
    sums of every row constraint (one per output row; the packed engine sends per-row values for L2 too), plus the
    BatchNorm running variances only when BN trains on several ranks (`bn_train`)."""
    import math

    bn_vars = sum(c.numel for c in constraints if c.role == "bn") if bn_train else 0
    rows = sum(c.num_rows for c in constraints if c.kind == "rows")
    var_payload = 4 * bn_vars
    if mode == "sharded":
        payload = 4 * rows + var_payload
        return {"payload_bytes": payload, "per_rank_bytes": 2 * (world - 1) / world * payload,
                "collectives": 1}
    sharded = backend.sharded
    gathered = 0
    for c in constraints:
        if sharded.name == "zero":
            gathered += world * math.ceil(c.numel / world) * 4
        else:
            gathered += world * math.ceil(c.shape[0] / world) * (c.numel // c.shape[0]) * 4
    return {"payload_bytes": gathered + var_payload,
            "per_rank_bytes": (world - 1) / world * gathered + 2 * (world - 1) / world * var_payload,
            "collectives": len(constraints) + (1 if bn_vars else 0)}


def measure(name: str, kind: str, mode: str, args, mesh) -> dict:
    import timm
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from mars_dist.constraints import select_constraints
    from mars_dist.run.hook import ProjectionHook
    from mars_dist.sharding import build_fsdp2_backend
    from mars_dist.sharding.gather import GatherBackend

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    constraints = select_constraints(model, [HEADS[name]], "mars-pgm", args.radius, args.head_radius)
    world = dist.get_world_size()
    if kind == "fsdp2":
        shard_fsdp2(model, mesh)  # before the optimizer: fully_shard replaces the parameters by DTensors
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "zero3":
        import deepspeed

        from mars_dist.sharding.zero import ZeroBackend

        cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
               "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
               "zero_optimization": {"stage": 3, "overlap_comm": False}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        backend = ZeroBackend(constraints, engine)
        backend = GatherBackend(backend) if mode == "gather" else backend
        net = engine

        def update(x, y):
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
    else:
        backend = build_fsdp2_backend(model, opt, constraints, mode)
        net = model

        def update(x, y):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    backend.sync_batchnorm_statistics(args.bn_mode == "train")
    # Timer: an own post hook registered BEFORE the projection hook starts it, a global post hook registered
    # AFTER the backend's (global hooks run after every own hook, in order) stops it.
    reduce, waits = backend.reduce, []

    def timed_reduce(*a):  # time inside the projection's own collective (includes waiting for the other rank)
        t = time.perf_counter()
        out = reduce(*a)
        waits.append(time.perf_counter() - t)
        return out

    backend.reduce = timed_reduce
    inner, marks = backend.hook_optimizer(), {}
    start = inner.register_step_post_hook(lambda *_: marks.__setitem__("t0", time.perf_counter()))
    hook = ProjectionHook(backend)
    stop = register_optimizer_step_post_hook(
        lambda o, *_: o is inner and marks.setdefault("spans", []).append(time.perf_counter() - marks["t0"]))
    net.train()
    g = torch.Generator().manual_seed(dist.get_rank())
    update_times = []
    for i in range(args.updates + 1):
        x = torch.randn(args.batch, 3, args.img, args.img, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        update(x, y)
        update_times.append(time.perf_counter() - t0)
    spans = marks["spans"][1:]  # drop the warm-up update
    local = torch.tensor([sum(spans) / len(spans), sum(update_times[1:]) / args.updates,
                          sum(waits[-args.updates:]) / args.updates], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    anchors = sum(a.numel() * a.element_size() for a in backend.anchors if a is not None)
    anchor_bytes = torch.tensor([anchors], dtype=torch.float64)
    dist.all_reduce(anchor_bytes, op=dist.ReduceOp.MAX)
    result = {"model": name, "backend": kind, "mode": mode, "params": n_params,
              "constrained_params": sum(c.numel for c in constraints), "constraints": len(constraints),
              "rows_clipped_last_update": hook.last_clipped, "projection_s": float(local[0]),
              "update_s": float(local[1]), "projection_fraction": float(local[0] / local[1]),
              "in_reduce_s": float(local[2]),
              "anchor_bytes_per_rank_max": int(anchor_bytes[0]), "params_x4_over_N": 4 * n_params / world,
              **traffic(backend, constraints, world, mode, args.bn_mode == "train")}
    hook.remove()
    start.remove()
    stop.remove()
    backend.remove()
    if kind == "zero3":
        engine.destroy()
    return result


def table(rows: list[dict]) -> str:
    out = ["| model | backend | projection ms/update (sharded [in all-reduce] / gather, speed-up) | fraction of update "
           "(sharded) | bytes/update payload (sharded / gather, ratio) | per-rank ring traffic ratio | "
           "anchor MB/rank (sharded / gather / params*4/N) |", "|---|---|---|---|---|---|---|"]
    for s in rows:
        if s["mode"] != "sharded":
            continue
        g = next(r for r in rows if r["mode"] == "gather" and r["model"] == s["model"]
                 and r["backend"] == s["backend"])
        out.append(
            f"| {s['model']} | {s['backend']} | {1e3 * s['projection_s']:.1f} [{1e3 * s['in_reduce_s']:.1f}] / "
            f"{1e3 * g['projection_s']:.1f} "
            f"({g['projection_s'] / s['projection_s']:.1f}x) | {100 * s['projection_fraction']:.2f}% "
            f"(update {s['update_s']:.2f} s) | {s['payload_bytes'] / 1e3:.0f} kB / {g['payload_bytes'] / 1e6:.1f} MB "
            f"({g['payload_bytes'] / s['payload_bytes']:.0f}x) | {g['per_rank_bytes'] / s['per_rank_bytes']:.0f}x | "
            f"{s['anchor_bytes_per_rank_max'] / 1e6:.2f} / {g['anchor_bytes_per_rank_max'] / 1e6:.2f} / "
            f"{s['params_x4_over_N'] / 1e6:.2f} |")
    return "\n".join(out)


def main() -> None:
    args = parse()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(relaunch(sys.argv[1:]))
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    deepspeed.init_distributed(dist_backend="gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        for kind in args.backends:
            for mode in ("sharded", "gather"):
                rows.append(measure(name, kind, mode, args, mesh))
                if dist.get_rank() == 0:
                    print(json.dumps(rows[-1]), flush=True)
    if dist.get_rank() == 0:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": "none",
                   "processes": dist.get_world_size(), "threads_per_process": torch.get_num_threads(),
                   "collectives": "gloo", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                   "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
                   "note": "a shared machine: other jobs' load makes timings vary by up to ~2x between runs"}
        report = {"machine": machine, "settings": vars(args), "results": rows, "table": table(rows)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(table(rows))
        print(f"written {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
