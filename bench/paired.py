"""Statistics and the report of the accuracy bench (bench/accuracy_table.py): per-method means, the paired
difference to plain fine-tuning with a 95 % t-interval, train accuracy, the regime, and the compute spent."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from pathlib import Path

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

# 97.5 % quantiles of Student's t with df = 1..30 (two-sided 95 % interval)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 pairs (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # within 1e-3 of the exact quantile beyond 30


def paired_ci(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean of a[s] - b[s] over the seeds s present in both, with the 95 % t-interval; None under 2 pairs."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.mean(d), statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "mean": mean, "lo": mean - half, "hi": mean + half, "seeds": seeds}


def summarise(runs: list[dict], tuning: list[dict], methods: list[str]) -> list[dict]:
    """One row per (dataset, method) with at least one finished run, in schedule order."""
    table = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        base = {r["seed"]: r["test_accuracy"] for r in runs if r["dataset"] == ds and r["method"] == "none"}
        for method in methods:
            rs = [r for r in runs if r["dataset"] == ds and r["method"] == method]
            if not rs:
                continue
            acc = {r["seed"]: r["test_accuracy"] for r in rs}
            tune = next((t for t in tuning if t["dataset"] == ds and t["method"] == method), None)
            best_epochs = [r["best_val_epoch"] for r in rs if r.get("best_val_epoch") is not None]
            table.append({
                "dataset": ds, "method": method, "n": len(rs), "seeds": sorted(acc),
                "acc_mean": statistics.mean(acc.values()),
                "acc_std": statistics.stdev(acc.values()) if len(rs) > 1 else 0.0,
                "diff": None if method == "none" else paired_ci(acc, base),
                "train_acc_mean": statistics.mean(r["train_accuracy"] for r in rs),
                "val_final_mean": statistics.mean(r["val_accuracy"] for r in rs),
                "best_val_epoch_median": statistics.median(best_epochs) if best_epochs else None,
                "C_mean": statistics.mean(r["bound_C"] for r in rs),
                "params": rs[0]["params"],
                "alphas": [r["alpha"] for r in sorted(rs, key=lambda r: r["seed"]) if "alpha" in r],
                "trials": tune["trials"] if tune else 0,
                "tune_cpu_s": tune["cpu_s"] if tune else 0.0,
                "runs_cpu_s": sum(r["cpu_s"] for r in rs),
                "runs_wall_s": sum(r["wall_s"] for r in rs),
            })
    return table


def fmt_diff(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] (n={d['n']})"


def markdown_table(table: list[dict], seeds_wanted: int, controls: dict[str, str] | None = None) -> list[str]:
    """The table; `controls` (row name -> what the method controls) fills a column when given."""
    ctl = controls is not None
    lines = ["| data set | method | " + ("controls | " if ctl else "") + "test acc. % (mean ± sd) | paired diff. to "
             "`none`, points [95 % CI] | train acc. % | final val acc. % | best val epoch (median) | bound C | "
             "compute: trials + runs, CPU-s | chosen values | complete |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ctl else "")]
    for t in table:
        params = ", ".join(f"{k}={v:.3g}" for k, v in t["params"].items()) or "-"
        if t.get("alphas"):
            params = "α per seed: " + ", ".join(f"{x:g}" for x in t["alphas"])
        epoch = "-" if t["best_val_epoch_median"] is None else f"{t['best_val_epoch_median']:g}"
        done = "yes" if t["n"] >= seeds_wanted else f"no ({t['n']}/{seeds_wanted} seeds)"
        lines.append(
            f"| {t['dataset']} | {t['method']} | " + (f"{controls.get(t['method'], '-')} | " if ctl else "") +
            f"{100 * t['acc_mean']:.1f} ± {100 * t['acc_std']:.1f} | "
            f"{fmt_diff(t['diff'])} | {100 * t['train_acc_mean']:.1f} | {100 * t['val_final_mean']:.1f} | {epoch} | "
            f"{t['C_mean']:.1f} | {t['trials']} + {t['n']}, {t['tune_cpu_s'] + t['runs_cpu_s']:,.0f} | {params} | "
            f"{done} |")
    return lines


def plot(table: list[dict], path) -> None:
    """Paired differences to plain fine-tuning with their 95 % intervals, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(t["dataset"] for t in table))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [t for t in table if t["dataset"] == ds and t["diff"]]
        for i, t in enumerate(rows):
            d = t["diff"]
            ax.errorbar(i, 100 * d["mean"], yerr=[[100 * (d["mean"] - d["lo"])], [100 * (d["hi"] - d["mean"])]],
                        fmt="o", capsize=4)
        if not rows:
            ax.text(0.5, 0.5, "no paired runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(rows)), [t["method"] for t in rows])
        ax.set_xlim(-0.5, max(len(rows), 1) - 0.5)
        ax.set_title(f"{ds}: test accuracy minus plain fine-tuning (points, 95 % CI)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(saved: dict, res: Path, report: Path, root: Path) -> None:
    """results.json / .csv, diffs.png, and the generated table between the markers of docs/results.md."""
    saved["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (res / "results.json").write_text(json.dumps(saved, indent=1))
    with open(res / "results.csv", "w", newline="") as f:
        keys = ["dataset", "method", "seed", "subset", "test_accuracy", "val_accuracy", "train_accuracy", "train_loss",
                "bound_C", "updates", "cpu_s", "wall_s", "best_val_epoch", "params"]
        w = csv.writer(f)
        w.writerow(keys)
        for r in saved["runs"]:
            # a post-hoc row (wise-ft) has no per-epoch validation: no best_val_epoch
            w.writerow([json.dumps(r.get(k)) if k == "params" else r.get(k, "") for k in keys])
    notes = saved["row_notes"]
    order = list(notes) + [m for m in dict.fromkeys(r["method"] for r in saved["runs"]) if m not in notes]
    table = summarise(saved["runs"], saved["tuning"], order)
    if table:
        plot(table, res / "diffs.png")
    a = saved["args"]
    lines = [START, f"Generated by `bench/accuracy_table.py` on {saved['updated']} from "
             f"{os.path.relpath(res / 'results.json', root)} ({len(saved['runs'])} finished runs).", ""]
    lines += markdown_table(table, len(a["seeds"]), notes)
    for t in saved["tuning"]:
        lines.append(f"\nSweep {t['dataset']} / {t['method']}: {t['trials']} trials, best val acc. "
                     f"{100 * t['best_val']:.1f} %, {t['cpu_s']:,.0f} CPU-s ({t['wall_s']:,.0f} s wall).")
    for c in saved.get("reproduce", []):
        if "stored_test_accuracy" in c:
            lines.append(f"\nRe-run of {c['dataset']} / none / seed {c['seed']} (for wise-ft): test "
                         f"{100 * c['rerun_test_accuracy']:.2f} % vs stored {100 * c['stored_test_accuracy']:.2f} % "
                         f"({100 * c['test_diff']:+.2f} points).")
    for q in saved["problems"]:
        lines.append(f"\nNot run: {q['dataset']} / {q['method']}: {q['error'][:300]}")
    started = {(t["dataset"], t["method"]) for t in table} | {(q["dataset"], q["method"]) for q in saved["problems"]}
    waiting = [m for m in order if any((ds, m) not in started for ds in a["datasets"])]
    if waiting:
        lines.append(f"\nNot yet run (queued or not started): {', '.join(waiting)}.")
    lines.append(END)
    text = report.read_text() if report.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{report}: the markers {START} / {END} around the generated table are missing")
    head, rest = text.split(START, 1)
    report.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])
