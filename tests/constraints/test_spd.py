"""SPD (Selective Projection Decay) on packed float32 fragments against an independent float64 transcription of the
reference optimizer's step (GT-RIPL/Selective-Projection-Decay, adamSPD.py) on whole tensors: one process, tensors
cut into fragments as ranks hold them (partial sums meeting in the buffer the reduce would sum), and a sharded
optimizer that steps its groups one at a time (the pre-step hook fires once per group)."""

from __future__ import annotations

import math

import pytest
import torch

from mars_dist.constraints import Constraint, Fragment, identity_reduce
from mars_dist.constraints.packed import Packed
from mars_dist.constraints.spd import SelectiveDecay

LR, BETAS, EPS = 0.02, (0.9, 0.999), 1e-8
STEPS = 14
SPECS = [("conv", "matrix", (6, 3, 2, 2)), ("fc", "matrix", (5, 7)), ("bn", "bn", (6,)), ("ln", "norm", (7,)),
         ("head", "head", (4, 7))]


def _problem(seed: int = 0):
    """Pretrained weights (float64), BatchNorm running variance, and gradients fixed in advance: a persistent
    direction whose sign turns every few updates, plus noise, so that layers are selected at some updates (the
    gradient opposes the progress made) and not at others."""
    g = torch.Generator().manual_seed(seed)
    var = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    w0 = {n: torch.randn(s, generator=g, dtype=torch.float64) * 0.3 + (1.0 if r in ("bn", "norm") else 0.0)
          for n, r, s in SPECS}
    base = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in w0.items()}
    flips = {n: 3 + k for k, n in enumerate(w0)}  # a different period per layer
    grads = [{n: base[n] * (1 if (t // flips[n]) % 2 == 0 else -1) + 0.5 * torch.randn(w.shape, generator=g,
                                                                                         dtype=torch.float64)
              for n, w in w0.items()} for t in range(STEPS)]
    return w0, var, grads


def _reference(w0, grads, strength: float, norm: str = "l2"):
    """adamSPD.py's step (amsgrad off), float64, whole tensors: Adam on every tensor, then the SPD condition and
    ratio per tensor. `pre` = the pretrained tensor; the head's group has `pre: None` (zeros). norm 'mars' swaps the
    Frobenius norm of `_ratio` for the MARS norm (the variant). Returns the weights and how often a layer decayed."""
    W = {n: w.clone() for n, w in w0.items()}
    pre = {n: (torch.zeros_like(w) if n == "head" else w.clone()) for n, w in w0.items()}
    m = {n: torch.zeros_like(w) for n, w in W.items()}
    v = {n: torch.zeros_like(w) for n, w in W.items()}

    def size(x):
        if norm == "l2":
            return torch.norm(x)
        return x.abs().flatten(1).sum(1).max() if x.dim() > 1 else x.abs().max()

    selected = 0
    for step, grad_t in enumerate(grads, start=1):
        bias_correction1, bias_correction2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
        for n, param in W.items():
            grad = grad_t[n]
            m[n].mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
            v[n].mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
            denom = (v[n].sqrt() / math.sqrt(bias_correction2)).add_(EPS)
            new_p = param - (LR / bias_correction1) * m[n] / denom
            condition = -torch.sum(torch.mul(grad, param - pre[n]))
            if condition < 0.0:
                curr_norm, prev_norm = size(new_p - pre[n]), size(param - pre[n])
                ratio = torch.nn.functional.hardtanh((curr_norm - prev_norm) / curr_norm, 0.0, 1.0)
                new_p = new_p - strength * ratio * (new_p - pre[n])
                selected += int(ratio > 0)
            W[n] = new_p
    return W, selected


def _constraints(var):
    cons = []
    for name, role, shape in SPECS:
        c = Constraint(name, shape, role, "decay", "l2")
        if role == "bn":
            c.running_var, c.running_var0 = var.float(), var.float().clone()
        cons.append(c)
    return cons


def _run_sharded(w0, var, grads, strength: float, cuts: int, norm: str = "l2", groups: int = 1):
    """SelectiveDecay around torch's Adam on float32 fragments (each its own parameter; Adam is elementwise, so
    stepping pieces is stepping the whole). `groups` > 1: the fragments are split between optimizers stepped one
    after the other, as a sharded optimizer steps its sub-groups (gradients only for the group stepping)."""
    cons = _constraints(var)
    frags = []
    for c in cons:
        flat = w0[c.name].float().reshape(-1)
        bounds = [round(i * flat.numel() / cuts) + (1 if 0 < i < cuts else 0) for i in range(cuts + 1)]
        for a, b in zip(bounds, bounds[1:]):
            piece = torch.nn.Parameter(flat[a:b].clone())
            frags.append(Fragment(c, piece.data, c.anchor_fragment(piece.data, a), a))
            frags[-1].param = piece
    decay = SelectiveDecay(Packed(frags, average_running_vars=False), strength, norm, [f.w for f in frags])
    params = [f.param for f in frags]
    opts = [torch.optim.Adam(params[k::groups], lr=LR, betas=BETAS, eps=EPS, foreach=False) for k in range(groups)]
    ws = [f.w for f in frags]
    for g in grads:
        for f in frags:
            f.param.grad = g[f.constraint.name].float().reshape(-1)[f.offset:f.offset + f.w.numel()].clone()
        for k, opt in enumerate(opts):
            stepping = {id(p) for p in params[k::groups]}
            decay.accumulate(ws, [f.param.grad if id(f.param) in stepping else None for f in frags])
            opt.step()
        decay.apply(ws, identity_reduce)
    out = {}
    for c in cons:
        out[c.name] = torch.cat([f.w for f in frags if f.constraint is c]).view(w0[c.name].shape)
    return out


@pytest.mark.parametrize("cuts,groups,norm", [(1, 1, "l2"), (3, 1, "l2"), (3, 2, "l2"), (3, 2, "mars")])
def test_spd_matches_float64_reference(cuts, groups, norm):
    w0, var, grads = _problem()
    strength = 0.8
    want, selected = _reference(w0, grads, strength, norm)
    plain, _ = _reference(w0, grads, 0.0, norm)
    assert selected >= 10, "too few decays: the test would show nothing"
    got = _run_sharded(w0, var, grads, strength, cuts, norm, groups)
    for n in w0:
        assert float((want[n] - plain[n]).abs().max()) > 1e-3, f"{n}: SPD never moved this layer"
        torch.testing.assert_close(got[n].double(), want[n], rtol=0, atol=2e-6, msg=n)


def test_mars_variant_differs_from_reference():
    """The MARS-row variant is a different rule (the same decays would make the parametrised test above vacuous)."""
    w0, _, grads = _problem()
    l2, _ = _reference(w0, grads, 0.8, "l2")
    mars, _ = _reference(w0, grads, 0.8, "mars")
    assert max(float((l2[n] - mars[n]).abs().max()) for n in ("conv", "fc")) > 1e-3


def test_unselected_layers_are_untouched_bit_for_bit():
    """A layer whose gradient keeps pointing along its progress is never selected: SPD leaves the optimizer's
    result exactly as it is (strength 1 and a growing distance would otherwise decay it). Not the head: anchored at
    zero, its random start may point either way."""
    w0, var, _ = _problem()
    g = torch.Generator().manual_seed(2)
    fixed = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in w0.items()}
    grads = [fixed] * 6
    got = _run_sharded(w0, var, grads, 1.0, cuts=2)
    plain = _run_sharded(w0, var, grads, 0.0, cuts=2)
    for n in w0:
        if n != "head":
            assert torch.equal(got[n], plain[n]), n


