"""The engine's one-pass kernels (mars_dist/constraints/kernels.py) and its in-place visit of fragments that are views
of one flat buffer (constraints/segments.py), checked against tests/reference_impl.py (float64, whole tensors).

The flat buffer stands in for a ZeRO / FSDP2 fp32 master: constrained tensors of several row lengths, an
unconstrained gap (a bias), a diagonal layer and a head, back to back; as a second rank would see it, the buffer is
also cut in the middle of a row. The thresholds that decide in place vs gathered are lowered so that small tensors
take every path."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import reference_impl as ref
from mars_dist.constraints import Constraint, Fragment, project
from mars_dist.constraints import kernels, segments
from mars_dist.constraints.fragments import RELATIVE_TOLERANCE
from mars_dist.constraints.packed import Packed

LAYOUT = [("a", (12, 7), "matrix"), ("b", (9, 7), "matrix"), ("gap", (5,), None), ("c", (4, 2, 3, 2), "matrix"),
          ("n", (11,), "norm"), ("d", (3, 7), "matrix"), ("h", (6, 12), "head"), ("e", (1, 30), "matrix")]


def flat_problem(seed: int):
    """(flat buffer, its pretrained copy, [(constraint, start)]) with every row pushed outside or near its ball."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(math.prod(shape) for _, shape, _ in LAYOUT)
    flat0 = torch.randn(total, generator=gen)
    flat = flat0 + torch.randn(total, generator=gen) * torch.rand(total, generator=gen).round()  # half the rows move
    cons, at = [], 0
    for name, shape, role in LAYOUT:
        if role is not None:
            radius = 0.2 if role == "norm" else 1.5
            cons.append((Constraint(name, shape, role, "project", radius=radius), at))
        at += math.prod(shape)
    return flat, flat0, cons


def fragments_of(flat, flat0, cons, lo: int = 0, hi: int | None = None):
    """Each constraint's fragment inside flat[lo:hi] (a rank's partition), anchored as a backend does."""
    hi = flat.numel() if hi is None else hi
    out = []
    for c, start in cons:
        a, b = max(lo, start), min(hi, start + c.numel)
        a, b = (a, b) if a < b else (start, start)
        out.append(Fragment(c, flat[a:b], c.anchor_fragment(flat0[a:b], a - start), a - start))
    return out


def expected(flat, flat0, cons):
    out = flat.double().clone()
    for c, start in cons:
        w, w0 = flat[start:start + c.numel].view(c.shape), flat0[start:start + c.numel].view(c.shape)
        new = ref.clip(w, w0, c.radius) if c.kind == "diag" else ref.mars_project(w, w0 if c.centered else None,
                                                                                     c.radius)
        out[start:start + c.numel] = new.reshape(-1)
    return out


def run(flat, flat0, cons, compiled: bool, cut: int | None = None):
    """Project flat in place, as one rank (cut=None) or as two ranks split at `cut` (one reduce over both)."""
    parts = [(0, flat.numel())] if cut is None else [(0, cut), (cut, flat.numel())]
    frags = [fragments_of(flat, flat0, cons, lo, hi) for lo, hi in parts]
    packs = [Packed(f) for f in frags]
    for p in packs:
        p.compiled = compiled
    if cut is None:
        return project([Fragment(f.constraint, f.w, None, f.offset) for f in frags[0]], packing=packs[0]), packs
    # two "ranks" in one thread: each computes partial sums, the reduce adds the other's; run them in lockstep
    from test_constraints import RankReduce, on_ranks  # noqa: PLC0415 - the simulated ranks of the library tests

    per_rank = [([Fragment(f.constraint, f.w, None, f.offset) for f in fr], p) for fr, p in zip(frags, packs)]
    return on_ranks(per_rank, lambda item, red: project(item[0], red, item[1]), RankReduce(2)), packs


