"""Single-process cost of the projection against the memory floor, and its dependence on the tensor count.

    .venv/bin/python bench/engine_bench.py                  # all models + the tensor-count sweep, one thread
    .venv/bin/python bench/engine_bench.py --baseline 72b0478 # also time the per-fragment engine of that commit

In ONE run (these machines are noisy: every figure below is a ratio to something measured in the same run):
- the memory floor: 20 bytes per constrained parameter (read W and W0 for the row norms; read W and W0 and write W
  for the rescale) at the bandwidth of a triad `a = b + 2 c` (12 bytes per element) timed on 20M fp32 elements;
- the projection of every constrained parameter of random-init timm models (Lite0, ViT-S, ViT-B) with every row
  pushed outside its ball (the worst case: W = W0 + noise far beyond the radius, restored before each repeat),
  through the ReplicatedBackend's packed layout, exactly as the trainer's hook runs it;
- the tensor-count sweep: 8.2M parameters as 20 / 200 / 2,000 bias-free Linear layers;
- with --baseline REV: the same with the engine of git revision REV (the per-fragment loop), loaded from git.
Writes bench/results/engine_<machine>.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mars_dist.constraints import Fragment, project, select_constraints  # noqa: E402
from mars_dist.sharding import ReplicatedBackend  # noqa: E402

MODELS = {"tf_efficientnet_lite0": "classifier", "vit_small_patch16_224": "head", "vit_base_patch16_224": "head"}
SWEEP = (20, 200, 2000)
SWEEP_PARAMS = 8_192_000


def timed(fn, repeats: int, setup=None) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up; setup() (untimed) before each."""
    times = []
    for k in range(repeats + 1):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        if k:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def triad_bandwidth(n: int = 20_000_000, repeats: int = 7) -> float:
    """Bytes per second of a = b + 2c (12 bytes per element) on n fp32 elements."""
    b, c, a = torch.randn(n), torch.randn(n), torch.empty(n)
    return 12 * n / timed(lambda: torch.add(b, c, alpha=2.0, out=a), repeats)


def old_engine(rev: str) -> types.ModuleType:
    """mars_dist/constraints/engine.py as of git revision `rev` (the per-fragment engine), as a module."""
    src = subprocess.check_output(["git", "show", f"{rev}:mars_dist/constraints/engine.py"], cwd=ROOT, text=True)
    spec = importlib.util.spec_from_loader(f"engine_{rev}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"engine@{rev}", "exec"), mod.__dict__)
    return mod


def worst_case(model: nn.Module, head: str, radius: float, head_radius: float):
    """Constraints, backend, and a setup() that pushes every constrained row far outside its ball."""
    constraints = select_constraints(model, [head], "mars-pgm", radius, head_radius)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    backend = ReplicatedBackend(constraints, model, opt)
    params = dict(model.named_parameters())
    start = {c.name: params[c.name].detach().clone() for c in constraints}
    gen = torch.Generator().manual_seed(0)
    noise = {c.name: torch.randn(c.shape, generator=gen) for c in constraints}

    def setup():
        with torch.no_grad():
            for c in constraints:
                params[c.name].copy_(start[c.name]).add_(noise[c.name])

    return constraints, backend, setup


def bench_model(model: nn.Module, head: str, bandwidth: float, repeats: int, baseline) -> dict:
    constraints, backend, setup = worst_case(model, head, 0.05, 0.5)
    n = sum(c.numel for c in constraints)
    floor = 20 * n / bandwidth
    setup()
    clipped = project(backend.fragments(), backend.reduce, backend.packing)
    out = {"constrained_tensors": len(constraints), "constrained_params": n, "floor_ms": floor * 1e3,
           "rows_clipped": clipped}
    t = timed(lambda: project(backend.fragments(), backend.reduce, backend.packing), repeats, setup)
    out.update(packed_ms=t * 1e3, packed_floor_share=floor / t)
    if baseline is not None:
        anchors = backend.anchors
        frags = lambda: [Fragment(f.constraint, f.w, a, f.offset) for f, a in zip(backend.fragments(), anchors)]  # noqa
        tb = timed(lambda: baseline.project(frags()), max(1, repeats // 2), setup)
        out.update(baseline_ms=tb * 1e3, baseline_floor_share=floor / tb, speedup=tb / t)
    return out


def linear_stack(count: int) -> nn.Module:
    width = int(round((SWEEP_PARAMS / count) ** 0.5))
    layers = [nn.Linear(width, width, bias=False) for _ in range(count - 1)] + [nn.Linear(width, 10, bias=False)]
    model = nn.Sequential(*layers)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="git revision of the engine to compare with")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    baseline = old_engine(args.baseline) if args.baseline else None
    bandwidth = triad_bandwidth()
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__, "triad_GBps": bandwidth / 1e9},
              "baseline_rev": args.baseline, "models": {}, "sweep": {}}
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        result["models"][name] = bench_model(model, MODELS[name], bandwidth, args.repeats, baseline)
        print(name, json.dumps(result["models"][name]), flush=True)
    for count in SWEEP:
        torch.manual_seed(0)
        model = linear_stack(count)
        result["sweep"][str(count)] = bench_model(model, str(count - 1), bandwidth, args.repeats, baseline)
        print(count, "tensors", json.dumps(result["sweep"][str(count)]), flush=True)
    s = result["sweep"]
    result["sweep_ratio_2000_vs_20"] = s["2000"]["packed_ms"] / s["20"]["packed_ms"]
    if baseline is not None:
        result["baseline_sweep_ratio_2000_vs_20"] = s["2000"]["baseline_ms"] / s["20"]["baseline_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\ntriad {bandwidth / 1e9:.1f} GB/s, {args.threads} thread(s)")
    print(f"{'case':<24}{'tensors':>8}{'params':>12}{'floor ms':>10}{'packed ms':>11}{'floor/packed':>14}"
          + (f"{'before ms':>11}{'floor/before':>14}" if baseline else ""))
    for key, r in list(result["models"].items()) + [(f"{k} Linear", v) for k, v in s.items()]:
        line = (f"{key:<24}{r['constrained_tensors']:>8}{r['constrained_params']:>12,}{r['floor_ms']:>10.1f}"
                f"{r['packed_ms']:>11.1f}{100 * r['packed_floor_share']:>13.0f}%")
        if baseline:
            line += f"{r['baseline_ms']:>11.1f}{100 * r['baseline_floor_share']:>13.0f}%"
        print(line)
    print(f"2,000 vs 20 tensors: {result['sweep_ratio_2000_vs_20']:.2f}x"
          + (f" (before: {result['baseline_sweep_ratio_2000_vs_20']:.2f}x)" if baseline else ""))


if __name__ == "__main__":
    main()
