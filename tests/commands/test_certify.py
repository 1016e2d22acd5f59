"""`mars-dist certify`: the export against the pretrained weights from their source, in float64.

End to end: a one-process fp32 run of the demo's model passes (trainer: summary.json + model card; the CLI on a
tampered copy of its export fails naming the layer); a Hugging Face ViT stored with save_pretrained passes under
learned radii (read from the run's layers.json); a DeepSpeed bf16 run must pass too. Unit level: an "export"
projected around bf16(W0) passes against bf16(W0) and fails against the fp32 pretrained weights."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch_helpers import ROOT, run_cli
from mars_dist import cli
from mars_dist.commands.certify import certify
from mars_dist.constraints import Fragment, project, select_constraints
from mars_dist.models.factory import build_model, classifier_module_names

SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=3", "train.batch_size=8", "constraint.radius=0.3", "constraint.head_radius=2.0",
         "tracking.wandb_mode=disabled"]


def run_certify(target: Path, *args: str, capsys) -> tuple[int, str]:
    """The CLI in this process (same parser and exit status as `mars-dist certify`)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(["certify", str(target), *args])
    return stop.value.code, capsys.readouterr().out


# ---------------------------------------------------------------- unit level: a bf16-cast anchor is caught
@pytest.fixture(scope="module")
def lite0():
    model = build_model("tf_efficientnet_lite0", "bundled", 10, head_seed=0)
    weights = {k: v.detach().clone() for k, v in {**dict(model.named_parameters()),
                                                   **dict(model.named_buffers())}.items()}
    return model, weights


def projected_export(model, weights: dict, anchor_dtype: torch.dtype, radius: float) -> tuple[dict, list]:
    """The pretrained weights moved by noise, then projected (the project's own projection, whole tensors) onto
    the balls around the pretrained weights cast to `anchor_dtype` and back."""
    constraints = select_constraints(model, classifier_module_names(model), "mars-pgm", radius, 1.0)
    gen = torch.Generator().manual_seed(0)
    export = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and "running" not in k
              else v.clone() for k, v in weights.items()}
    frags = []
    for c in constraints:
        w = export[c.name].reshape(-1)
        if c.role == "bn":
            c.running_var = export[c.name.rsplit(".", 1)[0] + ".running_var"]
        frags.append(Fragment(c, w, c.anchor_fragment(weights[c.name].to(anchor_dtype).float().reshape(-1), 0), 0))
    assert project(frags) > 0
    return export, constraints


def test_certify_catches_a_bf16_cast_anchor(lite0):
    model, weights = lite0
    export, constraints = projected_export(model, weights, torch.bfloat16, radius=0.05)
    bf16 = {k: v.to(torch.bfloat16).float() if "running" not in k else v for k, v in weights.items()}  # as DeepSpeed
    around_bf16 = certify(export, bf16, constraints, "bf16(pretrained)")
    assert around_bf16.passed, [c.name for c in around_bf16.over]  # the run's own anchors: inside
    assert around_bf16.at_bound > 0
    report = certify(export, weights, constraints, "the bundled file")
    assert report.passed is False
    matrices = [c for c in report.over if c.role == "matrix"]
    assert matrices and report.worst_ratio > 1.01, report.worst_ratio
    assert "FAILED" in report.lines()[-1] and matrices[0].name in report.lines()[-1]


