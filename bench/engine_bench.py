"""Single-process cost of the projection against the memory floor, and its dependence on the tensor count.

    .venv/bin/python bench/engine_bench.py                   # all models + the tensor-count sweep, one thread
    .venv/bin/python bench/engine_bench.py --baseline b7562b8  # also time the engine of that commit

In ONE run (these machines are noisy: every figure below is a ratio to something measured in the same run):
- the memory floor: 20 bytes per constrained parameter (read W and W0 for the row norms; read W and W0 and write W
  for the rescale) at the bandwidth of a triad `a = b + 2 c` (12 bytes per element) timed on 20M fp32 elements;
- the projection of every constrained parameter of random-init timm models (Lite0, ViT-S, ViT-B) with every row
  pushed outside its ball (the worst case: W = W0 + noise far beyond the radius, restored before each repeat),
  through a backend's packed layout, exactly as the trainer's hook runs it, in two memory layouts:
  `replicated` (the ReplicatedBackend: one tensor per parameter, one process / DDP) and `zero3` (ZeRO-3's layout at
  world size 1: every parameter a view of one flat fp32 buffer in parameter order, the fragments `narrow` views of
  it, as ZeroBackend builds them from `fp32_partitioned_groups_flat`; simulated here without DeepSpeed);
- each with the row sums compiled (`packed`, torch.compile; the compile is done in an untimed warm-up and reported
  separately as `compile_s`) and eager (`eager`, MARS_DIST_COMPILE=0's path);
- the tensor-count sweep: 8.2M parameters as 20 / 200 / 2,000 bias-free square Linear layers (more tensors and
  shorter rows: 12.8K rows of 640 at 20 tensors, 128K rows of 64 at 2,000), and the same 8.2M parameters as 20 /
  2,000 layers of 640-element rows (12,800 rows in both: only the tensor count changes), which separates what costs
  per tensor from what costs per row;
- with --baseline REV: the same with mars_dist/constraints/engine.py of git revision REV, loaded from git.
Writes bench/results/engine_<machine>.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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

from mars_dist.constraints import Fragment, kernels, project, select_constraints  # noqa: E402
from mars_dist.sharding import ReplicatedBackend  # noqa: E402
from mars_dist.sharding.base import Backend  # noqa: E402

MODELS = {"tf_efficientnet_lite0": "classifier", "vit_small_patch16_224": "head", "vit_base_patch16_224": "head"}
SWEEP = (20, 200, 2000)
SWEEP_PARAMS = 8_192_000


def median(xs):
    return sorted(xs)[len(xs) // 2]


def timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Triad:
    """a = b + 2c on n fp32 elements (12 bytes per element): the bandwidth one thread gets right now."""

    def __init__(self, n: int = 20_000_000):
        self.n, self.b, self.c, self.a = n, torch.randn(n), torch.randn(n), torch.empty(n)

    def bandwidth(self, repeats: int = 3) -> float:
        return 12 * self.n / min(timeit(lambda: torch.add(self.b, self.c, alpha=2.0, out=self.a))
                                 for _ in range(repeats))


def old_engine(rev: str) -> types.ModuleType:
    """mars_dist/constraints/engine.py as of git revision `rev`, as a module (with today's packed layout; the
    engine's calls into it are unchanged since b7562b8)."""
    src = subprocess.check_output(["git", "show", f"{rev}:mars_dist/constraints/engine.py"], cwd=ROOT, text=True)
    spec = importlib.util.spec_from_loader(f"engine_{rev}", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"engine@{rev}", "exec"), mod.__dict__)
    return mod


