"""The public API in one process (mars_dist.attach / capture_pretrained / Constrained): the projection inside the
optimizer step, the refusals, the handle's stats and state, and an exact resume through accelerate's save_state /
load_state. DeepSpeed's refusals run in a one-process DeepSpeed worker (tests/api/api_deepspeed_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mars_dist

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    """Conv + BatchNorm + Linear head: every role the selection knows for a CNN, tiny."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def make(seed: int = 0, lr: float = 0.05, sgd: bool = False):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr) if sgd else torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt


def train(model, opt, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def max_row_distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    return float((w.detach().double() - w0.double()).reshape(w.shape[0], -1).abs().sum(1).max())


def test_projection_runs_inside_the_step_and_the_stats_say_so():
    model, opt = make()
    w0 = model.conv.weight.detach().clone()
    constrained = mars_dist.attach(model, opt, radius=0.01, head_radius=0.5,
                                   pretrained=mars_dist.capture_pretrained(model))
    train(model, opt, 3)
    assert max_row_distance(model.conv.weight, w0) <= 0.01 * (1 + 1e-5)
    assert float(model.fc.weight.detach().abs().sum(1).max()) <= 0.5 * (1 + 1e-5)
    logs = constrained.log_dict(prefix="mars/")
    assert logs["mars/layers/conv.weight/radius"] == 0.01
    assert logs["mars/layers/conv.weight/frac_at_bound"] > 0 and logs["mars/constraint/rows_clipped"] > 0
    assert {"mars/bound/C", "mars/bound/max_ratio", "mars/layers/bn.weight/distance"} <= logs.keys()
    assert constrained.updates == 3 and [s.name for s in constrained.stats()] == ["conv.weight", "bn.weight",
                                                                                  "fc.weight"]


def test_ema_is_the_average_of_the_projected_weights_inside_the_balls():
    """constrained.ema(): against a float64 statement of timm's EMA (the first update copies, then
    e <- d e + (1 - d) w) of the weights each update left, read from the model; BatchNorm frozen, so the EMA of its
    effective scale is the EMA of its weight times a constant."""
    model, opt = make()
    model.bn.eval()
    pre = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    constrained = mars_dist.attach(model, opt, radius=0.01, head_radius=0.5,
                                   pretrained=mars_dist.capture_pretrained(model))
    ema, decay = constrained.ema(0.6, warmup=False), 0.6
    want = dict(pre)
    for t in range(4):
        train(model, opt, 1, seed=t)
        d = 0.0 if t == 0 else decay
        want = {n: d * want[n] + (1 - d) * p.detach().double() for n, p in model.named_parameters()}
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied():
        got = constrained.fp32_state_dict()
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7, msg=n)
    assert not torch.equal(got["conv.weight"], trained["conv.weight"])  # an average, not the last weights
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())  # restored bit for bit
    assert max_row_distance(got["conv.weight"], pre["conv.weight"]) <= 0.01 * (1 + 1e-5)
    assert float(got["fc.weight"].abs().sum(1).max()) <= 0.5 * (1 + 1e-5)
    constrained.detach()
    train(model, opt, 1, seed=9)
    assert ema.updates == 4  # detach stopped it with the projection
    with pytest.raises(ValueError, match="decay 1.0"):
        mars_dist.attach(*make()).ema(1.0)


def test_detach_removes_the_projection():
    model, opt = make()
    w0 = model.conv.weight.detach().clone()
    mars_dist.attach(model, opt, radius=1e-4, head_radius=0.5).detach()
    train(model, opt, 2)
    assert max_row_distance(model.conv.weight, w0) > 1e-3


def test_a_second_attach_to_one_optimizer_is_refused_until_detach():
    model, opt = make()
    first = mars_dist.attach(model, opt, radius=0.1)
    with pytest.raises(mars_dist.AttachError, match="already has a constraint attached; call detach"):
        mars_dist.attach(model, opt, radius=0.2)
    first.detach()
    assert mars_dist.attach(model, opt, radius=0.2).constraints[0].radius == 0.2


def test_attach_after_an_update_is_refused():
    model, opt = make()
    train(model, opt, 1)
    with pytest.raises(mars_dist.AttachError, match="after the weights moved.*AdamW already holds state"):
        mars_dist.attach(model, opt, radius=0.1)


