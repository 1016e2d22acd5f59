"""End to end, one process: the real bundled ImageNet EfficientNet-Lite0 fine-tuned on real Fashion-MNIST images."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mars_dist.run import checkpoint as ckpt
from mars_dist import config
from mars_dist.run.train import TrainingDiverged, train

pytestmark = pytest.mark.slow


def tiny(tmp_path: Path, *overrides: str) -> config.Config:
    """A run of a few seconds: 32 px, 4 images per class, 4 updates."""
    return config.load(None, [
        f"output_dir={tmp_path}", "data.image_size=32", "data.train_per_class=4", "data.val_per_class=2",
        "data.test_limit=40", "train.batch_size=8", "train.max_steps=4", "train.lr=3e-3",
        "constraint.radius=1.0", "constraint.head_radius=2.0", "tracking.wandb_mode=disabled", *overrides])


def weights(path: Path) -> dict:
    return load_file(str(path / "export" / "model.safetensors"))


def pretrained_state() -> dict:
    from mars_dist.models.factory import build_model

    return build_model("tf_efficientnet_lite0", "bundled", num_classes=10).state_dict()


def test_end_to_end_bound_holds_and_is_active(tmp_path):
    result = train(tiny(tmp_path, "tracking.wandb_mode=offline"))
    assert result["updates"] == 4 and 0.0 <= result["test_accuracy"] <= 1.0
    for name in ("config.yaml", "metrics.jsonl", "layers.json", "layers.png", "summary.json", "constraints.json"):
        assert (tmp_path / name).is_file(), name
    # the exported weights, compared with the pretrained ones layer by layer
    trained, start = weights(tmp_path), pretrained_state()
    layers = json.loads((tmp_path / "constraints.json").read_text())["layers"]
    at_radius = 0
    for layer in layers:
        if layer["role"] != "matrix":
            continue
        d = (trained[layer["name"]] - start[layer["name"]]).flatten(1).abs().sum(1)
        assert float(d.max()) <= layer["radius"] * (1 + 1e-5), layer["name"]
        at_radius += bool(float(d.max()) >= layer["radius"] * (1 - 1e-4))
    assert at_radius > 0, "the projection was never active"
    head = trained["classifier.weight"].abs().sum(1)
    assert float(head.max()) <= 2.0 * (1 + 1e-5)
    # per-layer series in the metrics and in the offline W&B run
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    series = [r for r in rows if "layers/conv_stem.weight/distance" in r]
    assert len(series) == 4 and all("layers/conv_stem.weight/radius" in r and "bound/C" in r for r in series)
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_files, "no offline W&B run file"
    data = run_files[0].read_bytes()
    assert b"layers/conv_stem.weight/radius" in data and b"layers/conv_stem.weight/distance" in data


def test_resume_is_exact(tmp_path):
    """4 updates in one go == 2 updates, stop, resume: bit-identical weights."""
    whole = tmp_path / "whole"
    train(tiny(whole))
    part = tmp_path / "part"
    train(tiny(part, "checkpoint.every_steps=2", "checkpoint.keep_last=5"))
    # pretend the job died after update 2: drop everything written later
    for later in ckpt.list_checkpoints(part)[1:]:
        import shutil

        shutil.rmtree(later)
    assert ckpt.latest_checkpoint(part).name == "step_00000002"
    result = train(tiny(part, "resume=auto", "checkpoint.every_steps=2"))
    assert result["updates"] == 4
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_other_anchor_is_refused(tmp_path):
    train(tiny(tmp_path, "train.max_steps=2"))
    saved = sorted((tmp_path / "checkpoints").iterdir())
    with pytest.raises(ckpt.CheckpointError, match="pretrained"):
        train(tiny(tmp_path, "train.max_steps=3", "resume=auto", "model.pretrained=none"))
    assert sorted((tmp_path / "checkpoints").iterdir()) == saved  # nothing lost


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "constraint.method=none", "train.optimizer=sgd", "train.lr=1e36", "train.max_steps=20",
               "checkpoint.every_steps=1", "train.scheduler=constant")
    with pytest.raises(TrainingDiverged, match="loss is"):
        train(cfg)
    last = ckpt.latest_checkpoint(tmp_path)
    assert last is not None and ckpt.read_state(last)["step"] >= 1


def test_constraints_json_states_a_radius_only_for_projected_layers():
    """A penalty layer lists its weight, a decayed (SPD) or measured-only layer neither: a number under `radius`
    would read as a bound the run never enforced."""
    from mars_dist.constraints import Constraint
    from mars_dist.run.train import _layer_record

    rows = {action: _layer_record(Constraint("conv.weight", (4, 3), "matrix", action, radius=0.1, weight=0.01))
            for action in ("project", "penalty", "decay", "none")}
    assert rows["project"]["radius"] == 0.1 and "weight" not in rows["project"]
    assert rows["penalty"]["radius"] is None and rows["penalty"]["weight"] == 0.01
    assert all(rows[a]["radius"] is None and "weight" not in rows[a] for a in ("decay", "none"))
    assert rows["project"]["shape"] == [4, 3] and rows["decay"]["action"] == "decay"
