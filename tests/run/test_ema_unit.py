"""The weight EMA (mars_dist/run/ema.py) on one process, against independent computations: timm's own ModelEmaV3
(whole-module EMA, its warm-up) for every non-BatchNorm parameter and the buffers, a float64 EMA of the BatchNorm
effective scales; the swap for evaluation restores the trained weights bit for bit; a checkpoint's EMA loads back
exactly, also when it was saved cut in other pieces (another world size / backend); the config section."""

from __future__ import annotations

import pytest
import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

import mars_dist
from mars_dist import config
from mars_dist.run.ema import FILE, WeightEma, timm_decay

BN_EPS = 1e-6


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def trained(steps: int, decay: float = 0.9, warmup: bool = True):
    """A Tiny model trained `steps` AdamW updates under MARS-PGM (BN in train mode: the variance moves), with our
    EMA, timm's ModelEmaV3 and a float64 EMA of the BN effective scales (d, after each projection) beside it."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    constrained = mars_dist.attach(model, opt, method="mars-pgm", radius=0.3, head_radius=1.0, head=["fc"])
    ema = WeightEma(constrained.backend, model, decay, warmup)
    reference = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_gamma=1.0, warmup_power=2 / 3)
    d_ema = None
    for step in range(1, steps + 1):
        x = torch.randn(8, 3, 6, 6)
        model(x).logsumexp(1).mean().backward()
        opt.step()  # the projection, then our EMA (hooks)
        opt.zero_grad()
        reference.update(model, step=step)
        d = model.bn.weight.detach().double() / torch.sqrt(model.bn.running_var.double() + BN_EPS)
        t = 1 - timm_decay(decay, warmup, step)
        d_ema = d.clone() if d_ema is None else d_ema + t * (d - d_ema)
    return model, constrained, ema, reference, d_ema


def test_decay_is_timms():
    for warmup in (True, False):
        timm_ema = ModelEmaV3(nn.Linear(1, 1), decay=0.999, use_warmup=warmup)
        for step in (0, 1, 2, 3, 10, 1000, 10 ** 6):
            assert timm_decay(0.999, warmup, step) == timm_ema.get_decay(step), (warmup, step)


def test_ema_equals_timms_and_the_bn_scales_average():
    model, constrained, ema, reference, d_ema = trained(6)
    assert ema.updates == 6 and constrained.updates == 6
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}
    masters = [t.clone() for t in ema.backend.master_tensors()]
    shadow = [t.clone() for t in ema.shadow]
    timm_state = reference.module.state_dict()
    with ema.applied():
        applied = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in applied.items():
        if k == "bn.weight":  # the EMA of the effective scales, applied with the EMA of the variance
            d = v.double() / torch.sqrt(applied["bn.running_var"].double() + BN_EPS)
            torch.testing.assert_close(d, d_ema, rtol=2e-6, atol=0)
        elif k != "bn.num_batches_tracked":
            torch.testing.assert_close(v, timm_state[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(applied["conv.weight"], trained_state["conv.weight"])
    for k, v in model.state_dict().items():  # the trained weights back, bit for bit
        assert torch.equal(v, trained_state[k]), k
    for a, b in zip(masters, ema.backend.master_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(shadow, ema.shadow):
        assert torch.equal(a, b)


def test_checkpoint_loads_exactly_also_cut_otherwise(tmp_path):
    model, constrained, ema, _, _ = trained(3)
    ema.save(tmp_path)
    saved = torch.load(tmp_path / FILE.format(0), weights_only=True)
    fresh = WeightEma(constrained.backend, model, ema.decay, ema.warmup)
    fresh.load(tmp_path)
    assert fresh.updates == 3
    for a, b in zip(ema.shadow, fresh.shadow):
        assert torch.equal(a, b)
    # the same EMA as two ranks would have saved it: each parameter cut at its middle, in one flat tensor per rank
    cut = tmp_path / "cut"
    cut.mkdir()
    for rank in range(2):
        pieces, layout, start = [], {}, 0
        for name, (k, s, n, o) in saved["layout"].items():
            lo, hi = (0, n // 2) if rank == 0 else (n // 2, n)
            pieces.append(saved["shadow"][k][s + lo:s + hi])
            layout[name] = (0, start, hi - lo, o + lo)
            start += hi - lo
        torch.save({**saved, "layout": layout, "world_size": 2, "shadow": [torch.cat(pieces)]},
                   cut / FILE.format(rank + 1))  # not this rank's number: the re-cut path
    recut = WeightEma(constrained.backend, model, ema.decay, ema.warmup)
    recut.load(cut)
    for a, b in zip(ema.shadow, recut.shadow):
        assert torch.equal(a, b)
    (cut / FILE.format(2)).unlink()
    with pytest.raises(ValueError, match="do not cover"):
        WeightEma(constrained.backend, model, ema.decay, ema.warmup).load(cut)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_bad_decay_is_refused_naming_the_key(value):
    with pytest.raises(config.ConfigError, match="ema.decay"):
        config.load(None, [f"ema.decay={value}"])


def test_config_section():
    cfg = config.load(None, [])
    assert cfg.ema.decay is None and cfg.ema.warmup is True
    assert {"ema.decay", "ema.warmup"} <= set(config.RESUME_MATH_KEYS)
    assert config.load(None, ["ema.decay=0.998"]).ema.decay == 0.998
