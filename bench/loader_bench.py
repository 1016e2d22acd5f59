"""Images per second of the trainer's training loader: 0 / 1 / 2 workers x decoded-image cache off / on, in ONE run.

    .venv/bin/python bench/loader_bench.py                         # 224 px, writes bench/results/loader_cpu.json
    .venv/bin/python bench/loader_bench.py --size 64 --images 1000 --out /tmp/loader.json

The loader is the trainer's (mars_dist.loader.build_loader, prepared by accelerate, set_epoch each epoch, the
train transforms: random-resized crop to --size, flip, normalise), iterated without a model: what the data side can
deliver, the ceiling on the trainer's images/s. Two sources of the same few-shot Fashion-MNIST images:
- `png28`: as the data set ships them, 28x28 grey PNG in Arrow (decoding is cheap, the transforms dominate);
- `jpeg500`: the same images upscaled to 500x375 RGB JPEG files in an image folder (the size of a typical photo
  data set: decoding is a large share of the work, which is what the cache removes).
Each configuration twice: the loader alone, and with a simulated accelerator step of --step-ms per batch (the main
process sleeps: the overlap of loading with training that workers buy, which the loader alone cannot show; with
0 workers the two add up). Each measurement: one warm-up epoch (worker start, first touches; reported apart), then
--epochs timed epochs; configurations are interleaved over --rounds rounds and the median per configuration is
reported, because these machines are shared and noisy. The cache's one-off decoding time and memory are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mars_dist.config import DataConfig  # noqa: E402
from mars_dist.data.splits import build_splits  # noqa: E402
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms  # noqa: E402
from mars_dist.data.loader import build_loader, usable_cpus  # noqa: E402

CONFIGS = [(w, c) for c in (False, True) for w in (0, 1, 2)]


def jpeg_folder(split, root: Path, size=(500, 375)):
    """The split's images as RGB JPEG photos of `size` in an image folder (train/ and a one-image test/)."""
    import datasets

    names = split.features["label"].names
    for i, row in enumerate(split):
        folder = root / "train" / names[row["label"]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        row["image"].convert("RGB").resize(size).save(folder / f"{i}.jpg", quality=90)
    for name in {p.name for p in (root / "train").iterdir()}:
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(next((root / "train" / name).iterdir()), root / "test" / name / "0.jpg")
    return datasets.load_dataset("imagefolder", data_dir=str(root), split="train")


def measure(split, tf_cfg, workers: int, cache: bool, batch: int, epochs: int, accelerator, step_s: float) -> dict:
    ds = ImageClassificationDataset(split, build_transforms(tf_cfg, train=True), seed=0)
    t0 = time.perf_counter()
    cache_bytes = ds.cache_decoded() if cache else 0
    cache_s = time.perf_counter() - t0
    settings = DataConfig(num_workers=workers, persistent_workers=True, prefetch_factor=2, cache_decoded=False,
                          pin_memory=False)
    loader = accelerator.prepare(build_loader(ds, settings, batch, 0, shuffle=True, drop_last=True,
                                              say=lambda _: None))
    times, n = [], 0
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        n = 0
        for x, _ in loader:
            n += x.shape[0]
            if step_s:
                time.sleep(step_s)  # a training step on an accelerator: this process waits, its core is free
        times.append(time.perf_counter() - t)
    accelerator.free_memory()  # it holds every prepared loader: let this one and its persistent workers go
    steady = n * epochs / sum(times[1:])
    return {"images_per_s": steady, "first_epoch_images_per_s": n / times[0], "images_per_epoch": n,
            "cache_build_s": cache_s, "cache_MiB": cache_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="input size of the transforms (px)")
    ap.add_argument("--images", type=int, default=400, help="few-shot train images (a multiple of 10)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sources", default="png28,jpeg500")
    ap.add_argument("--step-ms", type=float, default=40.0, help="simulated step per batch (0: loader alone only)")
    ap.add_argument("--note", default="2 CPU cores shared with other sessions: noisy; compare within this run only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader_cpu.json"))
    args = ap.parse_args()

    from mars_dist.sharding.accelerate_setup import make_accelerator

    accelerator = make_accelerator(1, "no", None)
    tf_cfg = {"input_size": (3, args.size, args.size), "interpolation": "bicubic", "crop_pct": 0.875,
              "crop_mode": "center", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    split = build_splits("fashion-mnist", None, args.images // 10, 1, 0.1, 10, seed=0).train
    tmp = tempfile.TemporaryDirectory()
    sources = {"png28": lambda: split, "jpeg500": lambda: jpeg_folder(split, Path(tmp.name))}
    sources = {s: sources[s]() for s in args.sources.split(",")}
    steps = [0.0] + ([args.step_ms / 1000] if args.step_ms else [])
    name = lambda s, w, c, st: (f"{s}/workers={w}/cache={'on' if c else 'off'}"  # noqa: E731
                                + (f"/step={st * 1000:g}ms" if st else ""))
    runs: dict = {name(s, w, c, st): [] for st in steps for s in sources for w, c in CONFIGS}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for st in steps:
            for s, data in sources.items():
                for w, c in CONFIGS:
                    key = name(s, w, c, st)
                    runs[key].append(measure(data, tf_cfg, w, c, args.batch, args.epochs, accelerator, st))
                    print(f"round {r} {key}: {runs[key][-1]['images_per_s']:.0f} images/s", flush=True)
    results = {k: {"images_per_s_median": statistics.median(m["images_per_s"] for m in v),
                   "images_per_s_runs": [round(m["images_per_s"], 1) for m in v],
                   "first_epoch_images_per_s_median": statistics.median(m["first_epoch_images_per_s"] for m in v),
                   "cache_build_s_median": statistics.median(m["cache_build_s"] for m in v),
                   "cache_MiB": v[0]["cache_MiB"]} for k, v in runs.items()}
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "usable_cpus": usable_cpus(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "note": args.note},
           "settings": {"size": args.size, "images": len(split), "batch": args.batch, "epochs_timed": args.epochs,
                        "step_ms": args.step_ms,
                        "rounds": args.rounds, "persistent_workers": True, "prefetch_factor": 2},
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n{'configuration':<46} {'images/s':>9} {'first epoch':>12} {'cache MiB':>10} {'cache build s':>14}")
    for k, v in results.items():
        print(f"{k:<46} {v['images_per_s_median']:>9.0f} {v['first_epoch_images_per_s_median']:>12.0f} "
              f"{v['cache_MiB']:>10.1f} {v['cache_build_s_median']:>14.2f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
