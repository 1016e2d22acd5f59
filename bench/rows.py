"""The rows of the accuracy bench (bench/accuracy_table.py) and how finished ones are reused.

A row is a name in the table and what it runs: a constraint method plus method-specific overrides on top of the
protocol's base overrides (the same for every row: the paired design), whether the sweep tunes the method's knobs,
and what the method controls (a column of the table). `wise-ft` is not a training run: it interpolates the `none`
runs (bench/wise_row.py).

Reuse: results.json keeps every finished row with a `protocol` stamp (a hash of the base recipe's text and the base
overrides of its data set: shots, epochs, lr, ...) and the overrides it ran with. A row for (data set, row name,
seed) with the same stamp and overrides, on the same training subset (fingerprint), is not run again; a sweep record
with the same stamp, budget and tuning seed likewise. Rows written before the stamps existed are stamped once from
the arguments saved with them (`migrate`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

# mars-ftp's radii in units of each layer's pretrained MARS norm (the default) or as the reference code sets them.
# Rows stored before the setting existed ran plain `constraint.method=mars-ftp`, which then was the reference: they
# count as the reference row (`reuse_as`).
FTP_REFERENCE = ["constraint.ftp.scale=reference"]
FTP_FIXED = ["constraint.ftp.scale=layer"]


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    controls: str
    """What the method controls (constraint or penalty, which norm): a column of the table."""
    overrides: tuple[str, ...] = ()
    tune: bool | None = None
    """Sweep the method's knobs (8 trials, tuning seed): None = when the method has sweep knobs."""
    kind: str = "train"
    """'train' (a fine-tune per seed) or 'wise' (WiSE-FT of the `none` runs)."""
    reuse_as: tuple[tuple[str, ...], ...] = ()
    """Other override lists whose stored rows count as this row (rows stored before a setting existed)."""
    params_from: str | None = None
    """Take the tuned values of this row's sweep instead of running a sweep (same method)."""


def lp_steps(a, updates_per_epoch: int) -> int:
    return a.lp_epochs * updates_per_epoch


def build_rows(a, updates_per_epoch: int) -> dict[str, Row]:
    """Every row of the bench, in schedule order (finished ones are reused, so the order is that of new work)."""
    lp = f"train.linear_probe_steps={lp_steps(a, updates_per_epoch)}"
    rows = [
        Row("none", "none", "nothing (plain fine-tuning)"),
        Row("mars-pgm", "mars-pgm", "constraint: MARS ball per layer (projection)"),
        Row("l2-sp", "l2-sp", "penalty: squared Frobenius distance"),
        Row("mars-ftp (reference init)", "mars-ftp", "constraint: MARS ball, radii learned (reference: init 1e-8, "
            "step 1e-2)", tuple(FTP_REFERENCE), tune=False, reuse_as=((),)),
        Row("mars-sp", "mars-sp", "penalty: MARS distance"),
        Row("l2-pgm", "l2-pgm", "constraint: Frobenius ball per layer (projection)"),
        Row("lp-ft", "none", f"schedule: head alone for the first {a.lp_epochs} epochs, then plain", (lp,)),
        Row("wise-ft", "none", "post hoc: W0 + α (W − W0) of the `none` run, α on validation", kind="wise"),
        Row("mars-pgm + lp-ft", "mars-pgm", f"constraint: MARS ball; head alone for the first {a.lp_epochs} "
            "epochs", (lp,), tune=False, params_from="mars-pgm"),
        Row("delta", "delta", "penalty: attention-weighted feature-map distance + head L2"),
        Row("spd", "spd", "decay towards W0 after the update where the gradient points away (Frobenius growth)"),
        Row("mars-spd", "mars-spd", "decay towards W0 after the update where the gradient points away (MARS growth)"),
        Row("mars-ftp", "mars-ftp", "constraint: MARS ball, radii learned (layer-scaled)", tuple(FTP_FIXED),
            tune=False),
    ]
    return {r.name: r for r in rows}


def protocol_stamp(base: str | Path, overrides: list[str]) -> str:
    """Hash of what every row of a data set shares: the base recipe's text and the base overrides."""
    text = Path(base).read_text()
    return hashlib.sha1(json.dumps([text, overrides]).encode()).hexdigest()[:12]


def tuning_stamp(protocol: str, trials: int, tune_seed: int) -> str:
    return f"{protocol}-t{trials}-s{tune_seed}"


def row_overrides(row: Row, params: dict) -> list[str]:
    """The overrides that distinguish a row's runs from the base: method, its own settings, the tuned values."""
    return [f"constraint.method={row.method}", *row.overrides, *(f"constraint.{k}={v}" for k, v in params.items())]


def migrate(saved: dict, stamp_of) -> int:
    """Stamp rows and sweep records stored before stamps existed, from the arguments saved with them;
    `stamp_of(args, dataset)` is the protocol stamp. The old mars-ftp rows are the reference init's. Returns the
    number of records stamped."""
    old, n = saved["args"], 0
    for r in saved["runs"]:
        if "protocol" not in r:
            if r["method"] == "mars-ftp":
                r["method"] = "mars-ftp (reference init)"
            base = "none" if r["method"] in ("none",) else r["method"]
            r["protocol"] = stamp_of(old, r["dataset"])
            r["overrides"] = [f"constraint.method={base.split(' ')[0]}",
                              *(f"constraint.{k}={v}" for k, v in r["params"].items())]
            n += 1
    for t in saved["tuning"]:
        if "protocol" not in t:
            t["protocol"] = tuning_stamp(stamp_of(old, t["dataset"]), old["trials"], old["tune_seed"])
            n += 1
    return n


def find_run(saved: dict, dataset: str, row: Row, seed: int, stamp: str, overrides: list[str]) -> dict | None:
    """The stored run of this row and seed made under this protocol with these overrides, if any."""
    accepted = [overrides] + [[overrides[0], *alt, *overrides[1 + len(row.overrides):]] for alt in row.reuse_as]
    for r in saved["runs"]:
        if (r["dataset"], r["method"], r["seed"], r.get("protocol")) == (dataset, row.name, seed, stamp) and \
                r.get("overrides") in accepted:
            return r
    return None


def find_tuning(saved: dict, dataset: str, method: str, stamp: str) -> dict | None:
    return next((t for t in saved["tuning"] if (t["dataset"], t["method"], t.get("protocol")) ==
                 (dataset, method, stamp)), None)
