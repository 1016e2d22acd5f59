"""The pure constraint library (mars_dist.constraints): fragment row arithmetic, MARS/L2 projections, BatchNorm and
LayerNorm clips, penalties and their gradients, telemetry — hand-computed examples first, then properties on random
tensors cut into random fragments, checked against tests/reference_impl.py (float64, whole tensors).

No process group: the two-rank case is simulated with two threads and a reduce that meets at a barrier.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from torch import nn

import reference_impl as ref
from mars_dist.constraints import Constraint, Fragment, add_penalty_grads, bound_term, measure, project
from mars_dist.constraints.engine import LayerStats
from mars_dist.constraints.fragments import (RELATIVE_TOLERANCE, radial_scales, rescale_rows_, row_segments,
                                             row_sums, row_values)
from mars_dist.constraints.selection import select_constraints

SHAPES = [(7,), (1, 1), (5, 3), (3, 17), (16, 8), (1, 40), (4, 3, 3, 3), (6, 1, 3, 3), (2, 5, 1, 1), (8, 4, 2)]


# ---- helpers ------------------------------------------------------------------------------------------------------
def rule(role: str, shape, radius: float | None = 1.0, action: str = "project", norm: str = "mars",
         weight: float = 0.0, var: torch.Tensor | None = None, var0: torch.Tensor | None = None) -> Constraint:
    c = Constraint(name=f"{role}.weight", shape=tuple(shape), role=role, action=action, norm=norm, radius=radius,
                   weight=weight)
    if role == "bn":
        c.running_var = var
        c.running_var0 = var.clone() if var0 is None else var0
    return c


def random_cuts(n: int, k: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """A random partition of [0, n) into k contiguous fragments (empty ones allowed)."""
    points = sorted(torch.randint(0, n + 1, (k - 1,), generator=gen).tolist())
    bounds = [0] + points + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def fragments(c: Constraint, w: torch.Tensor, w0: torch.Tensor, cuts, grad: torch.Tensor | None = None):
    """Fragments viewing slices of the flat parameter `w`, anchored as a backend would (from the pretrained w0)."""
    flat, flat0 = w.view(-1), w0.reshape(-1)
    gflat = None if grad is None else grad.view(-1)
    return [Fragment(c, flat[a:b], c.anchor_fragment(flat0[a:b], a), a, None if gflat is None else gflat[a:b])
            for a, b in cuts]


class RankReduce:
    """reduce(to_sum, to_average) for k threads standing in for k ranks: each deposits its buffers, waits for the
    others, and all get the sum / the mean — what one all-reduce does across k processes."""

    def __init__(self, k: int):
        self.barrier = threading.Barrier(k, timeout=30)
        self.slots: list = [None] * k
        self.calls = [0] * k

    def for_rank(self, rank: int):
        def reduce(to_sum, to_average):
            self.calls[rank] += 1
            self.slots[rank] = (to_sum.clone(), to_average.clone())
            self.barrier.wait()
            summed = sum(s for s, _ in self.slots)
            averaged = sum(a for _, a in self.slots) / len(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before all have read them
            return summed, averaged
        return reduce


def on_ranks(per_rank: list, fn, reduce: RankReduce | None = None) -> list:
    """Run fn(fragments, reduce) once per simulated rank (a thread each) on that rank's fragment list.

    The engine takes at most ONE fragment per parameter per process (a rank owns one contiguous piece of each
    parameter); the other pieces live on other ranks and meet in the reduce — so cuts are simulated as ranks.
    """
    if len(per_rank) == 1:
        return [fn(per_rank[0])]
    reduce = reduce or RankReduce(len(per_rank))
    results, errors = [None] * len(per_rank), []

    def body(r: int):
        try:
            results[r] = fn(per_rank[r], reduce.for_rank(r))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread: a failing rank fails the test
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(per_rank))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def sharded(fn, c: Constraint, w: torch.Tensor, w0: torch.Tensor, cuts, grad: torch.Tensor | None = None) -> list:
    """fn (project / add_penalty_grads / measure) on one parameter cut into `cuts`, one simulated rank per cut."""
    return on_ranks([fragments(c, w, w0, [cut], grad) for cut in cuts], fn)


def random_problem(shape, seed: int):
    """Pretrained w0, fine-tuned w = w0 + D with row norms spread over ~2 orders of magnitude, and a radius in the
    middle of them, so some rows are inside the ball and some outside."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen)
    row_scale = torch.exp(torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=gen))
    w = w0 + torch.randn(shape, generator=gen) * row_scale
    norms = ref.rows(w.double() - w0.double()).abs().sum(dim=1)
    radius = float(norms.median()) if norms.numel() > 1 else float(norms[0]) / 2
    return w, w0, radius, gen