def test_first_update_decays_nothing_but_the_head():
    """At the first update W_t = W0 exactly, so c = 0 and the reference decays no layer but the head (anchored at
    zero). A BatchNorm anchor only recovered from its effective scale (w0 / sqrt(var0 + eps), times it again) is off
    by an ulp here and there: c would be rounding noise and a selected layer would lose its whole update (ratio ~1).
    Many BatchNorm elements, so that such an ulp is all but certain."""
    g = torch.Generator().manual_seed(1)
    var = (torch.rand(512, generator=g) + 0.5)
    c = Constraint("bn", (512,), "bn", "decay", "l2")
    c.running_var, c.running_var0 = var, var.clone()
    w = torch.rand(512, generator=g) + 0.5
    w_eff = c.anchor_fragment(w, 0)
    assert not torch.equal(w_eff * c.bn_denominator(var, 0, 512), w), "no ulp lost: the test shows nothing"
    for grad in (torch.randn(512, generator=g), -torch.randn(512, generator=g)):
        frag = Fragment(c, w.clone(), w_eff, 0)
        decay = SelectiveDecay(Packed([frag], average_running_vars=False), 1.0, "l2", [frag.w])
        decay.accumulate([frag.w], [grad])
        frag.w.add_(grad, alpha=-0.1)
        assert decay.apply([frag.w], identity_reduce) == 0
        assert torch.equal(frag.w, w.add(grad, alpha=-0.1))


def test_config_and_sweep_reach_the_strength():
    """`constraint.spd.strength` is validated, and a sweep trial's value lands in the nested key."""
    import optuna

    from mars_dist import config
    from mars_dist.commands.sweep import set_constraint_values, suggest

    with pytest.raises(config.ConfigError, match="constraint.spd.strength"):
        config.load(None, ["constraint.method=spd", "constraint.spd.strength=-1"])
    cfg = config.load(None, ["constraint.method=mars-spd", "sweep.spd_strength_range=[0.1, 0.2]"])
    values = suggest(optuna.create_study().ask(), cfg)
    data = config.to_dict(cfg)
    set_constraint_values(data["constraint"], values)
    assert 0.1 <= data["constraint"]["spd"]["strength"] <= 0.2 and "spd.strength" not in data["constraint"]
