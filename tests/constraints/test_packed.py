"""The packed layout (mars_dist/constraints/packed.py): chunking does not change results, anchors round-trip, radii
are read at every call, and fragments without anchors are refused instead of being treated as anchored at zero."""

import pytest
import torch

from mars_dist.constraints import Constraint, Fragment, measure, project
from mars_dist.constraints.packed import Packed


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cons, ws, anchors = [], [], []
    for k, (shape, role) in enumerate([((13, 7), "matrix"), ((5, 3, 3, 3), "matrix"), ((9,), "norm"),
                                       ((11, 4), "matrix"), ((6, 7), "head")]):
        w0 = torch.randn(shape, generator=gen)
        cons.append(Constraint(f"p{k}", shape, role, "project", radius=1.5 if role != "norm" else 0.2))
        ws.append((w0 + torch.randn(shape, generator=gen)).reshape(-1))
        anchors.append(None if role == "head" else w0.reshape(-1).clone())
    return cons, ws, anchors


def frags(cons, ws, anchors, cut: int = 0):
    """One fragment per constraint; with `cut`, every fragment starts `cut` elements in (a partial first row)."""
    return [Fragment(c, w[cut:], None if a is None else a[cut:], cut) for c, w, a in zip(cons, ws, anchors)]


@pytest.mark.parametrize("cut", [0, 3])
def test_small_chunks_give_bit_identical_results(cut):
    cons, ws, anchors = problem()
    a = [w.clone() for w in ws]
    b = [w.clone() for w in ws]
    pa = Packed(frags(cons, a, anchors, cut))
    pb = Packed(frags(cons, b, anchors, cut), chunk_elems=10)  # blocks split across many chunks
    assert len(pb.chunks) > len(pa.chunks)
    ca = project(frags(cons, a, [None] * len(cons), cut), packing=pa)
    cb = project(frags(cons, b, [None] * len(cons), cut), packing=pb)
    assert ca == cb > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa = measure(frags(cons, a, [None] * len(cons), cut), packing=pa)
    assert all(s.distance <= s.radius * (1 + 1e-5) for s in sa)


def test_anchors_round_trip_through_the_packed_storage():
    cons, ws, anchors = problem(1)
    p = Packed(frags(cons, ws, anchors, 3), chunk_elems=10)
    for i, a in enumerate(anchors):
        got = p.anchor(i)
        assert (got is None) == (a is None)
        if a is not None:
            assert torch.equal(got, a[3:])
            p.set_anchor(i, got + 1)
            assert torch.equal(p.anchor(i), a[3:] + 1)


def test_radii_are_read_at_every_call():
    cons, ws, anchors = problem(2)
    p = Packed(frags(cons, ws, anchors))
    project(frags(cons, ws, [None] * len(cons)), packing=p)
    for c in cons:
        c.radius *= 0.5
    project(frags(cons, ws, [None] * len(cons)), packing=p)
    for s in measure(frags(cons, ws, [None] * len(cons)), packing=p):
        assert s.distance <= s.radius * (1 + 1e-5), s


def test_a_fragment_without_its_anchor_is_refused():
    cons, ws, _ = problem(3)
    with pytest.raises(ValueError, match="fragment of 'p0' has no anchor: pass the backend's `packing`"):
        project(frags(cons, ws, [None] * len(cons)))


def test_a_restored_anchor_is_used_by_the_next_projection():
    """A resume restores anchors into a packing that has already projected (set_anchor after clip_diag): every
    layer, the diagonal ones included (their clip bounds are derived from the anchors), lands within its radius of
    the restored anchor, checked directly in float64."""
    cons, ws, anchors = problem(3)
    p = Packed(frags(cons, ws, anchors))
    project(frags(cons, ws, [None] * len(cons)), packing=p)
    moved = [None if a is None else a + 0.7 for a in anchors]
    for i, a in enumerate(moved):
        if a is not None:
            p.set_anchor(i, a)
    ws = [w + 3.0 for w in ws]  # far outside every ball
    p2 = [Fragment(c, w, None, 0) for c, w in zip(cons, ws)]
    project(p2, packing=p)
    for c, w, a in zip(cons, ws, moved):
        d = (w.double() - (0 if a is None else a.double())).reshape(c.shape[0], -1) if c.role != "norm" else None
        worst = d.abs().sum(1).max() if d is not None else (w.double() - a.double()).abs().max()
        assert worst <= c.radius * (1 + 1e-5), (c.name, float(worst), c.radius)