def ulps_up(w: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        w = torch.nextafter(w, torch.full_like(w, math.inf))
    return w


def test_tolerance_is_one_float32_spacing_per_element(lite0):
    """A radius at mars-ftp's 1e-8 floor: weights one float32 step from W0 are as close as float32 can place them
    (pass); three steps are not (fail). The projection's 1e-5 relative slack is nothing at such a radius."""
    model, weights = lite0
    c = next(c for c in select_constraints(model, classifier_module_names(model), "mars-pgm", 1.0, 1.0)
             if c.name == "blocks.2.0.conv_pw.weight")
    c = dataclasses.replace(c, radius=1e-8)
    for steps, passes in ((1, True), (3, False)):
        export = {**weights, c.name: ulps_up(weights[c.name], steps)}
        report = certify(export, weights, [c], "the bundled file")
        assert report.passed is passes and report.worst_ratio > 10, (steps, report.worst_ratio)


def test_the_projection_around_fp32_anchors_passes_and_penalties_certify_nothing(lite0):
    model, weights = lite0
    export, constraints = projected_export(model, weights, torch.float32, radius=0.05)
    report = certify(export, weights, constraints, "the bundled file")
    assert report.passed, [(c.name, c.ratio) for c in report.over]
    assert report.at_bound > len(constraints) // 2
    # rows land on their radius to float32 rounding; a BatchNorm channel whose running variance is ~0 multiplies the
    # float32 spacing of its weight by 1 / sqrt(eps) = 1000 in effective-scale space (its allowance says so)
    assert max(c.ratio for c in report.layers if c.role != "bn") < 1 + 1e-4
    penalty = select_constraints(model, classifier_module_names(model), "mars-sp", 0.05, 1.0)
    unconstrained = certify(export, weights, penalty, "the bundled file")
    assert unconstrained.passed is None and unconstrained.worst_ratio is None
    assert [c.distance for c in unconstrained.layers] == [c.distance for c in report.layers]


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_one_process_run_is_certified_and_a_tampered_export_fails(tmp_path, capsys):
    run = tmp_path / "run"
    run_cli(run, SMALL)
    summary = json.loads((run / "summary.json").read_text())
    cert = summary["certificate"]
    assert cert["passed"] is True and "bundled" in cert["against"] and cert["at_bound"] > 0
    assert abs(cert["C"] - summary["bound_C"]) < 1e-4 * abs(summary["bound_C"])  # float64 vs the run's float32
    card = (run / "export" / "README.md").read_text()
    assert "## Certificate" in card and "**Passed**" in card and "bundled" in card.split("## Certificate")[1]

    code, out = run_certify(run, "--json", str(tmp_path / "cert.json"), capsys=capsys)
    assert code == 0 and "PASSED" in out
    written = json.loads((tmp_path / "cert.json").read_text())
    ours = {layer["name"]: layer["distance"] for layer in json.loads((run / "layers.json").read_text())["layers"]}
    # the run's own float32 telemetry, against its anchors (BatchNorm scales of ~0 variance are ~1e3 |w|: float32
    # resolves their deviation to ~1e-5 only, so they are compared through the certificate, not here)
    for layer in (x for x in written["per_layer"] if x["role"] != "bn"):
        assert layer["distance"] == pytest.approx(ours[layer["name"]], rel=1e-4, abs=1e-6), layer["name"]

    # an export folder on its own (its training_config.yaml), one row of one convolution moved beyond the radius
    export = tmp_path / "tampered"
    shutil.copytree(run / "export", export)
    weights = load_file(str(export / "model.safetensors"))
    name = "blocks.2.0.conv_pw.weight"
    row = weights[name][0]
    row += 3 * 0.3 / row.numel()  # ||D + 3r/n||_1 >= 3r - ||D||_1 > r
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    proc = subprocess.run([sys.executable, "-m", "mars_dist", "certify", str(export)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("FAILED") and name in verdict and verdict.count("(ratio") == 1, verdict


@pytest.mark.slow
def test_hf_model_from_save_pretrained_is_certified_with_learned_radii(tmp_path, capsys):
    from transformers import AutoModelForImageClassification, ViTConfig

    base = tmp_path / "base"
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       image_size=32, patch_size=8, num_labels=3)
    AutoModelForImageClassification.from_config(config).save_pretrained(base)
    run = tmp_path / "run"
    run_cli(run, SMALL + [f"model.name={base}", "model.pretrained=hub", "constraint.method=mars-ftp"])
    cert = json.loads((run / "summary.json").read_text())["certificate"]
    assert cert["passed"] is True and str(base) in cert["against"], cert
    code, out = run_certify(run, capsys=capsys)
    assert code == 0 and "PASSED" in out and "learned radii" in out and str(base) in out
    learned = {layer["name"]: layer["radius"] for layer in json.loads((run / "layers.json").read_text())["layers"]}
    rows = [line.split() for line in out.splitlines() if line.startswith("hf_model.") and "norm" not in line]
    assert rows and all(float(r[3]) == pytest.approx(learned[r[0]], rel=1e-5) for r in rows)


# DeepSpeed bf16 runs of every ZeRO stage are certified against the pretrained file in tests/run/test_core_configs.py
# (the trainer's certificate in summary.json, and the command on one of them).
