"""LP-FT (train.linear_probe_steps): the backbone is unchanged bit for bit (weights and BatchNorm statistics) during
the probe updates and moves after, the head is trained and projected throughout; a resume inside the probe (across
the boundary) and one after it equal the uninterrupted run; under 2-process ZeRO-2 the same holds in DeepSpeed's
own checkpoint, and the bound holds. Unit level: the param groups and learning rates of the probe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_helpers import assert_bound_holds, run_cli
from mars_dist import config
from mars_dist.run import checkpoint as ckpt
from mars_dist.run.lpft import LinearProbe

HEAD = ("classifier.weight", "classifier.bias")


def tiny(out: Path, *overrides: str) -> config.Config:
    return config.load(None, [
        f"output_dir={out}", "data.image_size=32", "data.train_per_class=4", "data.val_per_class=2",
        "data.test_limit=40", "train.batch_size=8", "train.max_steps=4", "train.lr=3e-3", "constraint.radius=1.0",
        "constraint.head_radius=2.0", "tracking.wandb_mode=disabled", "train.linear_probe_steps=2",
        "checkpoint.every_steps=1", "checkpoint.keep_last=5", *overrides])


@pytest.fixture(scope="module")
def pretrained():
    from mars_dist.models.factory import build_model

    return build_model("tf_efficientnet_lite0", "bundled", num_classes=10).state_dict()


def moved(weights: dict, pretrained: dict) -> list[str]:
    return [k for k in pretrained if k not in HEAD and not torch.equal(weights[k], pretrained[k])]


@pytest.mark.slow
def test_probe_then_fine_tune_and_resume_across_the_boundary(tmp_path, pretrained):
    from mars_dist.run.train import train

    whole = tmp_path / "whole"
    train(tiny(whole))  # BatchNorm in train mode (the default): its statistics must stay frozen in the probe
    steps = {int(p.name.split("_")[1]): load_file(str(p / "model.safetensors")) for p in ckpt.list_checkpoints(whole)}
    assert sorted(steps) == [1, 2, 3, 4]
    for s in (1, 2):
        assert moved(steps[s], pretrained) == [], s
        assert float(steps[s]["classifier.weight"].abs().sum(1).max()) <= 2.0 * (1 + 1e-5)  # projected head
    assert not torch.equal(steps[1]["classifier.weight"], steps[2]["classifier.weight"])
    assert len(moved(steps[3], pretrained)) > 100
    final = load_file(str(whole / "export" / "model.safetensors"))
    for start in (1, 3):  # inside the probe (the resumed run crosses the boundary) and after it
        part = tmp_path / f"from_{start}"
        shutil.copytree(whole, part, ignore=shutil.ignore_patterns("export", "summary.json"))
        for later in ckpt.list_checkpoints(part)[start:]:
            shutil.rmtree(later)
        assert ckpt.latest_checkpoint(part).name == f"step_{start:08d}"
        assert train(tiny(part, "resume=auto"))["updates"] == 4
        resumed = load_file(str(part / "export" / "model.safetensors"))
        assert [k for k in final if not torch.equal(final[k], resumed[k])] == [], start


@pytest.mark.slow
@pytest.mark.dist
def test_zero2_two_processes(tmp_path, pretrained):
    out = tmp_path / "z2"
    run_cli(out, ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
                  "train.max_steps=3", "train.batch_size=4", "constraint.radius=0.05", "constraint.head_radius=1.0",
                  "tracking.wandb_mode=disabled", "train.linear_probe_steps=2", "checkpoint.every_steps=2"],
            "zero2.yaml")
    assert_bound_holds(out)
    module = torch.load(out / "checkpoints/step_00000002/pytorch_model/mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]  # fp32 run: the module is the masters
    assert moved(module, pretrained) == []
    assert len(moved(load_file(str(out / "export" / "model.safetensors")), pretrained)) > 100


# ---------------------------------------------------------------- unit level
def test_groups_and_learning_rates():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    probe = LinearProbe(2, ["2"])
    probe.split(net, opt)
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 0.5 ** u)
    before = [p.detach().clone() for p in net.parameters()]
    for step in range(3):
        probe.set_learning_rates(opt, step)
        assert probe.bn_mode("train", step) == ("eval" if step < 2 else "train")
        assert opt.param_groups[0]["lr"] == (0.0 if step < 2 else 0.1 * 0.5 ** step)
        net(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        after = list(net.parameters())
        assert all(torch.equal(a, b) for a, b in zip(after[:4], before[:4])) == (step < 2)
    with pytest.raises(ValueError, match="linear_probe_steps=2"):
        probe.split(net, opt)
    with pytest.raises(config.ConfigError, match="linear_probe_steps"):
        config.load(None, ["train.linear_probe_steps=-1"])
