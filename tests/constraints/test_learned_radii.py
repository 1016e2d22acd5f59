"""mars-ftp (learned radii) against a small independent float64 implementation of the FTP update on whole tensors,
and the packed/sharded version against the whole-tensor one (rows cut between simulated ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from mars_dist.constraints import Constraint, Fragment, identity_reduce
from mars_dist.config import FtpConfig
from mars_dist.constraints.learned import LearnedRadii
from mars_dist.constraints.packed import Packed

LR = 0.05
STEPS = 12
SETTINGS = FtpConfig()


def _problem(seed: int = 0):
    """A conv-like matrix, a Linear matrix, a BatchNorm weight (effective-scale space), a LayerNorm weight and a
    head; gradients fixed in advance (independent of the weights) so both implementations see the same ones."""
    g = torch.Generator().manual_seed(seed)
    var = torch.rand(6, generator=g) + 0.5
    specs = [("conv", "matrix", (6, 3, 2, 2)), ("fc", "matrix", (5, 7)), ("bn", "bn", (6,)), ("ln", "norm", (7,)),
             ("head", "head", (4, 7))]
    cons, w0 = [], {}
    for name, role, shape in specs:
        c = Constraint(name, shape, role, "project", "mars", radius=0.8 if role == "head" else 5.0,
                       learned=role != "head")
        if role == "bn":
            c.running_var, c.running_var0 = var, var.clone()
        cons.append(c)
        w0[name] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + (1.0 if role in ("bn", "norm") else 0)
    # a persistent direction plus noise: the radii grow (pure noise would leave them at the floor)
    base = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in w0.items()}
    grads = [{n: base[n] + 0.7 * torch.randn(w.shape, generator=g, dtype=torch.float64) * (1 + t % 3)
              for n, w in w0.items()} for t in range(STEPS)]
    return cons, w0, grads, var


def _reference(cons, w0, grads, var, s: FtpConfig = SETTINGS):
    """FTP as the reference code does it, float64, whole tensors, with the previous displacement kept explicitly."""
    W = {n: w.clone() for n, w in w0.items()}
    denom = {c.name: torch.sqrt(var.double() + c.bn_eps) if c.role == "bn" else torch.ones(()) for c in cons}
    x0 = {c.name: w0[c.name] / denom[c.name] for c in cons}
    # the radius' unit: 1 (reference), or the pretrained layer's MARS norm (max row L1; diagonal: max |x0|)
    unit = {c.name: 1.0 if s.scale == "reference" else float(x0[c.name].abs().flatten(1).sum(1).max()
            if c.kind == "rows" else x0[c.name].abs().max()) for c in cons}
    gamma = {c.name: s.init_radius * unit[c.name] for c in cons}
    m = {c.name: 0.0 for c in cons}
    v = {c.name: 0.0 for c in cons}
    prev = {}
    for t, g in enumerate(grads, start=1):
        dots = {c.name: float((g[c.name] * denom[c.name] * prev[c.name]).sum()) for c in cons if t > 1 and c.role != "head"}
        for n in W:
            W[n] = W[n] - LR * g[n]
        for c in cons:
            n = c.name
            if c.role == "head":  # fixed radius around zero
                norms = W[n].abs().flatten(1).sum(1)
                W[n] = W[n] * torch.clamp(c.radius / norms, max=1.0).view(-1, *[1] * (W[n].dim() - 1))
                continue
            x = W[n] / denom[n]
            cdis = x - x0[n]
            norms = (cdis.abs().flatten(1).sum(1, keepdim=True).view(-1, *[1] * (x.dim() - 1))
                     if c.kind == "rows" else cdis.abs()) + 1e-8
            if t == 1:
                gamma[n] = s.init_radius * unit[n]
            else:  # Adam on rho = gamma / unit, whose gradient is unit * dL/dgamma
                gr = dots[n] * (s.k if dots[n] > 0 else 1.0) * unit[n]
                m[n] = s.beta1 * m[n] + (1 - s.beta1) * gr
                v[n] = s.beta2 * v[n] + (1 - s.beta2) * gr * gr
                mh, vh = m[n] / (1 - s.beta1 ** t), v[n] / (1 - s.beta2 ** t)
                rho = gamma[n] / unit[n] - s.lr * mh / (math.sqrt(vh) + s.eps)
                gamma[n] = min(max(rho * unit[n], 1e-8), float(norms.max()))
            W[n] = (x0[n] + torch.clamp(gamma[n] / norms, max=1.0) * cdis) * denom[n]
            prev[n] = cdis / norms
    return W, gamma


def _run_packed(cons, w0, grads, cuts: int, settings: FtpConfig = SETTINGS):
    """LearnedRadii on float32 fragments; `cuts` > 1 splits every tensor into that many fragments at offsets that
    cut rows (simulated ranks in one layout: the partial sums meet in the same buffer the reduce would sum)."""
    ws_full = {n: w.float().clone().reshape(-1) for n, w in w0.items()}
    frags = []
    for c in cons:
        flat = ws_full[c.name]
        bounds = [round(i * flat.numel() / cuts) + (1 if 0 < i < cuts else 0) for i in range(cuts + 1)]
        for a, b in zip(bounds, bounds[1:]):
            piece = flat[a:b]
            frags.append(Fragment(c, piece, c.anchor_fragment(piece, a), a))
    packing = Packed(frags, average_running_vars=False)
    learned = LearnedRadii(packing, settings)
    ws = [f.w for f in frags]
    for g in grads:
        gs = [g[f.constraint.name].float().reshape(-1)[f.offset:f.offset + f.w.numel()] for f in frags]
        learned.accumulate(ws, gs)
        torch._foreach_add_(ws, gs, alpha=-LR)
        learned.project(ws, identity_reduce)
    return {n: w.view(w0[n].shape) for n, w in ws_full.items()}, dict(zip([c.name for c in cons], learned.radii()))


@pytest.mark.parametrize("scale", ["reference", "layer"])
@pytest.mark.parametrize("cuts", [1, 3])
def test_learned_radii_match_float64_reference(cuts, scale):
    settings = FtpConfig(scale=scale)
    cons, w0, grads, var = _problem()
    want_w, want_gamma = _reference(cons, w0, grads, var, settings)
    got_w, got_gamma = _run_packed(cons, w0, grads, cuts, settings)
    for c in cons:
        if c.role != "head":
            assert got_gamma[c.name] == pytest.approx(want_gamma[c.name], rel=1e-6), c.name
            assert want_gamma[c.name] > 10 * settings.init_radius, "the radius never grew: the test shows nothing"
        torch.testing.assert_close(got_w[c.name].double(), want_w[c.name], rtol=0, atol=1e-6, msg=c.name)
    # the bound holds for the final learned radii (MARS rows / elementwise), on the float32 weights
    for c in cons:
        if c.role in ("matrix",):
            d = (got_w[c.name] - w0[c.name].float()).abs().flatten(1).sum(1)
            assert float(d.max()) <= got_gamma[c.name] * (1 + 5e-5)


def test_radius_gradient_sign_moves_radius():
    """A gradient that keeps its direction (descent keeps going where the clipped displacement points) makes the
    radii grow; one that flips every update (descent turns back) makes them stay at the floor: a sign error in the
    radius gradient fails one of the two."""
    cons, w0, _, _ = _problem()
    cons = [c for c in cons if c.role == "matrix"]
    for flip, grows in ((1.0, True), (-1.0, False)):
        ws = [w0[c.name].float().clone().reshape(-1) for c in cons]
        frags = [Fragment(c, w, c.anchor_fragment(w, 0), 0) for c, w in zip(cons, ws)]
        learned = LearnedRadii(Packed(frags))
        fixed = [torch.randn_like(w) for w in ws]
        for t in range(30):
            gs = [flip ** t * f for f in fixed]
            learned.accumulate(ws, gs)
            torch._foreach_add_(ws, gs, alpha=-LR)
            learned.project(ws, identity_reduce)
        gamma = learned.radii()
        assert all((g > 0.1) == grows for g in gamma), (direction, gamma)


def _fragments(cons, ws_full, cuts):
    frags = []
    for c in cons:
        flat = ws_full[c.name]
        bounds = [round(i * flat.numel() / cuts) + (1 if 0 < i < cuts else 0) for i in range(cuts + 1)]
        frags += [Fragment(c, flat[a:b], None, a) for a, b in zip(bounds, bounds[1:])]
    return frags


def _steps(learned, frags, grads):
    ws = [f.w for f in frags]
    for g in grads:
        gs = [g[f.constraint.name].float().reshape(-1)[f.offset:f.offset + f.w.numel()] for f in frags]
        learned.accumulate(ws, gs, identity_reduce)
        torch._foreach_add_(ws, gs, alpha=-LR)
        learned.project(ws, identity_reduce)


def _whole_direction(learned) -> dict[str, list[float]]:
    whole: dict[str, dict[int, float]] = {}
    for name, offset, t in learned.direction_fragments():
        whole.setdefault(name, {}).update({offset + k: v for k, v in enumerate(t.tolist())})
    return {n: [v[k] for k in sorted(v)] for n, v in whole.items()}


@pytest.mark.parametrize("how", ["saved", "rebuilt", "lost"])
def test_resume_under_another_layout(how):
    """Half the updates under one layout, the rest under another (a resume on another world size). The radii's state
    carries over; the direction buffer is read back from the saved fragments (exact values), or rebuilt from the
    weights (float32-rounded), and both end where the uninterrupted run ends. Lost (left at zero), the next radius
    step is missing and the radii end measurably elsewhere: the test can tell."""
    cons, w0, grads, _ = _problem()
    anchors = {c.name: c.anchor_fragment(w0[c.name].float().reshape(-1), 0) for c in cons}

    def layout(ws_full, cuts):
        frags = _fragments(cons, ws_full, cuts)
        for f in frags:
            a = anchors[f.constraint.name]
            f.anchor = None if a is None else a[f.offset:f.offset + f.w.numel()]
        return frags, LearnedRadii(Packed(frags, average_running_vars=False))

    whole = {n: w.float().clone().reshape(-1) for n, w in w0.items()}
    frags, ref = layout(whole, 1)
    _steps(ref, frags, grads)

    resumed = {n: w.float().clone().reshape(-1) for n, w in w0.items()}
    frags, first = layout(resumed, 3)
    _steps(first, frags, grads[:6])
    frags, second = layout(resumed, 2)
    second.load_state_dict(first.state_dict())
    if how == "saved":
        saved = first.direction_fragments()
        assert second.load_directions([saved[::2], saved[1::2]])  # as if from two files
        assert _whole_direction(second) == _whole_direction(first)  # the very same values, cut another way
        assert not second.load_directions([saved[::2]]), "a missing piece must be reported, not left at zero"
    second.recover_direction = how == "rebuilt"
    _steps(second, frags, grads[6:])
    diffs = [abs(a - b) / a for a, b, c in zip(ref.radii(), second.radii(), cons) if c.learned]
    if how == "lost":
        assert max(diffs) > 1e-2
        return
    assert max(diffs) < 1e-6, diffs
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cuts", [1, 3])
def test_layer_scale_init_and_first_step(cuts):
    """constraint.ftp.scale 'layer': the first radius is init x ||W0||_MARS and the first Adam step moves it by
    lr x ||W0||_MARS x f, per layer (f: Adam's first step at t = 2, as the reference counts the initialising update:
    (b1 / (1 - b1^2)) / sqrt(b2' / (1 - b2^2)) with b1 = 1 - beta1, b2' = 1 - beta2), with ||W0||_MARS taken
    independently from the pretrained float64 tensors (max row L1; diagonal layers max |w0|, BatchNorm in
    effective-scale space); 'reference' moves every layer by the same absolute lr."""
    cons, w0, grads, var = _problem()
    mars = {}
    for c in cons:
        x0 = w0[c.name] / (torch.sqrt(var.double() + c.bn_eps) if c.role == "bn" else 1.0)
        mars[c.name] = float(x0.abs().flatten(1).sum(1).max() if c.kind == "rows" else x0.abs().max())
    assert max(mars.values()) / min(mars.values()) > 2, "layers of one size would not tell the units apart"
    settings = FtpConfig(init_radius=1e-3, lr=1e-3)  # a step that stays far from the clips at both ends
    for scale in ("layer", "reference"):
        settings.scale = scale
        seen = []
        for steps in (1, 2):
            _, gamma = _run_packed(cons, w0, grads[:steps], cuts, settings)
            seen.append(gamma)
        for c in cons:
            if c.role == "head":
                continue
            u = mars[c.name] if scale == "layer" else 1.0
            assert seen[0][c.name] == pytest.approx(1e-3 * u, rel=1e-6), (scale, c.name)
            f = (0.1 / (1 - 0.9 ** 2)) / math.sqrt(0.001 / (1 - 0.999 ** 2))
            assert abs(seen[1][c.name] - seen[0][c.name]) == pytest.approx(1e-3 * u * f, rel=1e-5), (scale, c.name)


def test_scale_is_a_checked_setting():
    """A bad `constraint.ftp.scale` names the key; radii learned in one unit are not resumed in the other (their
    Adam moments are of another variable): a checkpoint from before the setting counts as 'reference'."""
    from mars_dist import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="constraint.ftp.scale.*'relative'"):
        config_mod.load(None, ["constraint.ftp.scale=relative"])
    cons, w0, _, _ = _problem()
    frags = [Fragment(c, w0[c.name].float().reshape(-1), c.anchor_fragment(w0[c.name].float().reshape(-1), 0), 0)
             for c in cons]
    layer, reference = (LearnedRadii(Packed(frags, average_running_vars=False), FtpConfig(scale=s))
                        for s in ("layer", "reference"))
    old = {k: v for k, v in reference.state_dict().items() if k not in ("scale", "unit")}
    reference.load_state_dict(old)
    with pytest.raises(ValueError, match="constraint.ftp.scale='reference'.*this run has 'layer'"):
        layer.load_state_dict(old)
