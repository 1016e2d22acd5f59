"""`mars-dist sweep CONFIG [overrides] --trials N`: radius / penalty-weight search with Optuna TPE.

The reference tuned radii with hyperopt TPE (20 trials, log-uniform ranges, scored on validation accuracy); Optuna's
TPE is the maintained equivalent and adds what we need: a persistent study (SQLite / any RDB URL) that an
interrupted sweep resumes, and that several workers (a SLURM job array) share. Each trial is a full fine-tune in a
subprocess (`python -m mars_dist train`, or under a launcher such as `accelerate launch ...`), with its own
output_dir and W&B run, so a trial that crashes cannot take the study down with it.

Preemption: a trial whose trainer checkpointed on SIGUSR1/SIGTERM (exit 99, or a launcher's failure with the
trainer's preempted.json) is marked FAIL + user attribute `preempted`, and the sweep exits 99 as well (the SLURM array
script then requeues the task). The next run of the same worker (SLURM_ARRAY_TASK_ID) queues that trial again with
its parameters and its trial directory, where `resume=auto` continues from the trial's own checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mars_dist import config as config_mod
from mars_dist.constraints.methods import method

EXIT_PREEMPTED = 99  # = mars_dist.train.EXIT_PREEMPTED (not imported here: that module pulls in torch)


class TrialPreempted(Exception):
    """The trial's trainer checkpointed for a preemption and exited 99. Not a RuntimeError: the study must not
    swallow it as an ordinary failed trial."""




def suggest(trial, cfg: config_mod.Config) -> dict:
    """The constraint values of one trial, log-uniform in the configured ranges."""
    values = {}
    for key, range_key in method(cfg.constraint.method).search.items():
        lo, hi = getattr(cfg.sweep, range_key)
        values[key] = trial.suggest_float(key, lo, hi, log=True)
    return values


def run_trial(cfg: config_mod.Config, values: dict, trial_dir: Path, launcher: list[str]) -> dict:
    """Run one fine-tune with `values` in a subprocess; return its summary.json."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = config_mod.to_dict(cfg)
    for key, value in values.items():  # "delta.alpha": a key of the constraint's sub-section
        *path, last = key.split(".")
        section = data["constraint"]
        for part in path:
            section = section[part]
        section[last] = value
    data["output_dir"] = str(trial_dir)
    data["resume"] = "auto"  # a trial interrupted mid-way continues from its own checkpoint
    data["tracking"]["run_name"] = trial_dir.name
    path = trial_dir / "trial_config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    cmd = launcher + ["-m", "mars_dist", "train", str(path)] if launcher else \
        [sys.executable, "-m", "mars_dist", "train", str(path)]
    # Under a launcher the exit code is the launcher's (accelerate launch exits 1 when its workers exit 99): the
    # trainer's preempted.json, written during this run, tells a preemption apart from a failure.
    marker = trial_dir / "preempted.json"
    marker.unlink(missing_ok=True)
    with open(trial_dir / "trial.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode == EXIT_PREEMPTED or (proc.returncode != 0 and marker.exists()):
        raise TrialPreempted(f"trial in {trial_dir} was preempted (checkpoint saved, exit {proc.returncode}); it "
                             f"resumes from that checkpoint when this sweep worker runs again")
    if proc.returncode != 0:
        raise RuntimeError(f"trial in {trial_dir} failed with exit code {proc.returncode}; see {trial_dir}/trial.log")
    return json.loads((trial_dir / "summary.json").read_text())


def open_study(cfg: config_mod.Config):
    import optuna
    import sqlalchemy

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = cfg.sweep.storage or f"sqlite:///{out.resolve()}/study.db"
    # Heartbeats let a restarted sweep (or another array task) fail trials whose worker died, and retry them.
    # SQLite: wait for a writer's lock up to 60 s (default 5 s) while other array tasks write.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=30, grace_period=90,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
            break
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            # array tasks starting together race to create a new database's tables ("table studies already exists",
            # "UNIQUE constraint failed: alembic_version"): the loser tries again and finds them made
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    study = optuna.create_study(study_name=cfg.sweep.study_name or out.name, storage=storage, direction="maximize",
                                load_if_exists=True)
    # Reproducible but not repeating: a resumed sweep (or another array task) must not redraw the suggestions the
    # study already holds, so the sampler's seed moves with the trials already there and the array task id.
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    study.sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed + 1000 * task + len(study.trials))
    return study


def requeue_preempted(study, worker: str) -> list[str]:
    """Queue again (same parameters, same trial directory) every trial of `worker` whose latest attempt was
    preempted. Only this worker's own trials: array tasks starting together must not both resume one directory.
    Returns the trial directories queued."""
    import optuna

    latest = {}
    for t in study.get_trials(deepcopy=False):  # in trial-number order: the last attempt of a directory wins
        if "trial_dir" in t.user_attrs:
            latest[t.user_attrs["trial_dir"]] = t
    queued = []
    for name, t in latest.items():
        if t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("preempted") and \
                t.user_attrs.get("worker") == worker:
            study.enqueue_trial(t.params, user_attrs={"trial_dir": name, "worker": worker})
            queued.append(name)
    return queued


def sweep(cfg: config_mod.Config, trials: int | None = None, launcher: str = "") -> dict:
    """Run trials until the study holds `cfg.sweep.trials` finished ones (or `trials` more from this worker).
    Exits 99 (SystemExit) when a trial was preempted, or when a preemption signal came and trials remain."""
    import optuna

    study = open_study(cfg)
    budget = cfg.sweep.trials
    argv = shlex.split(launcher)
    worker = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    requeue_preempted(study, worker)

    def objective(trial):
        # a requeued trial carries its directory (and a heartbeat retry copies it): resume=auto continues there
        name = trial.user_attrs.get("trial_dir", f"trial_{trial.number:04d}")
        trial.set_user_attr("trial_dir", name)
        trial.set_user_attr("worker", worker)
        values = suggest(trial, cfg)  # a queued trial gets its fixed parameters back
        try:
            summary = run_trial(cfg, values, Path(cfg.output_dir) / name, argv)
        except TrialPreempted:
            trial.set_user_attr("preempted", True)
            raise
        trial.set_user_attr("summary", summary)
        return summary[cfg.sweep.metric]

    def finished() -> int:
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    # SLURM signals every process of the job step (a shell, the process group): the trial's trainer checkpoints on
    # its copy; this process must outlive it (the default action would kill it) to record the trial and exit 99.
    signalled = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: signalled.append(signum))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    ran = 0
    try:
        while finished() < budget and (trials is None or ran < trials):
            if signalled:  # preempted between trials: start no new one, let the requeued job continue
                raise SystemExit(EXIT_PREEMPTED)
            try:
                study.optimize(objective, n_trials=1, catch=(RuntimeError,))
            except TrialPreempted as err:
                print(f"mars-dist sweep: {err}; exiting {EXIT_PREEMPTED}", file=sys.stderr)
                raise SystemExit(EXIT_PREEMPTED) from None
            ran += 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    best = study.best_trial if finished() else None
    report = {"study": study.study_name, "finished_trials": finished(), "budget": budget,
              "best_value": best.value if best else None, "best_params": best.params if best else None,
              "best_trial": best.number if best else None}
    (Path(cfg.output_dir) / "sweep_best.json").write_text(json.dumps(report, indent=1))
    return report
