"""The accuracy bench's rows and their reuse (bench/rows.py): a stored run is reused only under the same protocol
stamp, overrides and row name; records stored before the stamps are stamped from their own saved arguments; the
old mars-ftp rows become the reference init's and are not taken for the fixed mars-ftp."""

import argparse
import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench import rows as R  # noqa: E402
from bench.accuracy_table import base_overrides  # noqa: E402
from bench.wise_row import choose  # noqa: E402

ARGS = dict(base=str(ROOT / "recipes" / "demo.yaml"), datasets=["fashion-mnist"], trials=8, seeds=[0, 1],
            tune_seed=100, shots=20, image_size=32, epochs=30, halve_at=20, batch_size=16, lr=1e-3, val_per_class=20,
            test_limit=2000, lp_epochs=10)


def stamp_of(args, ds):
    return R.protocol_stamp(args["base"], base_overrides(argparse.Namespace(**args), ds))


def old_results():
    """results.json as the bench wrote it before stamps (2026-12-02): method names, params, no overrides."""
    run = lambda method, seed, params: {"dataset": "fashion-mnist", "method": method, "seed": seed,  # noqa: E731
                                        "params": params, "subset": f"s{seed}", "test_accuracy": 0.7}
    return {"args": dict(ARGS, methods=["none", "mars-pgm", "mars-ftp"]),
            "runs": [run("none", 0, {}), run("mars-pgm", 0, {"radius": 10.0, "head_radius": 8.0}),
                     run("mars-ftp", 0, {})],
            "tuning": [{"dataset": "fashion-mnist", "method": "mars-pgm", "trials": 8,
                        "params": {"radius": 10.0, "head_radius": 8.0}}], "problems": []}


def test_stored_rows_are_reused_only_under_the_same_protocol_and_overrides():
    saved = old_results()
    assert R.migrate(saved, stamp_of) == 4 and R.migrate(saved, stamp_of) == 0  # stamped once
    a = argparse.Namespace(**ARGS)
    rows = R.build_rows(a, updates_per_epoch=12)
    stamp = stamp_of(ARGS, "fashion-mnist")
    t = R.find_tuning(saved, "fashion-mnist", "mars-pgm", R.tuning_stamp(stamp, 8, 100))
    assert t["params"] == {"radius": 10.0, "head_radius": 8.0}
    assert R.find_tuning(saved, "fashion-mnist", "mars-pgm", R.tuning_stamp(stamp, 20, 100)) is None  # budget
    pgm = rows["mars-pgm"]
    assert R.find_run(saved, "fashion-mnist", pgm, 0, stamp, R.row_overrides(pgm, t["params"]))
    assert R.find_run(saved, "fashion-mnist", pgm, 1, stamp, R.row_overrides(pgm, t["params"])) is None  # seed
    assert R.find_run(saved, "fashion-mnist", pgm, 0, stamp, R.row_overrides(pgm, {"radius": 3.0})) is None
    # another protocol (more epochs): nothing stored is reused
    other = stamp_of(dict(ARGS, epochs=60), "fashion-mnist")
    assert other != stamp and R.find_run(saved, "fashion-mnist", rows["none"], 0, other, ["constraint.method=none"]) \
        is None
    assert R.find_run(saved, "fashion-mnist", rows["none"], 0, stamp, ["constraint.method=none"])
    # lp-ft runs method none too, but is its own row with its own overrides
    lp = rows["lp-ft"]
    assert R.row_overrides(lp, {}) == ["constraint.method=none", "train.linear_probe_steps=120"]  # a third of 360
    assert R.find_run(saved, "fashion-mnist", lp, 0, stamp, R.row_overrides(lp, {})) is None


def test_old_mars_ftp_rows_are_the_reference_init_not_the_fixed_method():
    saved = old_results()
    R.migrate(saved, stamp_of)
    rows = R.build_rows(argparse.Namespace(**ARGS), updates_per_epoch=12)
    stamp = stamp_of(ARGS, "fashion-mnist")
    ref, fixed = rows["mars-ftp (reference init)"], rows["mars-ftp"]
    assert [r["method"] for r in saved["runs"]][-1] == "mars-ftp (reference init)"
    assert R.find_run(saved, "fashion-mnist", ref, 0, stamp, R.row_overrides(ref, {}))  # the alias of old rows
    assert R.find_run(saved, "fashion-mnist", fixed, 0, stamp, R.row_overrides(fixed, {})) is None
    # the alias is only for the reference row's stored runs: a changed base override still misses
    assert R.find_run(copy.deepcopy(saved), "fashion-mnist", ref, 0, "other", R.row_overrides(ref, {})) is None


def test_wise_alpha_choice_is_the_best_validation_accuracy_ties_to_the_largest():
    curve = [{"alpha": 0.0, "val_accuracy": 0.1}, {"alpha": 0.5, "val_accuracy": 0.8},
             {"alpha": 0.7, "val_accuracy": 0.8}, {"alpha": 1.0, "val_accuracy": 0.75}]
    assert choose(curve)["alpha"] == 0.7
    with pytest.raises(ValueError):
        choose([])