class FlatBackend(Backend):
    """ZeRO-3's memory layout at world size 1, without DeepSpeed: the parameters become views of ONE flat fp32 buffer
    (all of them, in parameter order, as ZeRO-3 flattens a sub-group) and the fragments are `narrow` views of it."""

    name = "zero3-layout"

    def __init__(self, constraints, model: nn.Module):
        super().__init__(constraints)
        named = list(model.named_parameters())
        self.flat = torch.empty(sum(p.numel() for _, p in named))
        where, at = {}, 0
        with torch.no_grad():
            for name, p in named:
                self.flat[at:at + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[at:at + p.numel()].view_as(p)
                where[name], at = (at, p.numel()), at + p.numel()
        self.slots = [where[c.name] for c in constraints]
        self.pack(self.fragments())

    def fragments(self):
        """As ZeroBackend.fragments(): a narrow view per constraint of the flat buffer, built at every call."""
        return [Fragment(c, self.flat.detach().narrow(0, s, n), None, 0) for c, (s, n) in zip(self.constraints,
                                                                                               self.slots)]

    def weight_fragments(self):
        """As ZeroBackend.weight_fragments() (what the hook projects): cached while the buffer is the same memory."""
        if getattr(self, "_key", None) != self.flat.data_ptr():
            self._key, self._weights = self.flat.data_ptr(), self.fragments()
        return self._weights

    def reduce(self, to_sum, to_average):
        return to_sum, to_average


_EVICT = torch.zeros(16_000_000)


def worst_case(model: nn.Module, head: str, layout: str, radius: float, head_radius: float):
    """Constraints, backend, and a setup() that pushes every constrained row far outside its ball."""
    constraints = select_constraints(model, [head], "mars-pgm", radius, head_radius)
    if layout == "zero3":
        backend = FlatBackend(constraints, model)
    else:
        backend = ReplicatedBackend(constraints, model, torch.optim.SGD(model.parameters(), lr=0.0))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    noise = {c.name: torch.randn(c.shape, generator=gen) for c in constraints}

    with torch.no_grad():
        for c in constraints:
            params[c.name].add_(noise[c.name])
        outside = ([params[c.name].detach().clone() for c in constraints] if layout != "zero3"
                   else backend.flat.clone())

    def setup():
        # the worst-case weights written back as the optimizer writes them: ZeRO's flat master in one sweep, one
        # tensor at a time otherwise (a per-tensor loop over a flat buffer leaves other data in the caches)
        with torch.no_grad():
            if layout == "zero3":
                backend.flat.copy_(outside)
            else:
                torch._foreach_copy_([params[c.name] for c in constraints], outside)
        _EVICT.add_(1.0)  # 64 MB through the caches: W starts in memory, as after the optimizer's pass over it

    return constraints, backend, setup


def variants(backend, baseline) -> dict:
    """The per-update calls to time: compiled row sums, eager row sums, and the engine of --baseline."""
    run = lambda: project(backend.weight_fragments(), backend.reduce, backend.packing)  # noqa: E731

    def with_mode(compiled):
        def fn():
            backend.packing.compiled = compiled
            return run()
        return fn

    out = {"packed": with_mode(True), "eager": with_mode(False)}
    if baseline is not None:
        out["baseline"] = lambda: baseline.project(backend.weight_fragments(), backend.reduce, backend.packing)
    return out


def bench_group(builds: dict, layout: str, rounds: int, baseline) -> dict:
    """Time every (case, variant) of a group in rounds: each round measures the triad once, then runs every case
    and variant once, in an order rotated per round (the worst-case setup untimed before each; the call right after
    the setup is not always the same variant: it ran slower). Figures are medians over rounds of per-round
    values, so a floor share or a ratio between cases compares runs seconds apart, not minutes."""
    triad = Triad()
    cases = {}
    for key, (build, head) in builds.items():
        torch.manual_seed(0)
        constraints, backend, setup = worst_case(build(), head, layout, 0.05, 0.5)
        n = sum(c.numel for c in constraints)
        calls = variants(backend, baseline)
        before = kernels.compile_seconds()
        setup()
        clipped = calls["packed"]()  # warm-up: compiles on the first compiled call of the process
        compile_s = kernels.compile_seconds() - before
        for name, fn in calls.items():  # warm-up of the other variants (caches, allocator)
            setup()
            fn()
        cases[key] = dict(constraints=constraints, backend=backend, setup=setup, n=n, calls=calls,
                          info={"constrained_tensors": len(constraints), "constrained_params": n,
                                "rows_clipped": clipped, "compile_s": compile_s})
        if layout == "zero3":
            # what building the fragments at every update (ZeroBackend.fragments) would add
            cases[key]["info"]["enumerate_ms"] = 1e3 * median([timeit(backend.fragments) for _ in range(5)])
    samples = {key: {"bw": []} | {v: [] for v in c["calls"]} for key, c in cases.items()}
    for i in range(rounds):
        bw = triad.bandwidth()
        for key, c in cases.items():
            samples[key]["bw"].append(bw)
            calls = list(c["calls"].items())
            for name, fn in calls[i % len(calls):] + calls[:i % len(calls)]:  # rotated: no variant always first
                c["setup"]()
                samples[key][name].append(timeit(fn))
    out = {}
    for key, c in cases.items():
        sm, r = samples[key], dict(c["info"])
        r["triad_GBps"] = median(sm["bw"]) / 1e9
        r["floor_ms"] = 20 * c["n"] / median(sm["bw"]) * 1e3
        for name in c["calls"]:
            r[f"{name}_ms"] = median(sm[name]) * 1e3
            r[f"{name}_floor_share"] = median([20 * c["n"] / bw / t for bw, t in zip(sm["bw"], sm[name])])
        out[key] = r
    for suffix in ("Linear", "Linear 640-wide"):
        big, small = f"2000 {suffix}", f"20 {suffix}"
        if big in samples and small in samples:
            out["ratio_2000_vs_20" + suffix[len("Linear"):].replace(" ", "_")] = {
                v: median([a / b for a, b in zip(samples[big][v], samples[small][v])]) for v in cases[small]["calls"]}
    return out


def linear_stack(count: int) -> nn.Module:
    width = int(round((SWEEP_PARAMS / count) ** 0.5))
    layers = [nn.Linear(width, width, bias=False) for _ in range(count - 1)] + [nn.Linear(width, 10, bias=False)]
    return nn.Sequential(*layers)


def fixed_row_stack(count: int, row_len: int = 640) -> nn.Module:
    """`count` bias-free Linear layers of `row_len`-element rows holding SWEEP_PARAMS parameters together (12,800
    rows at 640, spread as evenly as whole rows allow): the tensor count changes, the rows do not."""
    rows = SWEEP_PARAMS // row_len
    return nn.Sequential(*[nn.Linear(row_len, rows * (i + 1) // count - rows * i // count, bias=False)
                           for i in range(count)])


def timm_model(name: str):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


def print_table(result: dict, baseline: bool) -> None:
    print(f"\n{result['machine']['threads']} thread(s); floor = 20 B/element at the triad of the same round; medians "
          f"over {result['rounds']} rounds")
    print(f"{'layout':<11}{'case':<24}{'tensors':>8}{'params':>12}{'triad GB/s':>11}{'floor ms':>9}"
          f"{'packed ms':>10}{'floor/pk':>9}{'eager ms':>9}{'floor/eg':>9}{'compile s':>10}"
          + (f"{'before ms':>10}{'floor/bf':>9}" if baseline else ""))
    for layout, rows in result["layouts"].items():
        for key, r in rows.items():
            if key.startswith("ratio_2000_vs_20"):
                continue
            line = (f"{layout:<11}{key:<24}{r['constrained_tensors']:>8}{r['constrained_params']:>12,}"
                    f"{r['triad_GBps']:>11.1f}{r['floor_ms']:>9.1f}{r['packed_ms']:>10.1f}"
                    f"{100 * r['packed_floor_share']:>8.0f}%{r['eager_ms']:>9.1f}{100 * r['eager_floor_share']:>8.0f}%"
                    f"{r['compile_s']:>10.2f}")
            if baseline:
                line += f"{r['baseline_ms']:>10.1f}{100 * r['baseline_floor_share']:>8.0f}%"
            print(line)
        for key, ratio in rows.items():
            if key.startswith("ratio_2000_vs_20"):
                what = "640-element rows in both" if key.endswith("640-wide") else "square layers"
                print(f"{layout}: 2,000 vs 20 tensors ({what}) " + ", ".join(f"{v} {x:.2f}x" for v, x in ratio.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no-sweep", action="store_true", help="models only (no tensor-count sweeps)")
    ap.add_argument("--layouts", nargs="+", default=["replicated", "zero3"], choices=["replicated", "zero3"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="git revision of the engine to compare with")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    baseline = old_engine(args.baseline) if args.baseline else None
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__,
                          "load_average": list(os.getloadavg())},
              "baseline_rev": args.baseline, "rounds": args.rounds, "layouts": {}}
    groups = [{name: (timm_model(name), MODELS[name])} for name in args.models]
    if not args.no_sweep:
        groups.append({f"{k} Linear": (lambda k=k: linear_stack(k), str(k - 1)) for k in SWEEP})
        groups.append({f"{k} Linear 640-wide": (lambda k=k: fixed_row_stack(k), str(k - 1)) for k in (20, 2000)})
    for layout in args.layouts:
        rows = result["layouts"][layout] = {}
        for builds in groups:
            got = bench_group(builds, layout, args.rounds, baseline)
            rows.update(got)
            print(layout, json.dumps(got), flush=True)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result, baseline is not None)


if __name__ == "__main__":
    main()