def deviation_row_norms(w: torch.Tensor, w0: torch.Tensor | None) -> torch.Tensor:
    d = w.double() if w0 is None else w.double() - w0.double()
    return ref.rows(d).abs().sum(dim=1)


# ---- fragments.py --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset, n, row_len, expected", [
    (0, 6, 3, [(0, 6, 0, 2)]),                              # whole tensor: one block of whole rows
    (1, 7, 3, [(0, 2, 0, 1), (2, 5, 1, 1), (5, 7, 2, 1)]),  # starts and ends mid-row
    (4, 1, 3, [(0, 1, 1, 1)]),                              # one element inside a row
    (2, 4, 3, [(0, 1, 0, 1), (1, 4, 1, 1)]),                # starts mid-row, ends on a row boundary
    (3, 5, 3, [(0, 3, 1, 1), (3, 5, 2, 1)]),                # starts on a boundary, ends mid-row
    (3, 0, 3, []),                                          # empty fragment
    (1, 0, 3, []),                                          # empty fragment mid-row
    (5, 3, 1, [(0, 3, 5, 3)]),                              # row_len 1 (diagonal layers)
])
def test_row_segments_by_hand(offset, n, row_len, expected):
    assert list(row_segments(offset, n, row_len)) == expected


def test_row_segments_cover_the_fragment_exactly():
    for row_len in (1, 2, 3, 7):
        for offset in range(0, 15):
            for n in range(0, 20):
                segs = list(row_segments(offset, n, row_len))
                assert (segs == []) == (n == 0)
                assert [s[0] for s in segs] == ([0] + [s[1] for s in segs])[:len(segs)]  # contiguous from 0
                assert not segs or segs[-1][1] == n
                for start, stop, row, rows in segs:
                    first, last = offset + start, offset + stop - 1
                    assert first // row_len == row and last // row_len == row + rows - 1
                    assert rows == 1 or (stop - start == rows * row_len and first % row_len == 0)


def test_row_sums_by_hand():
    values = torch.arange(12, dtype=torch.float32)  # 4 rows of 3: [0 1 2][3 4 5][6 7 8][9 10 11]
    assert row_sums(values[1:5], 1, 3, 4).tolist() == [1 + 2, 3 + 4, 0, 0]
    assert row_sums(values, 0, 3, 4).tolist() == [3, 12, 21, 30]
    assert row_sums(values[4:4], 4, 3, 4).tolist() == [0, 0, 0, 0]
    assert row_sums(values[5:9], 5, 1, 12).tolist() == [0] * 5 + [5, 6, 7, 8] + [0] * 3
    assert row_sums(values[4:11], 4, 3, 4).dtype == torch.float64


def test_row_sums_of_a_partition_add_up_to_the_whole():
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).abs()
        whole = ref.rows(x.double()).sum(dim=1)
        rows, row_len = shape[0], x.numel() // shape[0]
        for k in (1, 2, 5):
            cuts = random_cuts(x.numel(), k, gen)
            total = sum(row_sums(x.view(-1)[a:b], a, row_len, rows) for a, b in cuts)
            torch.testing.assert_close(total, whole, rtol=1e-12, atol=0)


