"""The `wise-ft` row of the accuracy bench: WiSE-FT (Wortsman et al., CVPR 2022) of the plain fine-tuning runs.

For each seed the `none` run is (re-)run into its run directory with its export (the stored `none` rows keep their
numbers; the re-run's test accuracy is compared with the stored one: a determinism check), then `mars-dist wise
RUN --alpha 0 0.1 ... 1 --split val` writes an export per alpha, W0 + alpha (W - W0), and evaluates it on the run's
validation split. The alpha with the best validation accuracy of that run is chosen (ties: the largest, the least
interpolation), and only its export is evaluated on the test split (and on the training images, for the table's
train accuracy). Choosing per run on its own validation split is what a user of one run does; no test image is
seen. Compute: the `none` run plus the interpolations and evaluations, all counted in the row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def _cli(args: list[str], log: Path, cwd: Path) -> None:
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "mars_dist", *args], stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"mars-dist {args[0]} exited {proc.returncode}: {' | '.join(tail)}")


def _evaluate(export: Path, split: str, out: Path, cwd: Path) -> dict:
    _cli(["eval", str(export), "--split", split, "--output-dir", str(out)], out.parent / "wise_eval.log", cwd)
    return json.loads(next(out.glob(f"eval_*-{split}.json")).read_text())


def choose(curve: list[dict]) -> dict:
    """The point of the validation curve with the best accuracy; ties go to the largest alpha."""
    return max(curve, key=lambda r: (r["val_accuracy"], r["alpha"]))


def wise_ft(run_dir: Path, none_result: dict, children_cpu, cwd: Path, alphas=ALPHAS) -> dict:
    """The row's numbers for one finished `none` run directory (with export/); `none_result` is its summary
    with telemetry (run_train's result). Exports of the alphas not chosen are removed afterwards (14 MB each)."""
    done = run_dir / "wise_row.json"
    if done.exists():
        return json.loads(done.read_text())
    cpu0, t0 = children_cpu(), time.time()
    (run_dir / "wise.json").unlink(missing_ok=True)
    _cli(["wise", str(run_dir), "--alpha", *map(str, alphas), "--split", "val"], run_dir / "wise_val.log", cwd)
    curve = json.loads((run_dir / "wise.json").read_text())
    best = choose(curve)
    export = Path(best["export"])
    test = _evaluate(export, "test", run_dir / "wise_test", cwd)
    train = _evaluate(export, "train", run_dir / "wise_train", cwd)
    for p in run_dir.glob("export_wise_*"):
        if p != export:
            shutil.rmtree(p, ignore_errors=True)
    at_one = next((r["val_accuracy"] for r in curve if r["alpha"] == 1), None)
    row = {"alpha": best["alpha"], "test_accuracy": test["accuracy"], "val_accuracy": best["val_accuracy"],
           "train_accuracy": train["accuracy"], "train_loss": train["loss"], "bound_C": best["certificate"]["C"],
           "updates": none_result["updates"], "wise_curve": [[r["alpha"], r["val_accuracy"]] for r in curve],
           "val_at_alpha_1": at_one, "none_val_accuracy": none_result["val_accuracy"],
           "wise_cpu_s": children_cpu() - cpu0, "wise_wall_s": time.time() - t0}
    # the row's compute: the fine-tune it starts from plus the interpolations
    row["cpu_s"], row["wall_s"] = none_result["cpu_s"] + row["wise_cpu_s"], none_result["wall_s"] + row["wise_wall_s"]
    done.write_text(json.dumps(row, indent=1))
    return row
