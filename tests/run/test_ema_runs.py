"""recipes/lite0_full.yaml (every knob but torch.compile, EMA on) end to end, shortened by overrides, on the bundled
ImageNet EfficientNet-Lite0 and real Fashion-MNIST:

- one process, every knob on: it runs; export/ (the EMA) and export_raw/ (the trained weights) both satisfy the bound
  against the bundled pretrained file, recomputed in float64 by tests/independent_bound.py; the card and summary say
  which is which; stop at update 2 + resume == the uninterrupted run, bit for bit (both exports and the EMA state);
- 2 processes through the shipped launch configs (cpu = DDP, zero1, zero2, zero3, zero3_init, zero3_offload; not
  fsdp2.yaml: accelerate turns FSDP off on CPU, tests/distributed/test_ema_fsdp2.py drives fully_shard): the EMA
  export and the raw export equal the one-process run's, element by element (same global batch, fp32). Drop-path,
  mixup and cutmix are off in these: their draws come from each rank's torch RNG, which no world size can share with
  one process (RandAugment and random erasing are seeded per image and stay on). Under ZeRO-3 the EMA costs ~1/2 of
  the one-process EMA per rank, and a stop + resume on 2 processes is bit-identical; a ZeRO-3 checkpoint resumed on
  one process carries its EMA (re-cut by offsets).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_helpers import ROOT, run_cli
from mars_dist.run.ema import FILE

sys.path.insert(0, str(ROOT / "tests"))
from independent_bound import ratios  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = str(ROOT / "recipes" / "lite0_full.yaml")
SHORT = [RECIPE, "data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=4", "constraint.radius=0.05", "constraint.head_radius=1.0", "tracking.wandb_mode=disabled",
         "resume=none", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "data.num_workers=0"]
SAME_DRAWS = ["model.drop_path_rate=0", "data.mixup=0", "data.cutmix=0"]
ONE, TWO = ["train.batch_size=8"], ["train.batch_size=4"]  # the same global batch
TOL = {"atol": 5e-5, "rtol": 1e-5}  # one vs two processes: gradient rounding (tests/launch/test_launch.py)


def export(run: Path, folder: str = "export") -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / "model.safetensors"))


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_certified_independently(run: Path) -> None:
    for folder in ("export", "export_raw"):
        worst = max(ratios(run / folder / "model.safetensors", 0.05, 1.0).values())
        assert worst <= 1.0, (folder, worst)
    s = summary(run)
    assert s["certificate"]["passed"] and s["raw"]["certificate"]["passed"]
    assert s["raw"]["certificate"]["at_bound"] > 0  # the projection was active on the trained weights


def resume_from_step_2(run: Path, into: Path, overrides: list[str], launch: str | None = None) -> None:
    """The run as if it had died after update 2: its step-2 checkpoint, resumed to the end."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000002", into / "checkpoints" / "step_00000002")
    run_cli(into, [*overrides, "resume=auto"], launch)


def assert_identical(a: Path, b: Path) -> None:
    for folder in ("export", "export_raw"):
        wa, wb = export(a, folder), export(b, folder)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (folder, k)
    for path in sorted((a / "checkpoints" / "step_00000004").glob("ema_rank*.pt")):
        sa = torch.load(path, weights_only=True)
        sb = torch.load(b / "checkpoints" / "step_00000004" / path.name, weights_only=True)
        assert sa["updates"] == sb["updates"] == 4
        assert all(torch.equal(x, y) for x, y in zip(sa["shadow"], sb["shadow"]))


def assert_close_to(reference: Path, run: Path) -> None:
    """Both exports element by element, and the test losses: the EMA was also what the forward pass evaluated (the
    low-precision / gathered copies refreshed after the swap)."""
    sa, sb = summary(reference), summary(run)
    assert sb["test_loss"] == pytest.approx(sa["test_loss"], rel=1e-4)
    assert sb["raw"]["test_loss"] == pytest.approx(sa["raw"]["test_loss"], rel=1e-4)
    for folder in ("export", "export_raw"):
        wa, wb = export(reference, folder), export(run, folder)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], **TOL, msg=f"{folder}/{k}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The one-process run the 2-process ones are compared with (drop-path / mixup / cutmix off)."""
    out = tmp_path_factory.mktemp("ema") / "one"
    run_cli(out, [*SHORT, *ONE, *SAME_DRAWS])
    return out


def test_recipe_every_knob_on_one_process_and_resume(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = run_cli(whole, [*SHORT, *ONE])
    assert "activation checkpointing" in proc.stdout and "ema: decay 0.99 with warm-up" in proc.stdout
    assert_certified_independently(whole)
    s = summary(whole)
    assert s["ema"]["weights"] == "ema" and s["ema"]["updates"] == 4 and s["raw"]["export"] == "export_raw"
    assert "## Weights: EMA" in (whole / "export" / "README.md").read_text()
    assert "## Weights: trained (not the EMA)" in (whole / "export_raw" / "README.md").read_text()
    ema, raw = export(whole), export(whole, "export_raw")
    assert not torch.equal(ema["conv_stem.weight"], raw["conv_stem.weight"])
    resume_from_step_2(whole, part, [*SHORT, *ONE])
    assert_identical(whole, part)


@pytest.mark.dist
@pytest.mark.parametrize("launch", ["cpu.yaml", "zero1.yaml", "zero2.yaml", "zero3_init.yaml",
                                    "zero3_offload.yaml"])
def test_two_processes_equal_one(one_process, tmp_path, launch):
    run = tmp_path / "run"
    run_cli(run, [*SHORT, *TWO, *SAME_DRAWS], launch)
    assert_certified_independently(run)
    assert_close_to(one_process, run)


@pytest.mark.dist
def test_zero3_sharded_ema_resumes_exactly_and_carries_to_one_process(one_process, tmp_path):
    run, part, cross = tmp_path / "run", tmp_path / "part", tmp_path / "cross"
    proc = run_cli(run, [*SHORT, *TWO, *SAME_DRAWS], "zero3.yaml")
    assert_certified_independently(run)
    assert_close_to(one_process, run)
    per_rank, whole = summary(run)["ema"]["bytes_per_rank"], summary(one_process)["ema"]["bytes_per_rank"]
    assert 0.45 < per_rank / whole < 0.56, (per_rank, whole)  # 1/2 + padding + the replicated BN statistics
    assert proc.stdout.count("ema: decay") == 1  # printed once (main process)
    resume_from_step_2(run, part, [*SHORT, *TWO, *SAME_DRAWS], "zero3.yaml")
    assert_identical(run, part)
    # the step-2 ZeRO-3 checkpoint on one process: its two EMA files re-cut into whole parameters
    (cross / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000002", cross / "checkpoints" / "step_00000002")
    proc = run_cli(cross, [*SHORT, *ONE, *SAME_DRAWS, "resume=auto"])
    assert "ema: re-cut from 2 rank file(s) saved under zero x2" in proc.stdout
    assert_close_to(one_process, cross)
    assert len(list((run / "checkpoints" / "step_00000002").glob(FILE.replace("{:05d}", "*")))) == 2
