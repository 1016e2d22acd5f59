"""End-to-end images/s: a bare timm + torch loop against the trainer (`FineTune.fit`), method none and mars-pgm.

    .venv/bin/python bench/throughput.py                    # CPU: one process, ZeRO-2 and ZeRO-3 on 2 processes
    .venv/bin/python bench/throughput.py --smoke            # seconds: one process, tiny sizes (the test runs this)
    .venv/bin/python bench/throughput.py --settings 1proc --rounds 3 --image-size 64

Per setting (one process; `accelerate launch` with launch/accelerate/zero2.yaml or zero3.yaml on 2 processes) and per
round, one launch per variant, in an order rotated every round:
- `bare`: timm.create_model + torch AdamW + cross-entropy, nothing else (one process: a plain loop; 2 processes: the
  same DeepSpeed config file through `deepspeed.initialize`, "auto" values filled as accelerate fills them);
- `none` / `mars-pgm`: the trainer itself (mars_dist.run.train.FineTune: `setup()`, then `fit()`, exactly as
  `mars-dist train` runs it) with constraint.method none / mars-pgm, telemetry off (train.log_every far away: the
  per-layer stats are a logging cost, not an update's), no checkpoints, wandb disabled.
Inside each launch the epochs alternate between two feeds of the same length, so both are measured seconds apart:
- `loader`: data loading included: the data set's images through the augmenting transforms (the trainer's own
  loader: workers auto, decoded cache; the bare loop: a torch DataLoader over the same data set class and
  transforms, the same worker count, no cache);
- `synthetic`: data loading excluded: one random batch already in memory, fed again and again.
The first epoch of each feed is a warm-up and not counted. images/s = images of the counted epochs over their time
(all processes' images). Same model, batch per process, image size, precision (fp32 on CPU), torch threads (1 per
process). Writes bench/results/throughput_<cpu|gpu>.json and prints the ratios trainer-none / bare and mars-pgm /
none per setting and feed (targets: >= 0.95 and >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {"1proc": None, "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
VARIANTS = ("bare", "none", "mars-pgm")
FEEDS = ("loader", "synthetic")
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
OFF = "synthetic_projection_off"  # mars-pgm launches only: the same trainer with its projection hook removed


class Synthetic:
    """A loader of `n` batches that are all the same in-memory batch (data loading excluded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return ((self.x, self.y) for _ in range(self.n))

    def set_epoch(self, epoch: int) -> None:
        pass


def schedule(epochs: int, feeds=FEEDS) -> list[str]:
    """Warm-up epoch of each feed, then `epochs` of each, alternating."""
    return [f for _ in range(epochs + 1) for f in feeds]


def summarise(times: dict[str, list[tuple[float, int]]]) -> dict:
    """Per feed: images/s over the counted epochs (the first of each is a warm-up), and per-epoch values."""
    out = {}
    for feed, got in times.items():
        counted = got[1:] or got
        out[feed] = {"images_per_s": sum(n for _, n in counted) / sum(t for t, _ in counted),
                     "per_epoch": [n / t for t, n in counted]}
    return out


# ---- workers (one launch = one variant; rank 0 writes the result) ------------------------------------------------
def trainer_worker(args, method: str) -> dict:
    from mars_dist import config
    from mars_dist.run.train import FineTune

    out = Path(tempfile.mkdtemp(prefix="throughput_"))
    cfg = config.load(None, [f"model.name={args.model}", f"model.pretrained={args.pretrained}", f"data.name={args.data}",
                             f"data.image_size={args.image_size}", f"data.train_per_class={args.per_class}",
                             "data.val_per_class=2", "data.test_limit=20", f"constraint.method={method}",
                             f"train.batch_size={args.batch}", "train.optimizer=adamw", "train.lr=1e-4",
                             f"train.mixed_precision={args.precision}", "train.log_every=1000000",
                             "train.eval_every_epoch=false", "tracking.wandb_mode=disabled", f"output_dir={out}"])
    run = FineTune(cfg)
    run.setup()
    acc = run.accelerator
    real = run.loaders["train"]
    x, y = next(iter(real))
    feeds = {"loader": real, "synthetic": Synthetic(x.clone(), y.clone(), len(real))}
    names = FEEDS + ((OFF,) if method != "none" else ())  # paired in one process: the projection's own cost
    feeds[OFF] = feeds["synthetic"]
    plan, times = schedule(args.epochs, names), {f: [] for f in names}
    epoch, hook = run._epoch, run.constrained.hook

    def timed_epoch() -> bool:
        feed = plan[len(sum(times.values(), []))]
        run.loaders["train"] = feeds[feed]
        if feed == OFF:
            hook.remove()
        elif method != "none" and not hook._handles:  # on again: the hook as ProjectionHook registers it
            hook._handles.append(run.constrained.backend.hook_optimizer().register_step_post_hook(hook._after_step))
        acc.wait_for_everyone()
        t0, s0 = time.perf_counter(), run.step
        done = epoch()
        acc.wait_for_everyone()
        times[feed].append((time.perf_counter() - t0, (run.step - s0) * cfg.train.batch_size * acc.num_processes))
        return done

    run._epoch = timed_epoch  # the trainer's own epoch, timed; the rest of fit() as it is
    run.total_updates = len(plan) * run.per_epoch
    run.fit()
    return {"updates_per_epoch": run.per_epoch, "processes": acc.num_processes, **summarise(times),
            "loader_alone_images_per_s": loader_alone(real, acc),
            "constrained_tensors": len(run.constrained.constraints)}


def loader_alone(loader, acc) -> float:
    """The data pipeline's own images/s (all processes): one epoch of the trainer's loader, no model."""
    loader.set_epoch(10**6)
    acc.wait_for_everyone()
    t0, n = time.perf_counter(), 0
    for x, _ in loader:
        n += x.shape[0] * acc.num_processes
    acc.wait_for_everyone()
    return n / (time.perf_counter() - t0)


def bare_worker(args) -> dict:
    import timm
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
    from mars_dist.data.loader import resolve_workers
    from mars_dist.data.splits import build_splits
    from mars_dist.models.factory import resolve_data_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    splits = build_splits(args.data, None, args.per_class, 2, 0.1, 20, 0, "fail")
    model = timm.create_model(args.model, pretrained=False, num_classes=len(splits.class_names))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ds = ImageClassificationDataset(splits.train, build_transforms(resolve_data_config(model, args.image_size), True),
                                    seed=0)
    device, engine = torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    if world > 1:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds_cfg = json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
        ds_cfg.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
                      train_batch_size=args.batch * world, gradient_clipping=0.0, zero_allow_untested_optimizer=True)
        ds_cfg["bf16"], ds_cfg["fp16"] = {"enabled": args.precision == "bf16"}, {"enabled": args.precision == "fp16"}
        engine, opt, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
        device = engine.device
        model = engine
    else:
        model.to(device)
    sampler = DistributedSampler(ds, seed=0) if world > 1 else RandomSampler(ds)
    workers = resolve_workers("auto")
    loader = DataLoader(ds, batch_size=args.batch, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    x, y = next(iter(loader))
    feeds = {"loader": loader, "synthetic": Synthetic(x, y, len(loader))}
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if engine is not None else None
    autocast = args.precision == "bf16" and engine is None
    times = {f: [] for f in FEEDS}
    model.train()
    for feed in schedule(args.epochs):
        if world > 1:
            dist.barrier()
        t0, n = time.perf_counter(), 0
        for xb, yb in feeds[feed]:
            xb, yb = xb.to(device, cast or torch.float32), yb.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(xb).float(), yb)
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            n += xb.shape[0] * world
        float(loss)  # the last update's work is done before the clock stops
        if world > 1:
            dist.barrier()
        times[feed].append((time.perf_counter() - t0, n))
    return {"updates_per_epoch": len(loader), "processes": world, **summarise(times)}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    result = bare_worker(args) if args.worker == "bare" else trainer_worker(args, args.worker)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))