@pytest.fixture
def small_thresholds(monkeypatch):
    monkeypatch.setattr(segments, "INPLACE_MIN", 40)
    monkeypatch.setattr(segments, "GATHER_ELEMS", 48)
    monkeypatch.setattr(kernels, "COMPILED_MIN", 0)


def check(flat, flat0, cons, want):
    torch.testing.assert_close(flat.double(), want, rtol=2e-6, atol=2e-6)
    for c, start in cons:
        d = (flat[start:start + c.numel] - (flat0[start:start + c.numel] if c.centered else 0)).double()
        norms = d.abs() if c.kind == "diag" else d.view(c.shape[0], -1).abs().sum(1)
        assert bool((norms <= c.radius * (1 + RELATIVE_TOLERANCE) + 1e-6).all()), c.name


@pytest.mark.parametrize("cut", [None, 40, 150])
def test_in_place_on_a_flat_buffer_equals_the_reference(small_thresholds, cut):
    flat, flat0, cons = flat_problem(0)
    want, untouched = expected(flat, flat0, cons), flat.clone()
    clipped, packs = run(flat, flat0, cons, compiled=False, cut=cut)
    assert (clipped if cut is None else sum(clipped)) > 0
    segs = [sg for p in packs for ch in p.chunks for sg in p.segments(ch)]
    inplace = [sg for sg in segs if sg.view is not None]
    assert inplace and any(sg.view is None for sg in segs)  # both paths taken
    assert all(sg.view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for sg in inplace)
    assert any(sg.view.shape[0] > c.shape[0] for sg in inplace for c, _ in cons[:1])  # a run of two tensors
    check(flat, flat0, cons, want)
    gap = slice(12 * 7 + 9 * 7, 12 * 7 + 9 * 7 + 5)
    assert torch.equal(flat[gap], untouched[gap])  # memory between fragments is never written


def test_in_place_and_gathered_agree(small_thresholds, monkeypatch):
    flat, flat0, cons = flat_problem(1)
    other = flat.clone()
    run(flat, flat0, cons, compiled=False)
    monkeypatch.setattr(segments, "INPLACE_MIN", 1 << 30)  # everything gathered (what the engine did before)
    run(other, flat0, cons, compiled=False)
    torch.testing.assert_close(flat, other, rtol=1e-6, atol=1e-6)


def test_rows_inside_the_ball_are_bit_exact_in_place(small_thresholds):
    flat, flat0, cons = flat_problem(2)
    for c, _ in cons:
        c.radius = 1e6
    before = flat.clone()
    clipped, _ = run(flat, flat0, cons, compiled=False)
    assert clipped == 0 and torch.equal(flat, before)


def test_only_segments_with_a_clipped_row_are_written_and_a_new_radius_is_seen(small_thresholds):
    """One packing, two projections: first every radius huge (nothing written), then one matrix's radius back to
    1.5 — the kept row thresholds must follow the new radii, and memory outside that matrix must stay bit-exact."""
    flat, flat0, cons = flat_problem(4)
    frags = fragments_of(flat, flat0, cons)
    p = Packed(frags)
    weights = [Fragment(f.constraint, f.w, None, f.offset) for f in frags]
    for c, _ in cons:
        c.radius = 1e6
    before = flat.clone()
    assert project(weights, packing=p) == 0 and torch.equal(flat, before)
    (a, start_a), (b, start_b) = cons[0], cons[1]
    a.radius = 1.5
    want = ref.mars_project(before[:a.numel].view(a.shape), flat0[:a.numel].view(a.shape), 1.5)
    assert project(weights, packing=p) > 0
    torch.testing.assert_close(flat[:a.numel].double(), want.reshape(-1), rtol=2e-6, atol=2e-6)
    assert torch.equal(flat[a.numel:], before[a.numel:])


