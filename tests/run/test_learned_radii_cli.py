"""mars-ftp through the CLI, as a user runs it: one process and ZeRO-3 on 2 processes (accelerate launch, gloo, real
DeepSpeed) give the same weights; the export keeps every learned layer within its final learned radius (checked here
in float64 from the export and the pretrained weights, not with mars_dist's own measure); the radius series move in
metrics.jsonl, starting at 1e-8 x the layer's pretrained ||W0||_MARS (constraint.ftp.scale: layer, the default); a run
resumed from a mid-run checkpoint ends bit-identical to the uninterrupted one (both settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_helpers import assert_same_weights, resume_from_middle, run_cli
from mars_dist.models.factory import build_model

pytestmark = [pytest.mark.slow, pytest.mark.dist]

FTP = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
       "train.max_steps=6", "train.bn_mode=eval", "constraint.method=mars-ftp", "constraint.head_radius=1.0",
       "constraint.ftp.lr=0.02", "train.optimizer=sgd", "train.lr=0.05", "train.grad_accum=2", "train.log_every=1",
       "checkpoint.every_steps=3", "checkpoint.keep_last=3", "tracking.wandb_mode=disabled"]


def _export(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def _independent_bound_check(run: Path) -> int:
    """Every learned layer of the export within its final learned radius (layers.json), in float64: MARS rows for
    matrices, |d - d0| for BatchNorm effective scales d = w / sqrt(running_var + 1e-6). Returns the layers checked."""
    layers = {layer["name"]: layer for layer in json.loads((run / "layers.json").read_text())["layers"]}
    roles = {layer["name"]: layer["role"] for layer in json.loads((run / "constraints.json").read_text())["layers"]}
    export = {k: v.double() for k, v in _export(run).items()}
    pretrained = {k: v.detach().double() for k, v in
                  build_model("tf_efficientnet_lite0", "bundled", 10, source="timm").state_dict().items()}
    checked = 0
    for name, role in roles.items():
        radius = layers[name]["radius"]
        if role == "head":
            assert radius == 1.0  # fixed, not learned
            continue
        w, w0 = export[name], pretrained[name]
        if role == "bn":
            var = export[name.rsplit(".", 1)[0] + ".running_var"]
            var0 = pretrained[name.rsplit(".", 1)[0] + ".running_var"]
            d = w / torch.sqrt(var + 1e-6)
            dist, scale = (d - w0 / torch.sqrt(var0 + 1e-6)).abs(), 4 * d.abs()  # clip in fp32 d, times denom
        else:
            dist, scale = (w - w0).reshape(w.shape[0], -1).abs().sum(1), w.reshape(w.shape[0], -1).abs().sum(1)
        # fp32 rounding of W0 + s D: up to 2^-24 |w| per element (visible next to a radius near its 1e-8 floor)
        allowed = radius * (1 + 5e-5) + 2.0 ** -22 * scale
        assert bool((dist <= allowed).all()), f"{name}: {float((dist - allowed).max())} over its learned radius {radius}"
        checked += 1
    return checked


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("ftp") / "single"
    run_cli(run, FTP + ["train.batch_size=8", "tracking.wandb_mode=offline"])
    return run


def test_single_process_learns_radii_and_keeps_them(single):
    records = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    key = "layers/blocks.6.0.conv_pwl.weight/radius"
    series = [r[key] for r in records if key in r]
    # constraint.ftp.scale: layer (the default): the first radius is 1e-8 x the layer's pretrained ||W0||_MARS,
    # taken here from the bundled weights (max row L1 norm)
    w0 = build_model("tf_efficientnet_lite0", "bundled", 10, source="timm").state_dict()["blocks.6.0.conv_pwl.weight"]
    unit = float(w0.double().flatten(1).abs().sum(1).max())
    assert len(series) == 6 and series[0] == pytest.approx(1e-8 * unit, rel=1e-5) and max(series) > 10 * series[0]
    moved = {k for r in records for k in r if k.endswith("/radius") and r[k] != records[0].get(k)}
    assert len(moved) >= 35, "the learned radius series should move for most of Lite0's 49 learned convolutions"
    assert _independent_bound_check(single) > 90  # Lite0: 49 learned convolutions, 49 BN scales fixed, the head
    layers = json.loads((single / "layers.json").read_text())["layers"]
    assert {layer["radius"] for layer in layers if layer["role"] == "bn"} == {5.0}  # fixed, as in MARS-PGM
    assert list((single / "wandb").glob("offline-run-*/run-*.wandb")), "no W&B offline run file"


def test_single_process_resume_is_bit_identical(single, tmp_path):
    again = resume_from_middle(single, tmp_path, None, FTP + ["train.batch_size=8", "tracking.wandb_mode=offline"])
    assert_same_weights(_export(single), _export(again), atol=0, rtol=0)


def test_zero3_two_processes_equals_single_and_resumes_exactly(single, tmp_path):
    run = tmp_path / "zero3"
    run_cli(run, FTP + ["train.batch_size=4"], "zero3.yaml")
    assert_same_weights(_export(single), _export(run))  # the learned radii agree too, or the weights would not
    radii = lambda r: [layer["radius"] for layer in json.loads((r / "layers.json").read_text())["layers"]]  # noqa
    assert radii(run) == pytest.approx(radii(single), rel=1e-4)
    assert _independent_bound_check(run) > 90
    again = resume_from_middle(run, tmp_path, "zero3.yaml", FTP + ["train.batch_size=4"])
    assert_same_weights(_export(run), _export(again), atol=0, rtol=0)