# ---- driver ------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, setting: str, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        own = ["--worker", variant, "--result", str(result), "--model", args.model, "--data", args.data,
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--per-class", str(args.per_class),
               "--epochs", str(args.epochs), "--precision", args.precision, "--threads", str(args.threads),
               "--pretrained", args.pretrained]
        cmd = [sys.executable, str(Path(__file__).resolve()), *own]
        if SETTINGS[setting] is not None:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch/accelerate" / SETTINGS[setting]), "--num_processes", "2",
                   "--main_process_port", str(free_port()), *cmd[1:]]
        # a caller's process group (device_check's ZeRO parts) must not leak into a one-process launch
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env.update(OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"{setting}/{variant} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        return {**json.loads(result.read_text()), "launch_s": time.perf_counter() - t0}


def ratios(rows: dict) -> dict:
    """Per feed: trainer-none / bare and mars-pgm / none (of the medians over rounds), per-round spread too."""
    out = {}
    for feed in FEEDS:
        med = {v: statistics.median(r[feed]["images_per_s"] for r in rows[v]) for v in VARIANTS if rows.get(v)}
        per_round = lambda a, b: [x[feed]["images_per_s"] / y[feed]["images_per_s"]  # noqa: E731
                                  for x, y in zip(rows[a], rows[b])]
        out[feed] = {"images_per_s": med}
        if feed == "synthetic" and any(OFF in r for r in rows.get("mars-pgm", [])):
            paired = [r["synthetic"]["images_per_s"] / r[OFF]["images_per_s"] for r in rows["mars-pgm"]]
            out[feed]["pgm_on_vs_off_same_process"] = statistics.median(paired)
            out[feed]["pgm_on_vs_off_per_round"] = paired
        if "none" in med and "bare" in med:
            out[feed]["none_vs_bare"] = med["none"] / med["bare"]
            out[feed]["none_vs_bare_per_round"] = per_round("none", "bare")
        if "none" in med and "mars-pgm" in med:
            out[feed]["pgm_vs_none"] = med["mars-pgm"] / med["none"]
            out[feed]["pgm_vs_none_per_round"] = per_round("mars-pgm", "none")
    return out


def driver(args) -> dict:
    result = {"machine": {"cuda": torch.cuda.is_available(), "cores": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__, "load_average": list(os.getloadavg())},
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "out")}, "settings": {}}
    raw = {s: {v: [] for v in VARIANTS} for s in args.settings}
    for r in range(args.rounds):
        for setting in args.settings:
            k = r % len(args.variants)
            order = args.variants[k:] + args.variants[:k]  # rotated: no variant always runs first / last
            for variant in order:
                got = launch(args, setting, variant)
                raw[setting][variant].append(got)
                print(f"round {r} {setting:6s} {variant:9s} " + "  ".join(
                    f"{f} {got[f]['images_per_s']:7.1f} img/s" for f in (*FEEDS, OFF) if f in got)
                    + f"  ({got['launch_s']:.0f} s)", flush=True)
    for setting in args.settings:
        result["settings"][setting] = {"runs": raw[setting], **ratios(raw[setting])}
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def print_table(result: dict) -> None:
    print(f"\n{'setting':8s}{'feed':11s}{'bare':>9s}{'none':>9s}{'pgm':>9s}{'none/bare':>11s}{'pgm/none':>10s}"
          f"{'pgm on/off, same process':>26s}")
    for setting, got in result["settings"].items():
        for feed in FEEDS:
            g = got[feed]
            ips = g["images_per_s"]
            print(f"{setting:8s}{feed:11s}" + "".join(f"{ips.get(v, float('nan')):9.1f}" for v in VARIANTS)
                  + f"{g.get('none_vs_bare', float('nan')):11.3f}{g.get('pgm_vs_none', float('nan')):10.3f}"
                  + f"{g.get('pgm_on_vs_off_same_process', float('nan')):26.3f}")
    print("targets: none/bare >= 0.95 where data loading keeps up; pgm/none >= 0.97")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="bundled", help="the trainer's model.pretrained (bundled: Lite0 only; "
                    "none: random init, what the bare loop always uses)")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="per process")
    ap.add_argument("--per-class", type=int, default=16, help="training images per class (sets the epoch length)")
    ap.add_argument("--epochs", type=int, default=3, help="counted epochs per feed and launch (plus one warm-up)")
    ap.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--smoke", action="store_true", help="one process, one round, tiny sizes")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.settings, args.rounds, args.image_size, args.batch, args.per_class, args.epochs = \
            ["1proc"], 1, 32, 4, 2, 1
    out = Path(args.out or ROOT / "bench" / "results" /
               f"throughput_{'gpu' if torch.cuda.is_available() else 'cpu'}{'_smoke' if args.smoke else ''}.json")
    result = driver(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