@pytest.mark.parametrize("seed", range(5))
def test_segments_hit_equals_a_per_segment_check(seed):
    from mars_dist.constraints.engine import _segments_hit  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
    s = torch.ones(int(lengths.sum()))
    clipped = torch.rand(s.numel(), generator=gen) < 0.15
    s[clipped] = torch.rand(int(clipped.sum()), generator=gen) * 0.99
    holder = type("P", (), {})()  # the function keeps its boundaries on the packing: any object will do
    want = [bool((seg < 1).any()) for seg in s.split(lengths.tolist())]
    assert _segments_hit(holder, s, lengths) == want
    assert _segments_hit(holder, torch.ones_like(s), lengths) == [False] * len(want)  # boundaries reused


def test_compiled_row_sums_equal_eager_and_never_recompile(small_thresholds):
    flat, flat0, cons = flat_problem(3)
    eager, want = flat.clone(), expected(flat, flat0, cons)
    run(eager, flat0, cons, compiled=False)
    run(flat, flat0, cons, compiled=True)  # compiles here (once per process; the disk cache makes it ~2 s)
    assert not kernels._state["failed"]
    check(flat, flat0, cons, want)
    torch.testing.assert_close(flat, eager, rtol=1e-6, atol=1e-6)
    with torch.compiler.set_stance("fail_on_recompile"):  # other sizes, 1-row and 1-wide matrices: same graph
        for rows, length in ((1, 5), (7, 1), (1, 1), (33, 64), (0, 3)):
            w, w0 = torch.randn(rows, length), torch.randn(rows, length)
            got = kernels.row_l1(w, w0, compiled=True)
            torch.testing.assert_close(got, (w - w0).abs().sum(1), rtol=1e-6, atol=1e-6)
    assert not kernels._state["failed"]


def test_a_failing_compile_falls_back_to_eager(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "COMPILED_MIN", 0)
    monkeypatch.setitem(kernels._state, "failed", False)

    def broken():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_compiled", broken)
    w, w0 = torch.randn(4, 6), torch.randn(4, 6)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        got = kernels.row_l1(w, w0, compiled=True)
    assert "using eager torch" in caplog.text and kernels._state["failed"]
    torch.testing.assert_close(got, (w - w0).abs().sum(1))


@pytest.mark.parametrize("value,numel,want", [("0", 10**9, False), ("1", 1, True), ("auto", 10**9, True),
                                              ("auto", 1000, False), (None, 10**9, True)])
def test_the_compile_switch(monkeypatch, value, numel, want):
    if value is None:
        monkeypatch.delenv(kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV, value)
    assert kernels.compile_wanted(numel) is want


def test_a_bad_compile_switch_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "sometimes")
    with pytest.raises(ValueError, match="MARS_DIST_COMPILE='sometimes'"):
        kernels.compile_wanted(1)


def test_mars_and_l2_row_constraints_in_one_packing_equal_the_reference():
    """Both row norms projected in one call (the engine's path that mixes per-row and per-tensor scales)."""
    gen = torch.Generator().manual_seed(5)
    cases = [((6, 5), "mars", 1.0), ((4, 7), "l2", 1.5), ((3, 5), "mars", 0.5), ((5, 5), "l2", 50.0)]
    ws, w0s, cons = [], [], []
    for i, (shape, norm, radius) in enumerate(cases):
        w0 = torch.randn(shape, generator=gen)
        ws.append(w0 + torch.randn(shape, generator=gen))
        w0s.append(w0)
        cons.append(Constraint(f"p{i}", shape, "matrix", "project", norm=norm, radius=radius))
    want = [ref.mars_project(w, w0, c.radius) if c.norm == "mars" else ref.l2_project(w, w0, c.radius)
            for w, w0, c in zip(ws, w0s, cons)]
    clipped = project([Fragment(c, w.view(-1), w0.view(-1).clone(), 0) for c, w, w0 in zip(cons, ws, w0s)])
    assert clipped == 6 + 1 + 3  # every MARS row, the one L2 tensor outside its ball
    for w, expect in zip(ws, want):
        torch.testing.assert_close(w.double(), expect, rtol=2e-6, atol=2e-6)
