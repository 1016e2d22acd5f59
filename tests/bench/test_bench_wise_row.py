"""The bench's wise-ft row (bench/wise_row.py) end to end on a tiny real `none` run of the bundled Lite0: at
alpha = 1 the interpolated export, evaluated through `mars-dist eval`, must give the trainer's own final test,
validation and train accuracies (two independent paths: the trainer's evaluation vs export -> interpolate ->
certify -> load -> evaluate); the row is written once and read back on a second call."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from launch_helpers import run_cli  # noqa: E402

from bench.accuracy_table import children_cpu  # noqa: E402
from bench.wise_row import wise_ft  # noqa: E402

TINY = ["model.pretrained=bundled", "data.name=fashion-mnist", "data.image_size=32", "data.train_per_class=4",
        "data.val_per_class=2", "data.test_limit=40", "train.max_steps=3", "train.batch_size=8",
        "constraint.method=none", "tracking.wandb_mode=disabled", "checkpoint.every_steps=null", "resume=none"]


@pytest.mark.slow
def test_wise_row_at_alpha_one_reproduces_the_run(tmp_path):
    run = tmp_path / "none"
    run_cli(run, TINY)
    summary = json.loads((run / "summary.json").read_text())
    result = {**summary, "cpu_s": 1.0, "wall_s": 2.0}
    row = wise_ft(run, result, children_cpu, ROOT, alphas=[1.0])
    assert row["alpha"] == 1.0 and row["wise_curve"] == [[1.0, row["val_accuracy"]]]
    for key in ("test_accuracy", "val_accuracy", "train_accuracy"):
        assert row[key] == pytest.approx(summary[key], abs=1e-12), key
    assert row["cpu_s"] > 1.0 and row["wall_s"] > 2.0  # the run's compute plus the interpolation's
    assert wise_ft(run, result, children_cpu, ROOT, alphas=[1.0]) == row  # written once, reused
