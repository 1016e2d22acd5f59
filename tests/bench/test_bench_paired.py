"""The accuracy bench's statistics (bench/paired.py): the paired 95 % t-interval against scipy's."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.paired import paired_ci, t975  # noqa: E402


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 29, 30, 40, 100):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1.5e-3), df


def test_paired_interval_uses_only_common_seeds_and_the_differences():
    method = {0: 0.80, 1: 0.75, 2: 0.90, 3: 0.70, 4: 0.85, 7: 0.10}  # seed 7 has no baseline: ignored
    base = {0: 0.78, 1: 0.70, 2: 0.91, 3: 0.65, 4: 0.80}
    got = paired_ci(method, base)
    d = [0.02, 0.05, -0.01, 0.05, 0.05]
    half = 2.776 * statistics.stdev(d) / math.sqrt(5)
    assert got["n"] == 5 and got["seeds"] == [0, 1, 2, 3, 4]
    assert got["mean"] == pytest.approx(statistics.mean(d))
    assert (got["lo"], got["hi"]) == pytest.approx((statistics.mean(d) - half, statistics.mean(d) + half))
    # pairing matters: the unpaired spread of either method is far wider than this interval
    assert got["hi"] - got["lo"] < statistics.stdev(base.values())
    assert paired_ci({0: 0.5}, {0: 0.4}) is None


def test_outputs_take_a_post_hoc_row_without_per_epoch_validation(tmp_path):
    """A wise-ft record (no val_curve / best_val_epoch: it is not a training run) beside the stored training runs:
    the csv, the plot and the table are written (the first wise-ft record once stopped the bench with a KeyError)."""
    import csv
    import json

    from bench.paired import write_outputs

    root = Path(__file__).resolve().parents[2]
    saved = json.loads((root / "bench/results/overfit/results.json").read_text())
    runs = [r for r in saved["runs"] if r["method"] == "none"]
    wise = [{**{k: v for k, v in r.items() if k not in ("val_curve", "best_val_epoch")}, "method": "wise-ft",
             "alpha": 0.7, "test_accuracy": r["test_accuracy"] + 0.01} for r in runs]
    saved = {**saved, "runs": runs + wise, "problems": []}
    report = tmp_path / "results.md"
    write_outputs(saved, tmp_path, report, root)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == len(runs) + len(wise)
    assert {r["best_val_epoch"] for r in rows if r["method"] == "wise-ft"} == {""}
    table = report.read_text()
    assert "| wise-ft |" in table and (tmp_path / "diffs.png").stat().st_size > 0
