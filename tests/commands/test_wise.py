"""`mars-dist interpolate` (alias `wise`): WiSE-FT exports of a finished run. End to end on the bundled Lite0 (BatchNorm in train mode, so
the running variances move and the effective-scale interpolation matters): a = 0 is the pretrained backbone with a
zero head, a = 1 the export bit for bit, a = 0.5 within 0.5 r by an independent float64 check against the bundled
fp32 weights, loadable by timm alone; a fine-tuned export pushed out of its ball fails at a = 0.5. Unit level: the
anchors (backbone, zero head, BatchNorm effective scale)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch_helpers import ROOT, run_cli
from mars_dist.constraints import Constraint
from mars_dist.models.factory import build_model
from mars_dist.models.interpolate import interpolate

RADIUS, HEAD_RADIUS, EPS = 0.05, 1.0, 1e-6
SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=3", "train.batch_size=8", f"constraint.radius={RADIUS}",
         f"constraint.head_radius={HEAD_RADIUS}", "train.bn_mode=train", "tracking.wandb_mode=disabled"]


def wise_cli(run, *args: str, command: str = "interpolate") -> subprocess.CompletedProcess:
    env_cmd = [sys.executable, "-m", "mars_dist", command, str(run), *args]
    return subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wise") / "run"
    run_cli(out, SMALL)
    # one list under the canonical name, then the alias: the second call adds its row to wise.json
    for command, args in (("interpolate", ["--alpha", "0", "1", "--no-eval"]),
                          ("wise", ["--alpha", "0.5", "--split", "val"])):
        proc = wise_cli(out, *args, command=command)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pretrained():
    model = build_model("tf_efficientnet_lite0", "bundled", 10, head_seed=0)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_alpha_zero_and_one(run, pretrained):
    model, w0 = pretrained
    head = {"classifier.weight", "classifier.bias"}
    a0, a1 = (load_file(str(run / f"export_wise_{a}" / "model.safetensors")) for a in (0, 1))
    assert a1.keys() == load_file(str(run / "export" / "model.safetensors")).keys()
    for k, v in load_file(str(run / "export" / "model.safetensors")).items():
        assert torch.equal(a1[k], v), k
        if k in head:
            assert not a0[k].any(), k
        elif v.is_floating_point():
            assert torch.equal(a0[k], w0[k]), k
    cards = json.loads((run / "wise.json").read_text())
    assert [r["alpha"] for r in cards] == [0, 0.5, 1]
    assert cards[0]["certificate"]["passed"] is None and cards[1]["certificate"]["passed"] is True
    assert 0 <= cards[1]["val_accuracy"] <= 1 and (run / "export_wise_0.5" / "eval").is_dir()
    card = (run / "export_wise_0.5" / "README.md").read_text()
    assert "WiSE-FT (alpha = 0.5)" in card and "every radius of the run x 0.5" in card
    assert f"C_r = {cards[1]['bound']['C_radii']:.3f}" in card and "checked, holds" in card
    assert cards[0]["bound"]["holds"] is None and cards[1]["bound"]["holds"] is cards[2]["bound"]["holds"] is True
    from mars_dist.commands.report import write_report

    page = write_report(run, run / "report_test.html").read_text()
    assert "WiSE-FT (mars-dist interpolate)" in page and 'id="chart-wise"' in page and "within alpha x radii" in page
    assert "C_r (alpha x radii)" in page and f"{cards[1]['bound']['C_radii']:.4f}" in page


@pytest.mark.slow
def test_half_is_within_half_the_radius(run, pretrained):
    """Float64, from the files: rows of every conv / linear within 0.5 r (head: around zero), BatchNorm effective
    scales within 0.5 r of the pretrained ones, each over float32 rounding (what `certify` allows)."""
    model, w0 = pretrained
    wa = load_file(str(run / "export_wise_0.5" / "model.safetensors"))
    up = lambda t: torch.nextafter(t.abs(), torch.full_like(t, math.inf)).double() - t.abs().double()  # noqa: E731
    checked = 0
    log_2b, d_over_b, r_over_b = [], [], []  # the bound term C and C_r (radii x 0.5) from the same float64 values
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            head = name == "classifier"
            w = wa[f"{name}.weight"]
            dev = (w.double() - (0 if head else w0[f"{name}.weight"].double())).reshape(w.shape[0], -1)
            r = 0.5 * (HEAD_RADIUS if head else RADIUS)
            allowed = r * (1 + 1e-5) + up(w).reshape(w.shape[0], -1).sum(1)
            assert (dev.abs().sum(1) <= allowed).all(), (name, float(dev.abs().sum(1).max()), r)
            b = float(w.double().reshape(w.shape[0], -1).abs().sum(1).max())
            log_2b.append(math.log(2 * b)), d_over_b.append(float(dev.abs().sum(1).max()) / b), r_over_b.append(r / b)
            checked += 1
        elif isinstance(m, torch.nn.BatchNorm2d):
            s, s0 = (torch.sqrt(x[f"{name}.running_var"].double() + EPS) for x in (wa, w0))
            d, d0 = wa[f"{name}.weight"].double() / s, w0[f"{name}.weight"].double() / s0
            allowed = 0.5 * RADIUS + up(wa[f"{name}.weight"]) / s + 4 * up(torch.maximum(d.abs(), d0.abs()).float())
            assert ((d - d0).abs() <= allowed).all(), (name, float((d - d0).abs().max()))
            b = float(d.abs().max())
            log_2b.append(math.log(2 * b)), d_over_b.append(float((d - d0).abs().max()) / b)
            r_over_b.append(0.5 * RADIUS / b)
            checked += 1
    assert checked == 99  # constraints.json: 99 constrained tensors
    bound = next(r["bound"] for r in json.loads((run / "wise.json").read_text()) if r["alpha"] == 0.5)
    c, c_r = (math.fsum(log_2b) + math.log(math.fsum(x)) for x in (d_over_b, r_over_b))
    assert bound["C"] == pytest.approx(c, rel=1e-9) and bound["C_radii"] == pytest.approx(c_r, rel=1e-9)
    assert c <= c_r + 1e-4 and bound["holds"] is True
    import timm

    loaded = timm.create_model(f"local-dir:{run / 'export_wise_0.5'}", pretrained=True)
    assert torch.equal(loaded.state_dict()["classifier.weight"], wa["classifier.weight"])


@pytest.mark.slow
def test_export_out_of_its_ball_fails(run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("export_wise_*", "checkpoints"))
    weights = load_file(str(bad / "export" / "model.safetensors"))
    weights["blocks.2.0.conv_pw.weight"][3] += 3 * RADIUS / weights["blocks.2.0.conv_pw.weight"][3].numel()
    save_file(weights, str(bad / "export" / "model.safetensors"), metadata={"format": "pt"})
    proc = wise_cli(bad, "--alpha", "0.5", "--no-eval")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAILED" in proc.stdout and "blocks.2.0.conv_pw.weight" in proc.stdout


# ---------------------------------------------------------------- unit level: the anchors
def test_anchors_and_batchnorm_effective_scale():
    gen = torch.Generator().manual_seed(0)
    w0 = {"conv.weight": torch.randn(4, 3, generator=gen), "bn.weight": torch.rand(4, generator=gen) + 0.5,
          "bn.running_var": torch.rand(4, generator=gen) + 0.1, "bn.num_batches_tracked": torch.tensor(0),
          "head.weight": torch.randn(2, 4, generator=gen), "head.bias": torch.randn(2, generator=gen)}
    w = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else torch.tensor(7)
         for k, v in w0.items()}
    constraints = [Constraint("conv.weight", (4, 3), "matrix", "project", radius=1.0),
                   Constraint("bn.weight", (4,), "bn", "project", radius=1.0),
                   Constraint("head.weight", (2, 4), "head", "project", radius=1.0)]
    a = interpolate(w, w0, 0.25, constraints)
    torch.testing.assert_close(a["conv.weight"], w0["conv.weight"] + 0.25 * (w["conv.weight"] - w0["conv.weight"]))
    torch.testing.assert_close(a["head.weight"], 0.25 * w["head.weight"])
    torch.testing.assert_close(a["head.bias"], 0.25 * w["head.bias"])
    assert int(a["bn.num_batches_tracked"]) == 7
    eff = lambda x: x["bn.weight"].double() / torch.sqrt(x["bn.running_var"].double() + 1e-6)  # noqa: E731
    torch.testing.assert_close(eff(a), eff(w0) + 0.25 * (eff(w) - eff(w0)), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(interpolate(w, w0, 1.0, constraints)[k], w[k]) for k in w)
    with pytest.raises(ValueError, match="alpha=1.5"):
        interpolate(w, w0, 1.5, constraints)


@pytest.mark.slow
def test_hugging_face_resnet(tmp_path):
    """A transformers model (HF key names, its own BatchNorms): the interpolated export loads with transformers and
    passes its scaled certificate."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification, ResNetConfig

    model_dir = tmp_path / "resnet"
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], layer_type="basic", num_labels=3)
    cfg.save_pretrained(model_dir)
    torch.manual_seed(0)
    weights = AutoModelForImageClassification.from_config(cfg).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(model_dir / "pretrained.safetensors"))
    run = tmp_path / "run"
    run_cli(run, SMALL + [f"model.name={model_dir}", f"model.pretrained={model_dir / 'pretrained.safetensors'}"])
    proc = wise_cli(run, "--alpha", "0.5", "--no-eval")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads((run / "wise.json").read_text())[0]
    assert row["certificate"]["passed"] is True and row["certificate"]["layers"] > 5
    loaded = AutoModelForImageClassification.from_pretrained(str(run / "export_wise_0.5"))
    assert loaded.config.num_labels == 10