def test_moved_weights_are_caught_by_the_pretrained_fingerprint():
    """Plain SGD keeps no state: the fingerprint of the captured weights is what sees the update."""
    model, opt = make(sgd=True)
    pretrained = mars_dist.capture_pretrained(model)
    train(model, opt, 1)
    with pytest.raises(mars_dist.AttachError, match="'conv.weight' is not the pretrained value"):
        mars_dist.attach(model, opt, radius=0.1, pretrained=pretrained)


def test_an_optimizer_that_does_not_step_the_model_is_refused():
    model, _ = make()
    other, opt = make()
    with pytest.raises(mars_dist.AttachError, match="3 constrained parameters are not in its param_groups"):
        mars_dist.attach(model, opt, radius=0.1)
    with pytest.raises(mars_dist.AttachError, match="not a torch optimizer"):
        mars_dist.attach(model, object(), radius=0.1)


def test_settings_are_config_fields():
    model, opt = make()
    with pytest.raises(TypeError, match="unknown setting.*radious.*valid:.*radius"):
        mars_dist.attach(model, opt, radious=0.1)
    constrained = mars_dist.attach(model, opt, mars_dist.ConstraintConfig(radius=3.0), head_radius=2.0,
                                   groups=[("conv.*", 0.5)], norm_layers="none")
    assert {c.name: c.radius for c in constrained.constraints} == {"conv.weight": 0.5, "bn.weight": 3.0,
                                                                   "fc.weight": 2.0}


def test_state_of_other_anchors_is_refused():
    model, opt = make()
    state = mars_dist.attach(model, opt, radius=0.1).state_dict()
    other, other_opt = make(seed=5)
    constrained = mars_dist.attach(other, other_opt, radius=0.1)
    with pytest.raises(ValueError, match="anchor checksum"):
        constrained.load_state_dict(state)
    constrained.load_state_dict(constrained.state_dict())


def test_accelerate_save_and_load_state_resume_exactly(tmp_path):
    """mars-ftp (learned radii: the state that matters) through accelerator.save_state / load_state: 2 updates, a
    checkpoint, a fresh process state resumed for 2 more ends bit-identical to 4 updates straight, radii included."""
    from accelerate import Accelerator

    def start():
        accelerator = Accelerator(cpu=True)
        model, opt = make(lr=0.01)
        pretrained = mars_dist.capture_pretrained(model)
        model, opt = accelerator.prepare(model, opt)
        constrained = mars_dist.attach(model, opt, method="mars-ftp", head_radius=1.0, accelerator=accelerator,
                                       pretrained=pretrained)
        return accelerator, model, opt, constrained

    def finish(model, constrained):
        radii = [s.radius for s in constrained.stats()]
        constrained.detach()
        return {k: v.clone() for k, v in model.state_dict().items()}, radii

    _, model, opt, constrained = start()
    train(model, opt, 2, seed=7)
    train(model, opt, 2, seed=8)
    straight, straight_radii = finish(model, constrained)

    accelerator, model, opt, constrained = start()
    train(model, opt, 2, seed=7)
    accelerator.save_state(str(tmp_path / "ckpt"))
    finish(model, constrained)
    assert (tmp_path / "ckpt" / "learned_radii_rank0.pt").is_file()

    accelerator, model, opt, constrained = start()
    accelerator.load_state(str(tmp_path / "ckpt"))  # after attach: anchors from the pretrained weights
    train(model, opt, 2, seed=8)
    resumed, resumed_radii = finish(model, constrained)
    assert resumed_radii == straight_radii and len(set(straight_radii)) > 1
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


@pytest.mark.slow
def test_deepspeed_refusals_and_bf16_masters(tmp_path):
    """One DeepSpeed process (ZeRO-3, bf16, CPU): without the captured weights attach refuses and says what to call;
    an optimizer DeepSpeed does not step is refused; after an update of the engine attach is refused; with them the
    fp32 masters hold the pretrained fp32 values exactly (not their bf16 rounding); a model partitioned by zero.Init
    before the capture (no fp32 values kept) is refused."""
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    worker = ROOT / "tests" / "api" / "api_deepspeed_worker.py"
    proc = subprocess.run([sys.executable, str(worker), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert "mars_dist.capture_pretrained(model)" in result["without_pretrained"]
    assert "not the one DeepSpeed steps" in result["other_optimizer"]
    assert result["masters_equal_pretrained"] and result["bf16_rounding_differs"]
    assert "the DeepSpeed engine has made 1 updates" in result["after_step"]
    assert "partitioned by zero.Init before capture_pretrained" in result["zero_init_uncaptured"]
