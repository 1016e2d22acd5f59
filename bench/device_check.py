"""The GPU check (bench/device_check.sh runs it): one JSON with what only an accelerator can show.

    python bench/device_check.py --out OUT.json            # on the GPU machine
    python bench/device_check.py --out OUT.json --cpu      # the same end to end on the CPU (small sizes)

1. The packed projection on the device equals the CPU one (random matrices, rows cut as ZeRO would cut them).
2. Projection time per update for ViT-B and ViT-L (fp32 masters, the trainer's hook path) against a real bf16 update
   of the same model (autocast forward + backward + AdamW step): the share the projection adds (target <= 1 %).
3. DeepSpeed ZeRO-3, world size 1 over NCCL, bf16: the hooked projection keeps every layer within its radius on the
   fp32 master and within bf16 rounding in forward (skipped, with the reason, where deepspeed is not importable);
   the same with ZeRO-Offload (fp32 masters on the CPU, forward weights on the device): forward == bf16(master).
4. End-to-end images/s on 1 GPU (bench/throughput.py's launches, ViT-B bf16 at 224 px, workers auto, random init):
   the bare timm + torch loop, the trainer with method none and with mars-pgm, each with data loading included
   (the trainer's loader) and excluded (one batch in memory); the data pipeline's own images/s (the loader alone);
   the ratios none / bare and mars-pgm / none, and the projection's share of an update from them.
Each part records its result or the reason it was skipped; nothing here needs the network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mars_dist.constraints import Fragment, measure, project, select_constraints  # noqa: E402
from mars_dist.sharding.masters import PretrainedWeights  # noqa: E402
from mars_dist.run.hook import ProjectionHook  # noqa: E402
from mars_dist.sharding import ReplicatedBackend  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_device_equals_cpu(device) -> dict:
    from mars_dist.constraints import Constraint

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in ((64, 300), (7, 3, 3, 3), (129, 65)):
        w = torch.randn(shape, generator=gen)
        w0 = w + torch.randn(shape, generator=gen)
        c = Constraint("w", shape, "matrix", "project", radius=1.0)
        out = {}
        for dev in (torch.device("cpu"), device):
            x = w.clone().to(dev).reshape(-1)
            project([Fragment(c, x, w0.to(dev).reshape(-1), 0)])
            out[dev.type] = x.cpu()
        worst = max(worst, float((out["cpu"] - out[device.type]).abs().max()))
    return {"max_abs_diff_device_vs_cpu": worst, "ok": worst <= 1e-5}


def projection_share(name: str, device, batch: int, img: int, updates: int) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=img).to(device)
    constraints = select_constraints(model, ["head"], "mars-pgm", 0.05, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend = ReplicatedBackend(constraints, model, opt)
    hook = ProjectionHook(backend)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = torch.bfloat16

    def update():
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, n):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n

    t_update = timed(update, updates)  # includes the projection (the hook runs inside opt.step)
    t_proj = timed(lambda: project(backend.fragments(), backend.reduce, backend.packing), updates)
    stats = measure(backend.fragments(), backend.reduce, backend.packing)
    hook.remove()
    worst = max(s.distance / s.radius for s in stats if s.radius)
    return {"model": name, "batch": batch, "img": img, "constrained_tensors": len(constraints),
            "constrained_params": sum(c.numel for c in constraints), "update_ms": 1e3 * t_update,
            "projection_ms": 1e3 * t_proj, "projection_share": t_proj / t_update, "max_distance_over_radius": worst}


def zero3_bf16(device, offload: bool = False) -> dict:
    """offload: ZeRO-Offload as launch/deepspeed/zero3_offload.json sets it (fp32 masters and the torch optimizer's
    step on the CPU, forward weights on the device, the row sums' all-reduce over NCCL)."""
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"deepspeed not importable: {e}"}
    import timm
    import torch.distributed as dist

    from mars_dist.sharding.zero import ZeroBackend

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29731")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    constraints = select_constraints(model, ["head"], "mars-pgm", 0.05, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "overlap_comm": False}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        cfg["zero_force_ds_cpu_optimizer"] = False
    pretrained = PretrainedWeights.capture(model)  # fp32, before DeepSpeed's bf16 cast
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    backend = ZeroBackend(constraints, engine, pretrained)
    hook = ProjectionHook(backend)
    for _ in range(3):
        x = torch.randn(8, 3, 224, 224, device=engine.device, dtype=torch.bfloat16)
        y = torch.randint(0, 10, (8,), device=engine.device)
        engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
        engine.step()
    stats = measure(backend.fragments(), backend.reduce, backend.packing)
    worst = max(s.distance / s.radius for s in stats if s.radius)
    out = {"updates_projected": hook.updates, "max_distance_over_radius_fp32_master": worst,
           "ok": hook.updates == 3 and worst <= 1 + 5e-5, "backend_device": str(engine.device),
           "master_device": str(backend.flats()[0].device), "offload": backend.offload}
    if offload:  # forward must be exactly bf16(projected CPU master): no lag, no stale copy on the device
        from deepspeed.utils import safe_get_full_fp32_param

        params = list(engine.module.named_parameters())
        masters = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in params}
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            gap = max(float((p.detach().float().cpu() - masters[n].bfloat16().float()).abs().max())
                      for n, p in params)
        out["forward_vs_bf16_master"] = gap
        out["ok"] = out["ok"] and gap == 0.0 and backend.offload and out["master_device"] == "cpu"
    return out