def test_rescale_rows_by_hand_leaves_scale_one_rows_bit_exact():
    w0 = torch.tensor([1e8, -1e8, 1e8, 0.0, 0.0, 0.0])  # fp32 spacing at 1e8 is 8: w0 + (w - w0) gives 0, not w
    w = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 6.0])
    before = w.clone()
    rescale_rows_(w, w0, 0, 3, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert torch.equal(w[:3], before[:3])
    assert w[3:].tolist() == [1.0, -2.0, 3.0]
    head = torch.tensor([2.0, 4.0, 6.0, 8.0])
    rescale_rows_(head[1:3], None, 1, 2, torch.tensor([0.5, 0.25], dtype=torch.float64))  # anchor zero
    assert head.tolist() == [2.0, 2.0, 1.5, 8.0]


def test_rescale_on_a_partition_equals_rescale_of_the_whole_bit_exactly():
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        w0 = torch.randn(shape, generator=gen)
        w = w0 + torch.randn(shape, generator=gen)
        rows, row_len = shape[0], w.numel() // shape[0]
        scales = torch.rand(rows, generator=gen, dtype=torch.float64)
        scales[torch.rand(rows, generator=gen) < 0.3] = 1.0
        for anchor in (w0, None):
            whole = w.clone().view(-1)
            rescale_rows_(whole, None if anchor is None else anchor.view(-1), 0, row_len, scales)
            for k in (2, 4, 9):
                parts = w.clone().view(-1)
                for a, b in random_cuts(w.numel(), k, gen):
                    rescale_rows_(parts[a:b], None if anchor is None else anchor.view(-1)[a:b], a, row_len, scales)
                assert torch.equal(parts, whole), (shape, k)


def test_row_values_expands_per_row_values_to_elements():
    per_row = torch.tensor([10.0, 20.0, 30.0])
    assert row_values(per_row, 2, 5, 3).tolist() == [10.0, 20.0, 20.0, 20.0, 30.0]
    assert row_values(per_row, 0, 0, 3).tolist() == []


def test_radial_scales_have_a_relative_tolerance():
    norms = torch.tensor([1.0, 2.0 * (1 + 0.5 * RELATIVE_TOLERANCE), 2.0 * (1 + 2 * RELATIVE_TOLERANCE), 8.0],
                         dtype=torch.float64)
    s = radial_scales(norms, 2.0)
    assert s[:2].tolist() == [1.0, 1.0]
    assert s[2] == 1 / (1 + 2 * RELATIVE_TOLERANCE) and s[3] == 0.25


# ---- MARS-PGM projection, by hand -----------------------------------------------------------------------------------
def test_mars_projection_hand_2x3():
    w = torch.tensor([[1.0, 2.0, 3.0], [0.1, 0.1, 0.1]])
    w0 = torch.zeros(2, 3)
    before = w.clone()
    clipped = project(fragments(rule("matrix", (2, 3), radius=3.0), w, w0, [(0, 6)]))
    assert clipped == 1
    assert w[0].tolist() == [0.5, 1.0, 1.5]  # row L1 6 -> 3: halved
    assert torch.equal(w[1], before[1])       # row L1 0.3 <= 3: untouched, bit-exact


def test_mars_projection_hand_nonzero_anchor_and_mid_row_fragments():
    w0 = torch.tensor([[1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    w = w0 + torch.tensor([[4.0, -2.0, 2.0], [0.5, 0.0, -0.5]])
    cuts = [(0, 2), (2, 4), (4, 6)]  # each fragment ends in the middle of a row
    sharded(project, rule("matrix", (2, 3), radius=4.0), w, w0, cuts)
    assert w.tolist() == [[3.0, 0.0, 2.0], [5.5, 5.0, 4.5]]


def _model_with(layer: nn.Module, features: int) -> nn.Sequential:
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(features, 3))


def test_conv_rows_are_output_filters_summing_over_in_kh_kw():
    model = _model_with(nn.Conv2d(2, 2, 2, bias=True), 2)  # weight (out=2, in=2, 2, 2): 8 elements per row
    (conv, head) = select_constraints(model, ["2"], "mars-pgm", radius=2.0, head_radius=100.0)
    assert (conv.role, conv.num_rows, conv.row_len, head.role) == ("matrix", 2, 8, "head")
    weight = model[0].weight.data
    w0 = weight.clone()
    weight += torch.stack([torch.full((2, 2, 2), 0.5), torch.full((2, 2, 2), -0.1)])  # row L1: 4.0 and 0.8
    bias = model[0].bias.data.clone()
    sharded(project, conv, weight, w0, [(0, 3), (3, 16)])
    torch.testing.assert_close(weight[0] - w0[0], torch.full((2, 2, 2), 0.25))  # filter 0: 4 -> 2
    torch.testing.assert_close(weight[1] - w0[1], torch.full((2, 2, 2), -0.1))  # filter 1 inside
    assert torch.equal(model[0].bias.data, bias)


def test_depthwise_conv_has_one_row_per_channel():
    model = _model_with(nn.Conv2d(3, 3, 3, groups=3, bias=False), 3)
    (dw, _head) = select_constraints(model, ["2"], "mars-pgm", radius=3.0, head_radius=100.0)
    assert (dw.num_rows, dw.row_len) == (3, 9)
    weight = model[0].weight.data
    w0 = weight.clone()
    weight += torch.tensor([1.0, 0.1, -0.5]).view(3, 1, 1, 1)  # channel L1 norms: 9, 0.9, 4.5
    project(fragments(dw, weight, w0, [(0, 27)]))
    d = weight - w0
    torch.testing.assert_close(d[0], torch.full((1, 3, 3), 1 / 3))
    torch.testing.assert_close(d[1], torch.full((1, 3, 3), 0.1))    # the Keras whole-kernel norm would shrink it
    torch.testing.assert_close(d[2], torch.full((1, 3, 3), -1 / 3))


def test_head_is_projected_around_zero():
    w = torch.tensor([[3.0, -1.0], [0.5, 0.25], [-8.0, 0.0]])
    project(fragments(rule("head", (3, 2), radius=2.0), w, w.clone(), [(0, 6)]))  # anchor ignored: zero
    assert w.tolist() == [[1.5, -0.5], [0.5, 0.25], [-2.0, 0.0]]


# ---- MARS-PGM projection, properties --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("role", ["matrix", "head"])
def test_mars_projection_properties(shape, role):
    for seed in range(3):
        w, w0, radius, gen = random_problem(shape, seed)
        anchor = None if role == "head" else w0
        if role == "head":
            radius = float(deviation_row_norms(w, None).median())
        c = rule(role, shape, radius=radius)
        expected = ref.mars_project(w, anchor, radius)
        norms_before = deviation_row_norms(w, anchor)
        whole = w.clone()
        project(fragments(c, whole, w0, [(0, w.numel())]))
        torch.testing.assert_close(whole.double(), expected, rtol=2e-6, atol=2e-6)
        after = deviation_row_norms(whole, anchor)
        assert bool((after <= radius * (1 + RELATIVE_TOLERANCE)).all())
        outside = norms_before > radius
        torch.testing.assert_close(after[outside], torch.full_like(after[outside], radius), rtol=1e-5, atol=0)
        inside = ~outside
        assert torch.equal(ref.rows(whole)[inside], ref.rows(w)[inside])  # rows inside: untouched, bit-exact
        again = whole.clone()
        assert project(fragments(c, again, w0, [(0, w.numel())])) == 0 and torch.equal(again, whole)  # idempotent
        for k in (2, 3, 7):
            parts = w.clone()
            sharded(project, c, parts, w0, random_cuts(w.numel(), k, gen))
            # row sums are float32: a row cut across ranks sums in another order (ulp-level scale changes)
            torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6, msg=str((seed, k)))


@pytest.mark.parametrize("shape", SHAPES)
def test_mars_projection_is_a_bit_exact_no_op_inside_the_ball(shape):
    w, w0, _, gen = random_problem(shape, 7)
    w0 = w0 * 1e4  # far from w: recomputing w0 + (w - w0) would change the low bits of w
    radius = float(deviation_row_norms(w, w0).max()) * 1.01
    before = w.clone()
    assert sharded(project, rule("matrix", shape, radius=radius), w, w0, random_cuts(w.numel(), 3, gen)) == [0] * 3
    assert torch.equal(w, before)


def test_rows_just_over_the_radius_within_tolerance_are_left_alone():
    w0 = torch.zeros(2, 4)
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0000004], [1.0, 1.0, 1.0, 1.01]])  # L1: 4 + 4e-7 and 4.01
    before = w.clone()
    assert project(fragments(rule("matrix", (2, 4), radius=4.0), w, w0, [(0, 8)])) == 1
    assert torch.equal(w[0], before[0]) and float(w[1].abs().sum()) == pytest.approx(4.0, rel=1e-6)


