"""`mars-dist sweep CONFIG [overrides] --trials N`: radius / penalty-weight search with Optuna TPE.

The reference tuned radii with hyperopt TPE (20 trials, log-uniform ranges, scored on validation accuracy); Optuna's
TPE is the maintained equivalent and adds what we need: a persistent study (SQLite / any RDB URL) that an
interrupted sweep resumes, and that several workers (a SLURM job array) share. Each trial is a full fine-tune in a
subprocess (`python -m mars_dist train`, or under a launcher such as `accelerate launch ...`), with its own
output_dir and W&B run, so a trial that crashes cannot take the study down with it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mars_dist import config as config_mod

# Which knobs each method searches (PGM: radii; SP: penalty weights; none: nothing but the seed-fixed run).
SEARCH_SPACE = {
    "mars-pgm": {"radius": "radius_range", "head_radius": "head_radius_range"},
    "l2-pgm": {"radius": "radius_range", "head_radius": "head_radius_range"},
    "mars-sp": {"penalty": "penalty_range", "head_penalty": "penalty_range"},
    "l2-sp": {"penalty": "penalty_range", "head_penalty": "penalty_range"},
    "none": {},
}


def suggest(trial, cfg: config_mod.Config) -> dict:
    """The constraint values of one trial, log-uniform in the configured ranges."""
    values = {}
    for key, range_key in SEARCH_SPACE[cfg.constraint.method].items():
        lo, hi = getattr(cfg.sweep, range_key)
        values[key] = trial.suggest_float(key, lo, hi, log=True)
    return values


def run_trial(cfg: config_mod.Config, values: dict, trial_dir: Path, launcher: list[str]) -> dict:
    """Run one fine-tune with `values` in a subprocess; return its summary.json."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = config_mod.to_dict(cfg)
    data["constraint"].update(values)
    data["output_dir"] = str(trial_dir)
    data["resume"] = "auto"  # a trial interrupted mid-way continues from its own checkpoint
    data["tracking"]["run_name"] = trial_dir.name
    path = trial_dir / "trial_config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = launcher + ["-m", "mars_dist", "train", str(path)] if launcher else \
        [sys.executable, "-m", "mars_dist", "train", str(path)]
    with open(trial_dir / "trial.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"trial in {trial_dir} failed with exit code {proc.returncode}; see {trial_dir}/trial.log")
    return json.loads((trial_dir / "summary.json").read_text())


def open_study(cfg: config_mod.Config):
    import optuna

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = cfg.sweep.storage or f"sqlite:///{out.resolve()}/study.db"
    # Heartbeats let a restarted sweep (or another array task) fail trials whose worker died, and retry them.
    storage = optuna.storages.RDBStorage(
        url, heartbeat_interval=30, grace_period=90,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
    study = optuna.create_study(study_name=cfg.sweep.study_name or out.name, storage=storage, direction="maximize",
                                load_if_exists=True)
    # Reproducible but not repeating: a resumed sweep (or another array task) must not redraw the suggestions the
    # study already holds, so the sampler's seed moves with the trials already there and the array task id.
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    study.sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed + 1000 * task + len(study.trials))
    return study


def sweep(cfg: config_mod.Config, trials: int | None = None, launcher: str = "") -> dict:
    """Run trials until the study holds `cfg.sweep.trials` finished ones (or `trials` more from this worker)."""
    import optuna

    study = open_study(cfg)
    budget = cfg.sweep.trials
    argv = shlex.split(launcher)

    def objective(trial):
        values = suggest(trial, cfg)
        summary = run_trial(cfg, values, Path(cfg.output_dir) / f"trial_{trial.number:04d}", argv)
        trial.set_user_attr("summary", summary)
        return summary[cfg.sweep.metric]

    def finished() -> int:
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    ran = 0
    while finished() < budget and (trials is None or ran < trials):
        study.optimize(objective, n_trials=1, catch=(RuntimeError,))
        ran += 1
    best = study.best_trial if finished() else None
    report = {"study": study.study_name, "finished_trials": finished(), "budget": budget,
              "best_value": best.value if best else None, "best_params": best.params if best else None,
              "best_trial": best.number if best else None}
    (Path(cfg.output_dir) / "sweep_best.json").write_text(json.dumps(report, indent=1))
    return report
