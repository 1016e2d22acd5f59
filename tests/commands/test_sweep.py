"""Radius search: log-uniform suggestions in the configured ranges; a persistent study that an interrupted sweep
continues (real fine-tunes as trials)."""

import json

import optuna
import pytest

from mars_dist import config
from mars_dist.commands.sweep import open_study, suggest, sweep
from mars_dist.constraints.methods import METHODS


@pytest.mark.parametrize("method", list(METHODS))
def test_suggestions_stay_in_ranges(method):
    cfg = config.load(None, [f"constraint.method={method}", "sweep.radius_range=[2, 8]",
                             "sweep.penalty_range=[1e-4, 1e-2]", "sweep.head_radius_range=[2, 8]",
                             "sweep.spd_strength_range=[1e-4, 1e-2]",
                             "sweep.delta_alpha_range=[1e-4, 1e-2]", "sweep.delta_beta_range=[1e-4, 1e-2]"])
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        values = suggest(trial, cfg)
        assert set(values) == set(METHODS[method].search)
        for key, v in values.items():
            lo, hi = (2, 8) if "radius" in key else (1e-4, 1e-2)
            assert lo <= v <= hi
        study.tell(trial, 0.0)
    for dist in study.trials[0].distributions.values():  # searched log-uniformly, as the reference did
        assert dist.log


@pytest.mark.slow
def test_interrupted_sweep_continues_the_same_study(tmp_path):
    cfg = config.load(None, [
        f"output_dir={tmp_path}", "data.image_size=32", "data.train_per_class=3", "data.val_per_class=2",
        "data.test_limit=10", "train.batch_size=10", "train.max_steps=2", "tracking.wandb_mode=offline",
        "sweep.trials=2", "sweep.radius_range=[1, 4]", "sweep.head_radius_range=[1, 4]"])
    first = sweep(cfg, trials=1)  # this worker stops after one trial (as if interrupted)
    assert first["finished_trials"] == 1
    second = sweep(cfg)  # runs until the study holds its budget
    assert second["finished_trials"] == 2 and second["study"] == first["study"]
    study = open_study(cfg)
    params = [t.params for t in study.trials]
    assert len(params) == 2 and params[0] != params[1]
    for t in study.trials:  # every trial is a real fine-tune with its own output dir and W&B run
        run = tmp_path / f"trial_{t.number:04d}"
        summary = json.loads((run / "summary.json").read_text())
        assert t.value == summary["val_accuracy"]
        assert list((run / "wandb").glob("offline-run-*"))
        assert json.loads((run / "constraints.json").read_text())["layers"][0]["radius"] == pytest.approx(
            t.params["radius"])
    assert json.loads((tmp_path / "sweep_best.json").read_text())["best_trial"] in (0, 1)