# ---- L2-PGM -------------------------------------------------------------------------------------------------------
def test_l2_projection_by_hand():
    w0 = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[4.0, 5.0]])  # D = (3, 4), ||D||_F = 5
    assert sharded(project, rule("matrix", (1, 2), radius=1.0, norm="l2"), w, w0, [(0, 1), (1, 2)]) == [1, 1]
    torch.testing.assert_close(w, torch.tensor([[1.6, 1.8]]))
    head = torch.tensor([[0.0, 3.0], [4.0, 0.0]])  # around zero: ||W||_F = 5
    project(fragments(rule("head", (2, 2), radius=2.5, norm="l2"), head, head.clone(), [(0, 4)]))
    torch.testing.assert_close(head, torch.tensor([[0.0, 1.5], [2.0, 0.0]]))


@pytest.mark.parametrize("shape", SHAPES)
def test_l2_projection_properties(shape):
    for seed in range(3):
        w, w0, _, gen = random_problem(shape, 100 + seed)
        norm = float((w.double() - w0.double()).norm())
        for radius, outside in ((norm / 3, True), (norm * 1.01, False)):
            c = rule("matrix", shape, radius=radius, norm="l2")
            whole = w.clone()
            project(fragments(c, whole, w0, [(0, w.numel())]))
            if not outside:
                assert torch.equal(whole, w)
                continue
            d_after = whole.double() - w0.double()
            assert float(d_after.norm()) == pytest.approx(radius, rel=1e-6)
            torch.testing.assert_close(whole.double(), ref.l2_project(w, w0, radius), rtol=2e-6, atol=2e-6)
            cos = float((d_after * (w.double() - w0.double())).sum() / (d_after.norm() * norm))
            assert cos == pytest.approx(1.0, abs=1e-9)  # direction preserved
            for k in (2, 5):
                parts = w.clone()
                sharded(project, c, parts, w0, random_cuts(w.numel(), k, gen))
                # float32 sums of squares, cut in other places: the norm agrees to ~1e-6 relative
                torch.testing.assert_close(parts, whole, rtol=2e-6, atol=1e-6)


