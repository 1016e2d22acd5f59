"""Peak memory of one training step (forward + backward) of a ViT with and without activation checkpointing, in ONE run.

    .venv/bin/python bench/grad_ckpt_memory.py                     # vit_base_patch16_224, batch 32, 224 px
    .venv/bin/python bench/grad_ckpt_memory.py --model vit_small_patch16_224 --batch 8 --out /tmp/ckpt.json

Each variant runs in a fresh subprocess (its own peak, nothing left over from the other), built exactly as the
trainer builds it: `mars_dist.models.factory.build_model` (pretrained none: the weights do not change the memory)
and `mars_dist.models.knobs.enable_grad_checkpointing` for the checkpointed one. Measured on the CPU:
- `peak_rss`: the process's peak resident set (getrusage ru_maxrss) over the whole step;
- `step_peak`: that peak minus the resident set just before the forward pass (model, its gradients' buffers from
  a warm-up step, the batch): what the step itself adds, mostly the activations kept for the backward pass;
- `profiler_peak`: the largest allocated total torch's profiler (profile_memory) saw during the step, counted from
  the allocations the step made: the same quantity from the allocator, independent of the OS's accounting.
The ratio with / without is printed for each. Writes bench/results/grad_ckpt_memory_cpu.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_variant(model_name: str, batch: int, size: int, checkpointing: bool) -> dict:
    """One forward + backward in this process (called in a fresh subprocess); its memory figures."""
    import torch
    import torch.nn.functional as F

    from mars_dist.models.factory import build_model
    from mars_dist.models.knobs import enable_grad_checkpointing

    torch.manual_seed(0)
    model = build_model(model_name, "none", 10).train()
    if checkpointing:
        enable_grad_checkpointing(model)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    # a warm-up step at batch 1 allocates the gradient buffers (kept across steps, the same in both variants)
    F.cross_entropy(model(x[:1]), y[:1]).backward()
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        F.cross_entropy(model(x), y).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the allocator's running total over the step, from the profiler's allocation events, in time order
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = top = 0
    for e in events:
        live += e.self_cpu_memory_usage
        top = max(top, live)
    return {"peak_rss": peak, "rss_before_step": before, "step_peak": peak - before, "profiler_peak": top,
            "seconds": round(seconds, 2), "parameters": sum(p.numel() for p in model.parameters())}


def in_subprocess(args, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--size", str(args.size),
           "--variant", "ckpt" if checkpointing else "plain"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variant", choices=["plain", "ckpt"], help=argparse.SUPPRESS)  # the subprocess's side
    ap.add_argument("--out", default=str(ROOT / "bench/results/grad_ckpt_memory_cpu.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.model, args.batch, args.size, args.variant == "ckpt")))
        return
    import torch

    load_before = os.getloadavg()
    plain, ckpt = in_subprocess(args, False), in_subprocess(args, True)
    ratios = {k: round(ckpt[k] / plain[k], 3) for k in ("peak_rss", "step_peak", "profiler_peak")}
    result = {"machine": {"cpu": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                          "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "torch": torch.__version__,
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "settings": {"model": args.model, "batch": args.batch, "size": args.size, "dtype": "float32",
                           "pretrained": "none", "step": "one forward + backward, cross-entropy, train mode"},
              "without": plain, "with": ckpt, "ratio_with_over_without": ratios}
    gib = 2.0 ** 30
    for k in ("peak_rss", "step_peak", "profiler_peak"):
        print(f"{k:14s} without {plain[k] / gib:6.2f} GiB   with {ckpt[k] / gib:6.2f} GiB   ratio {ratios[k]:.3f}")
    print(f"{'seconds':14s} without {plain['seconds']:6.1f}       with {ckpt['seconds']:6.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