def end_to_end(cuda: bool) -> dict:
    """bench/throughput.py's three launches in one process each (one round; GPU: ViT-B bf16 224 px batch 64;
    --cpu: ViT-Ti bf16 224 px batch 4, 20 images: the same code at small sizes; a ViT takes its own size only)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput as tp

    args = argparse.Namespace(model="vit_base_patch16_224" if cuda else "vit_tiny_patch16_224", pretrained="none",
                              data="fashion-mnist", image_size=224, batch=64 if cuda else 4,
                              per_class=100 if cuda else 2, epochs=2 if cuda else 1, precision="bf16", threads=1,
                              timeout=150 if cuda else 400)
    runs = {v: tp.launch(args, "1proc", v) for v in tp.VARIANTS}
    got = tp.ratios({v: [r] for v, r in runs.items()})
    for feed in tp.FEEDS:  # what mars-pgm adds per update, as a share of the update with it (none -> pgm)
        ips = got[feed]["images_per_s"]
        got[feed]["projection_share_of_update"] = 1 - ips["mars-pgm"] / ips["none"]
    return {"args": {k: v for k, v in vars(args).items()}, **got, "runs": runs,
            "loader_alone_images_per_s": runs["none"].get("loader_alone_images_per_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu", action="store_true", help="run everything on the CPU with small sizes")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "cuda": torch.version.cuda, "parts": {}}
    models = [("vit_base_patch16_224", 64, 224), ("vit_large_patch16_224", 32, 224)] if cuda else \
        [("vit_base_patch16_224", 2, 64)]
    parts = {"device_equals_cpu": lambda: check_device_equals_cpu(device),
             **{f"share_{m}": (lambda m=m, b=b, i=i: projection_share(m, device, b, i, 5 if cuda else 1))
                for m, b, i in models},
             "zero3_bf16_world1": lambda: zero3_bf16(device),
             "zero3_offload_bf16_world1": lambda: zero3_bf16(device, offload=True),
             "end_to_end_1gpu" if cuda else "end_to_end_cpu": lambda: end_to_end(cuda)}
    for key, fn in parts.items():
        t0 = time.perf_counter()
        try:
            report["parts"][key] = fn()
        except Exception:  # noqa: BLE001 - one failing part must not lose the others
            report["parts"][key] = {"error": traceback.format_exc()[-3000:]}
        report["parts"][key]["seconds"] = time.perf_counter() - t0
        print(key, json.dumps(report["parts"][key])[:400], flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
