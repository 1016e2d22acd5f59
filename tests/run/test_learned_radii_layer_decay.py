"""Learned radii (mars-ftp) with layer-wise lr decay: the radii take their own Adam step (`constraint.ftp.lr`),
never scaled by the lr of the param group their layer sits in (fast, one process). Under ZeRO with dozens of groups:
test_knobs_backends.py."""

import torch
import torch.nn.functional as F

import mars_dist
from mars_dist.run.param_groups import build_param_groups
from test_recipe_knobs import tiny_hf_vit

FTP_LR, INIT = 1e-6, 1e-8


def test_the_radii_step_ignores_the_group_lr():
    torch.manual_seed(0)
    model = tiny_hf_vit(layers=3)
    groups = build_param_groups(model, 0.5, 0.0, layer_decay=0.5)  # scales 1 .. 1/16 across 5 layers
    assert len({g["lr"] for g in groups}) >= 4
    optimizer = torch.optim.SGD(groups, lr=0.5)  # SGD: the group lr scales the displacement, nothing else
    handle = mars_dist.attach(model, optimizer, method="mars-ftp", head_radius=10.0,
                              ftp={"lr": FTP_LR, "init_radius": INIT}, pretrained=mars_dist.capture_pretrained(model))
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(2):  # update 1 sets every radius to INIT, update 2 takes the radii's first Adam step
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    learned, ftp = handle.hook.learned, handle.hook.learned.s
    on = learned.learned
    assert learned.t == 2 and int(on.sum()) >= 20
    # the radii's first Adam step (update 2; the reference's bias correction counts updates) from their own
    # moments, with ftp.lr; a step scaled by the group's lr would move the early layers' radii (scale 1/16) less
    t = learned.t
    m_hat, v_hat = learned.m / (1 - ftp.beta1 ** t), learned.v / (1 - ftp.beta2 ** t)
    unit = getattr(learned, "unit", torch.ones_like(learned.gamma))  # radii in per-layer units, where they are
    expected = (INIT * unit - unit * FTP_LR * m_hat / (v_hat.sqrt() + ftp.eps)).clamp(min=1e-8)
    torch.testing.assert_close(learned.gamma[on].double(), expected[on].double(), rtol=1e-6, atol=0)
    lr_of = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    moved = [lr_of[c.name] / 0.5 for c, m in zip(learned.p.cons, learned.gamma > 1.5 * INIT * unit) if c.learned and m]
    assert moved and min(moved) <= 1 / 8, moved  # early layers' radii moved (and equal the unscaled step above)
