"""DELTA's cost next to plain fine-tuning (`constraint.method: none`) on the bundled Lite0 (docs/constraints.md,
'DELTA'): time per update (the median of the logged images/s, first update left out), peak memory of the training
process (max RSS, one process), and under ZeRO-3 on 2 processes the frozen source's parameter bytes per rank (from
the run's log). The one-off attention measurement is reported apart. CPU-only figures on this machine; on a shared
machine run it twice.

    .venv/bin/python bench/delta_overhead.py [--steps 8] [--image-size 64] [--batch 16] [--zero3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, method: str, args, launch: str | None = None) -> dict:
    over = [f"constraint.method={method}", f"train.max_steps={args.steps}", f"data.image_size={args.image_size}",
            f"train.batch_size={args.batch}", "data.train_per_class=20", "data.test_limit=20",
            "train.eval_every_epoch=false", "tracking.wandb_mode=disabled", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mars_dist", "train", *over]
    if launch:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch/accelerate" / launch), "--num_processes", "2", "-m", "mars_dist", "train", *over]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][1:]
    per_update = args.batch * (2 if launch else 1) / statistics.median(speeds)
    found = re.search(r"DELTA: source model (.*?) \(([\d.]+) MiB .* in ([\d.]+) s", proc.stdout)
    return {"method": method, "launch": launch or "one process", "s_per_update": round(per_update, 4),
            "max_rss_mib": round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)
            if not launch else None,
            "source": found.group(1) if found else None,
            "source_mib_per_rank": float(found.group(2)) if found else None,
            "attention_s": float(found.group(3)) if found else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--zero3", action="store_true", help="also 2 processes under launch/accelerate/zero3.yaml")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # max RSS of children is a high-water mark over all of them: the smaller run (none) goes first
        for method in ("none", "delta"):
            results.append(run(Path(tmp) / method, method, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # kept if a later run is cut short
        if args.zero3:
            for method in ("none", "delta"):
                results.append(run(Path(tmp) / f"z3_{method}", method, args, "zero3.yaml"))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                      "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
