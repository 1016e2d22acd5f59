"""Projection time per update at scale: sharded (this project) vs gather-everything, 8 to 1,024 ranks.

    .venv/bin/python bench/scaling_model.py      # reads bench/results/engine_cpu.json; writes scaling.json/.png

A model, not a measurement; its constants come from measured runs and its assumptions are stated here:
- local work is memory-bound: time = bytes moved / effective bandwidth. The bytes per constrained element of the
  packed engine (≈ 20 for the floor, × the measured floor share) come from bench/engine_bench.py on this CPU; the
  effective bandwidth of a GPU is taken as 60 % of an H200's 4.8 TB/s HBM (stated, not measured here);
- sharded: each rank projects P/N elements and all-reduces 4·R bytes (R = output rows of all constrained
  layers) with a ring: 2 (N−1)/N · 4R / link + 2 log2(N) · latency;
- gather: each rank all-gathers every constrained parameter ((N−1)/N · 4P / link, one collective per tensor:
  T · log2(N) · latency) and projects all P elements itself;
- links: 50 GB/s per GPU within a node of 8, 25 GB/s across nodes; latency 10 µs per hop.
Model sizes and row counts are read off the timm architectures on the meta device (no weights).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/16": "vit_large_patch16_224",
          "ViT-g/14 (1B)": "vit_giant_patch14_224"}
RANKS = [8, 16, 32, 64, 128, 256, 512, 1024]
HBM = 4.8e12 * 0.6
LINK_NODE, LINK_CROSS, LATENCY = 50e9, 25e9, 10e-6


def shape_of(arch: str) -> tuple[int, int, int]:
    """(constrained params P, rows R, constrained tensors T) of a timm architecture, on the meta device."""
    import timm
    import torch

    from mars_dist.constraints import select_constraints

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=1000)
    cons = select_constraints(model, ["head"], "mars-pgm", 1.0, 1.0)
    return (sum(c.numel for c in cons), sum(c.num_rows for c in cons if c.kind == "rows"), len(cons))


def predict(p: int, r: int, t: int, n: int, bytes_per_elem: float) -> dict:
    link = LINK_NODE if n <= 8 else LINK_CROSS
    hops = math.log2(n)
    sharded = bytes_per_elem * p / n / HBM + 2 * (n - 1) / n * 4 * r / link + 2 * hops * LATENCY
    gather = bytes_per_elem * p / HBM + (n - 1) / n * 4 * p / link + t * hops * LATENCY
    return {"ranks": n, "sharded_ms": 1e3 * sharded, "gather_ms": 1e3 * gather, "speedup": gather / sharded}


def main() -> None:
    engine = json.loads((ROOT / "bench/results/engine_cpu.json").read_text())
    vitb = engine["layouts"]["zero3"]["vit_base_patch16_224"]  # the sharded backends' layout
    bytes_per_elem = 20 / vitb["packed_floor_share"]  # measured: what the packed engine moves per element
    out = {"assumptions": __doc__, "bytes_per_constrained_element": bytes_per_elem, "models": {}}
    for label, arch in MODELS.items():
        p, r, t = shape_of(arch)
        out["models"][label] = {"params": p, "rows": r, "tensors": t,
                                "by_ranks": [predict(p, r, t, n, bytes_per_elem) for n in RANKS]}
        print(label, f"P={p:,} R={r:,} T={t}")
        for row in out["models"][label]["by_ranks"]:
            print(f"  N={row['ranks']:>5}: sharded {row['sharded_ms']:8.3f} ms  gather {row['gather_ms']:9.2f} ms "
                  f" ({row['speedup']:.0f}x)")
    (ROOT / "bench/results/scaling.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, m in out["models"].items():
        xs = [row["ranks"] for row in m["by_ranks"]]
        line, = ax.plot(xs, [row["sharded_ms"] for row in m["by_ranks"]], "-o", ms=3, label=f"{label} sharded")
        ax.plot(xs, [row["gather_ms"] for row in m["by_ranks"]], "--", color=line.get_color(),
                label=f"{label} gather")
    ax.set(xscale="log", yscale="log", xlabel="data-parallel ranks", ylabel="projection ms / update (model)",
           title="Projection per update, sharded vs gather (model)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(ROOT / "bench/results/scaling.png", dpi=120)
    print("written bench/results/scaling.json, scaling.png")


if __name__ == "__main__":
    main()