# ---- BatchNorm and LayerNorm (diagonal layers) --------------------------------------------------------------------
def test_bn_effective_scale_clip_by_hand():
    var0 = torch.tensor([1.0, 4.0, 9.0, 0.25])
    w0 = torch.tensor([1.0, 2.0, 3.0, 0.5])  # d0 = w0 / sqrt(var0 + 1e-6) ~ 1 everywhere
    var = var0.clone()
    w = torch.tensor([1.5, 2.0, 9.0, 0.25])  # d ~ 1.5, 1, 3, 0.5
    c = rule("bn", (4,), radius=0.25, var=var, var0=var0.clone())
    assert sharded(project, c, w, w0, [(0, 1), (1, 4)]) == [1, 2]  # elements clipped on each rank
    s = lambda v: math.sqrt(v + 1e-6)  # noqa: E731
    d0 = [x / s(v) for x, v in zip([1.0, 2.0, 3.0, 0.5], [1.0, 4.0, 9.0, 0.25])]
    expected = [(d0[0] + 0.25) * s(1.0), 2.0, (d0[2] + 0.25) * s(9.0), (d0[3] - 0.25) * s(0.25)]
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=0)
    assert w[1] == 2.0 and w.tolist() == pytest.approx([1.25, 2.0, 3.75, 0.375], rel=1e-5)


def test_bn_uses_the_live_running_variance_and_eps_ref_not_the_layers_eps():
    bn = nn.BatchNorm1d(3, eps=0.1)  # the layer's eps is large: if it were used, the answers below would differ
    model = nn.Sequential(bn, nn.Linear(3, 2))
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-4, 1.0, 4.0]))
        bn.weight.copy_(torch.tensor([0.01, 1.0, 2.0]))
    (c, head) = select_constraints(model, ["1"], "mars-pgm", radius=0.5, head_radius=10.0)
    assert c.role == "bn" and c.bn_eps == 1e-6 and c.running_var is bn.running_var
    w0 = bn.weight.detach().clone()
    bias0 = bn.bias.detach().clone()
    with torch.no_grad():  # training moved the variance and the weight
        bn.running_var.copy_(torch.tensor([4e-4, 1.0, 1.0]))
        bn.weight.add_(torch.tensor([0.0, -2.0, 0.1]))
    w = bn.weight.data
    expected = ref.bn_clip(w, w0, bn.running_var, c.running_var0, 0.5)
    wrong_eps = ref.bn_clip(w, w0, bn.running_var, c.running_var0, 0.5, eps=0.1)
    project(fragments(c, w, w0, [(0, 3)]))
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(w.double(), wrong_eps, rtol=1e-3)
    assert torch.equal(bn.bias, bias0) and head.name == "1.weight"  # no bias selected


@pytest.mark.parametrize("n", [1, 5, 64])
def test_bn_clip_properties(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(3):
        var0 = torch.rand(n, generator=gen) * 2 + 1e-3
        var = var0 * torch.exp(0.3 * torch.randn(n, generator=gen))
        w0 = torch.randn(n, generator=gen)
        w = w0 + torch.randn(n, generator=gen)
        radius = 0.3
        c = rule("bn", (n,), radius=radius, var=var, var0=var0)
        whole = w.clone()
        project(fragments(c, whole, w0, [(0, n)]))
        torch.testing.assert_close(whole.double(), ref.bn_clip(w, w0, var, var0, radius), rtol=2e-6, atol=1e-7)
        d, d0 = ref.bn_scale(whole, var), ref.bn_scale(w0, var0)
        fp32_slack = 4 * torch.finfo(torch.float32).eps * torch.maximum(d.abs(), d0.abs())  # rounding of w = d * s
        assert bool(((d - d0).abs() <= radius + fp32_slack).all())
        again = whole.clone()
        project(fragments(c, again, w0, [(0, n)]))
        assert torch.equal(again, whole)  # idempotent on the weights
        parts = w.clone()
        sharded(project, c, parts, w0, random_cuts(n, 3, gen))
        # the 3 simulated ranks average their (equal) running variances in float32: v/3 * 3 is within an ulp of v
        torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def test_layernorm_and_embeddings_clip_elementwise():
    for role in ("norm", "embed"):
        w0 = torch.ones(4)
        w = torch.tensor([1.5, 0.9, -1.0, 1.2])
        assert sharded(project, rule(role, (4,), radius=0.3), w, w0, [(0, 2), (2, 4)]) == [1, 1]
        torch.testing.assert_close(w, torch.tensor([1.3, 0.9, 0.7, 1.2]))
    w0 = torch.randn(3, 5)
    w = w0 + torch.randn(3, 5)
    clipped = w.clone()
    sharded(project, rule("embed", (3, 5), radius=0.2, norm="l2"), clipped, w0, [(0, 7), (7, 15)])
    torch.testing.assert_close(clipped.double(), ref.clip(w, w0, 0.2))  # L2-PGM clips diagonal layers too


def test_project_ignores_penalty_none_and_free_constraints():
    for action, radius in (("penalty", 1.0), ("none", 1.0), ("project", None)):
        w0 = torch.zeros(2, 2)
        w = torch.full((2, 2), 5.0)
        c = rule("matrix", (2, 2), radius=radius, action=action, weight=1.0)
        assert project(fragments(c, w, w0, [(0, 4)])) == 0 and bool((w == 5.0).all())


# ---- penalties (SP) -----------------------------------------------------------------------------------------------
def test_penalty_values_by_hand():
    w0 = torch.zeros(2, 3)
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    grad = torch.zeros(2, 3)
    c = rule("matrix", (2, 3), action="penalty", weight=0.1)
    assert sharded(add_penalty_grads, c, w, w0, [(0, 4), (4, 6)], grad) == pytest.approx([0.6, 0.6])  # 0.1*max(6, 1.5)
    torch.testing.assert_close(grad, torch.tensor([[0.1, -0.1, 0.1], [0, 0, 0]]))  # only the arg-max row
    grad.zero_()
    c = rule("matrix", (2, 3), action="penalty", norm="l2", weight=0.1)
    assert add_penalty_grads(fragments(c, w, w0, [(0, 6)], grad)) == pytest.approx(0.1 * 14.75)  # no 1/2
    torch.testing.assert_close(grad, 0.2 * w)
    head = torch.tensor([[1.0, -1.0], [3.0, 0.0]])
    c = rule("head", (2, 2), action="penalty", weight=2.0)
    assert add_penalty_grads(fragments(c, head, head.clone(), [(0, 4)])) == pytest.approx(6.0)  # around zero
    var0 = torch.tensor([1.0, 4.0])
    c = rule("bn", (2,), action="penalty", weight=0.5, var=var0.clone(), var0=var0)
    w0 = torch.tensor([1.0, 2.0])
    w = torch.tensor([2.0, 0.0])  # d - d0 ~ (1, -1)
    assert add_penalty_grads(fragments(c, w, w0, [(0, 2)])) == pytest.approx(0.5 * 2.0, rel=1e-5)


def test_penalties_skip_projected_and_zero_weight_constraints():
    w, w0 = torch.ones(2, 2), torch.zeros(2, 2)
    grad = torch.zeros(2, 2)
    for c in (rule("matrix", (2, 2), action="project", weight=1.0), rule("matrix", (2, 2), action="penalty")):
        assert add_penalty_grads(fragments(c, w, w0, [(0, 4)], grad)) == 0.0
    assert bool((grad == 0).all())


PENALTY_CASES = [("matrix", (5, 3), "mars"), ("matrix", (4, 3, 3, 3), "mars"), ("matrix", (6, 1, 3, 3), "l2"),
                 ("matrix", (16, 8), "l2"), ("head", (3, 17), "mars"), ("head", (3, 17), "l2"), ("bn", (12,), "mars"),
                 ("bn", (12,), "l2"), ("norm", (9,), "mars"), ("norm", (9,), "l2")]


@pytest.mark.parametrize("role, shape, norm", PENALTY_CASES)
def test_penalty_values_and_gradients_match_autograd(role, shape, norm):
    for seed in range(3):
        w, w0, _, gen = random_problem(shape, 200 + seed)
        lam = 0.05
        var0 = torch.rand(shape, generator=gen) + 0.1
        var = var0 * torch.exp(0.2 * torch.randn(shape, generator=gen))
        c = rule(role, shape, action="penalty", norm=norm, weight=lam, var=var if role == "bn" else None,
                 var0=var0 if role == "bn" else None)
        # the reference penalty, differentiated by autograd in float64
        leaf = w.double().requires_grad_()
        anchor = None if role == "head" else w0.double()
        if role == "bn":
            value = ref.bn_penalty(leaf, anchor, var.double(), var0.double(), lam, norm)
        elif role in ("matrix", "head") and norm == "mars":
            value = ref.mars_penalty(leaf, anchor, lam)
        elif norm == "mars":  # diagonal layer: ||w - w0||_1
            value = lam * (leaf - anchor).abs().sum()
        else:
            value = ref.l2_penalty(leaf, anchor, lam)
        value.backward()
        grad0 = torch.randn(shape, generator=gen)  # the loss gradient the penalty is added to
        grad = grad0.clone()
        got = sharded(add_penalty_grads, c, w, w0, random_cuts(w.numel(), 3, gen), grad)
        assert got == pytest.approx([value.item()] * 3, rel=1e-6)  # every rank gets the whole penalty
        torch.testing.assert_close(grad.double(), grad0.double() + leaf.grad, rtol=1e-5, atol=1e-6)


def test_penalty_value_is_the_sum_over_constraints():
    a = rule("matrix", (2, 2), action="penalty", weight=1.0)
    b = rule("head", (1, 2), action="penalty", norm="mars", weight=3.0)
    wa, wb = torch.tensor([[1.0, 1.0], [0.0, -3.0]]), torch.tensor([[0.5, -0.5]])
    za = torch.zeros(2, 2)
    per_rank = [fragments(a, wa, za, [(0, 4)]) + fragments(b, wb, wb, [(0, 1)]),
                fragments(a, wa, za, [(4, 4)]) + fragments(b, wb, wb, [(1, 2)])]
    assert on_ranks(per_rank, add_penalty_grads) == pytest.approx([6.0, 6.0])
    assert add_penalty_grads(fragments(a, wa, za, [(0, 4)]) + fragments(b, wb, wb, [(0, 2)])) == pytest.approx(6.0)


# ---- telemetry -----------------------------------------------------------------------------------------------------
def test_measure_by_hand():
    w0 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    w = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # D rows L1: 1, 3; W rows L1: 3, 3
    (s,), (s1,) = sharded(measure, rule("matrix", (2, 2), radius=3.0), w, w0, [(0, 3), (3, 4)])
    assert s == s1  # every rank gets the same telemetry
    assert (s.distance, s.layer_norm, s.frac_at_bound, s.radius, s.ratio) == (3.0, 3.0, 0.5, 3.0, 1.0)
    assert s.frobenius == pytest.approx(math.sqrt(10))
    (s,) = measure(fragments(rule("matrix", (2, 2), radius=3.0, action="none"), w, w0, [(0, 4)]))
    assert s.radius is None and s.frac_at_bound == 0.0 and math.isnan(s.ratio)
    (s,) = measure(fragments(rule("head", (2, 2), radius=3.0), w, w0, [(0, 4)]))
    assert (s.distance, s.layer_norm, s.frac_at_bound) == (3.0, 3.0, 1.0)  # around zero: D = W
    (s,) = measure(fragments(rule("matrix", (2, 2), radius=math.sqrt(10), norm="l2"), w, w0, [(0, 4)]))
    assert s.frac_at_bound == 1.0  # L2: the whole tensor is at its Frobenius bound


def test_measure_bn_uses_the_effective_scale():
    var0 = torch.tensor([1.0, 4.0, 0.25])
    var = torch.tensor([1.0, 1.0, 0.25])
    w0 = torch.tensor([1.0, 2.0, -0.5])  # d0 ~ (1, 1, -1)
    w = torch.tensor([1.0, 2.0, -0.25])  # d ~ (1, 2, -0.5)
    (s,), (s1,) = sharded(measure, rule("bn", (3,), radius=1.0, var=var, var0=var0), w, w0, [(0, 2), (2, 3)])
    assert s == s1
    assert s.distance == pytest.approx(1.0, rel=1e-5) and s.layer_norm == pytest.approx(2.0, rel=1e-5)
    assert s.frac_at_bound == pytest.approx(1 / 3)


def test_bound_term_by_hand():
    stats = [LayerStats("a", "matrix", 1.0, distance=0.5, layer_norm=1.0, frac_at_bound=0.0, frobenius=0.0),
             LayerStats("b", "bn", 1.0, distance=1.0, layer_norm=2.0, frac_at_bound=0.0, frobenius=0.0),
             LayerStats("c", "norm", 1.0, distance=0.0, layer_norm=0.0, frac_at_bound=0.0, frobenius=0.0)]
    # log(2*1) + log(2*2) + log(0.5/1 + 1/2); the layer with B = 0 is skipped
    assert bound_term(stats) == pytest.approx(math.log(8.0))
    assert bound_term(stats[2:]) != bound_term(stats[2:])  # nan: nothing to bound
    assert bound_term([dataclasses.replace(stats[0], distance=0.0)]) == float("-inf")


# ---- two simulated ranks: fragments + one reduce that sums partials and averages running variances ----------------
def test_two_simulated_ranks_project_like_the_whole_tensor():
    gen = torch.Generator().manual_seed(5)
    conv_w0 = torch.randn(4, 3, 3, 3, generator=gen)
    conv_w = conv_w0 + torch.randn(4, 3, 3, 3, generator=gen) * torch.tensor([3.0, 0.1, 2.0, 0.2]).view(4, 1, 1, 1)
    bn_w0 = torch.rand(4, generator=gen) + 0.5
    bn_w = bn_w0 + torch.randn(4, generator=gen)
    var0 = torch.rand(4, generator=gen) + 0.5
    rank_vars = [var0 * 1.5, var0 * 0.7]  # each rank saw its own micro-batches
    conv_c = rule("matrix", conv_w.shape, radius=4.0)
    bn_c = rule("bn", (4,), radius=0.2, var=var0.clone(), var0=var0)
    # every rank has its own BatchNorm buffer, hence its own Constraint pointing at it
    bn_rank = [dataclasses.replace(bn_c, running_var=v.clone()) for v in rank_vars]

    # The whole-tensor answer, in one process, with the mean running variance.
    mean_var = (rank_vars[0] + rank_vars[1]) / 2
    expect_conv = ref.mars_project(conv_w, conv_w0, 4.0)
    expect_bn = ref.bn_clip(bn_w, bn_w0, mean_var, var0, 0.2)

    # Each rank holds its own copy and owns (projects) one fragment: the conv cut mid-row, the BN mid-tensor.
    copies = [(conv_w.clone(), bn_w.clone()) for _ in range(2)]
    conv_cuts, bn_cuts = [(0, 50), (50, conv_w.numel())], [(0, 1), (1, 4)]
    per_rank = [fragments(conv_c, copies[r][0], conv_w0, [conv_cuts[r]])
                + fragments(bn_rank[r], copies[r][1], bn_w0, [bn_cuts[r]]) for r in range(2)]
    reduce = RankReduce(2)
    on_ranks(per_rank, project, reduce)
    assert reduce.calls == [1, 1]  # ONE reduce per projection

    conv = torch.cat([copies[r][0].view(-1)[a:b] for r, (a, b) in enumerate(conv_cuts)]).view_as(conv_w)
    bn = torch.cat([copies[r][1][a:b] for r, (a, b) in enumerate(bn_cuts)])
    torch.testing.assert_close(conv.double(), expect_conv, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(bn.double(), expect_bn, rtol=2e-6, atol=1e-7)
    assert deviation_row_norms(conv, conv_w0).max() <= 4.0 * (1 + RELATIVE_TOLERANCE)
    assert torch.equal(bn_rank[0].running_var, bn_rank[1].running_var)  # both ranks hold the same mean variance
    torch.testing.assert_close(bn_rank[0].running_var, mean_var)

    # Same projection in one process on the whole tensors, after the same averaging: identical weights.
    whole_conv, whole_bn = conv_w.clone(), bn_w.clone()
    bn_one = dataclasses.replace(bn_c, running_var=bn_rank[0].running_var.clone())
    project(fragments(conv_c, whole_conv, conv_w0, [(0, conv_w.numel())])
            + fragments(bn_one, whole_bn, bn_w0, [(0, 4)]))
    # the BN clip is elementwise (bit-identical); conv rows cut across ranks sum in another order in float32
    torch.testing.assert_close(conv, whole_conv, rtol=1e-6, atol=1e-6)
    assert torch.equal(bn, whole_bn)
