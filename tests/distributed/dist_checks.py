"""Assertions shared by test_zero.py and test_fsdp2.py (one worker launch per backend, several checks on it)."""

from __future__ import annotations

import math

import dist_common as common
import pytest
import torch

from mars_dist.sharding import ReplicatedBackend

EQUIVALENCE = ("pgm", "pgm_2groups", "pgm_subgroups", "l2pgm", "marssp", "l2sp_2groups", "l2sp_subgroups", "eff_pgm",
               "hf_vit_pgm", "hf_resnet_pgm", "ftp", "ftp_2groups", "ftp_subgroups", "eff_ftp", "spd", "spd_2groups",
               "spd_subgroups", "eff_spd", "hf_vit_spd")


def cases(key, pick=lambda c: True) -> list:
    return [(key, name) for name in common.LAUNCHES[key][0] if pick(common.case(name))]


def equivalence_cases(key) -> list:
    return cases(key, lambda c: c["name"] in EQUIVALENCE)


def assert_same_as_single_process(launch, reference, name: str) -> None:
    """Element by element against the single-process run, with the projection active."""
    ranks, got, ref = launch.ranks(name), launch.weights(name), reference(name)
    assert set(got) == set(ref)
    atol = common.ATOL[common.case(name)["model"]]
    worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
    assert worst[0] <= atol, f"{launch.key}/{name}: {worst[1]} differs from the single-process run by {worst[0]:.3g}"
    assert all(r["updates"] == common.UPDATES for r in ranks), [r["updates"] for r in ranks]
    if common.case(name)["method"].endswith(("pgm", "ftp")):
        assert ranks[0]["active_layers"] > 0 and max(ranks[0]["ratio_master"]) >= 1 - 1e-4, \
            "the projection never bit: the comparison would not test it"
    if common.case(name)["method"].endswith("spd"):  # layers decayed per update, the same on every rank
        assert sum(ranks[0]["clipped"]) > 0 and ranks[0]["clipped"] == ranks[1]["clipped"], ranks[0]["clipped"]


def assert_within_radius_every_update(launch, name: str) -> None:
    """On the fp32 master AND on the weights forward uses, after every update."""
    for r in launch.ranks(name):
        assert len(r["ratio_master"]) == common.UPDATES
        assert max(r["ratio_master"]) <= 1 + common.BOUND_RTOL, r["ratio_master"]
        if common.case(name)["bf16"]:
            assert max(r["forward_vs_bf16_master"]) == 0.0, "forward is not bf16(projected master): a lag"
            assert max(r["bf16_excess"]) <= 1.0, r["bf16_excess"]
        else:
            assert max(r["ratio_forward"]) <= 1 + common.BOUND_RTOL, r["ratio_forward"]
            assert max(r["master_vs_forward"]) == 0.0, "forward weights are stale (not the projected master)"


def single_process_checksum(name: str) -> list[float]:
    c = common.case(name)
    model = common.build_model(c["model"])  # fp32, also for bf16 cases: the anchors are the pretrained weights
    backend = ReplicatedBackend(common.constraints_for(model, c), model, torch.optim.SGD(model.parameters(), lr=0))
    return backend.anchor_checksum()


def assert_checksum_layout_free(launch, name: str) -> None:
    want = single_process_checksum(name)
    for r in launch.ranks(name):
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(r["checksum"], want)), \
            (r["checksum"], want)


def assert_resume_exact(launch, name: str) -> None:
    ranks = launch.ranks(name)
    a, b = launch.weights(name), launch.weights(name, "_resumed")
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= 1e-7, f"resumed run differs from the uninterrupted one at {worst[1]} by {worst[0]:.3g}"
    for r in ranks:
        assert r["resumed_checksum"] == r["checksum"], "anchors were not restored from the checkpoint"
        assert max(r["resumed_ratio_master"]) <= 1 + common.BOUND_RTOL


def assert_gather_matches_sharded(launch, sharded: str, gather: str = "gather") -> None:
    g, s = launch.weights(gather), launch.weights(sharded)
    worst = max((g[k] - s[k]).abs().max().item() for k in g)
    # row sums are float32: a row cut across ranks (sharded) sums in another order than the whole row (gather)
    assert worst <= 5e-7, f"gather mode differs from sharded mode by {worst:.3g}"
    assert [r["backend"] for r in launch.ranks(gather)] == ["gather", "gather"]
    assert launch.ranks(gather)[0]["ratio_master"] == pytest.approx(launch.ranks(sharded)[0]["ratio_master"],
                                                                     rel=1e-5)


def assert_bn_running_var_averaged(launch) -> None:
    """BN in train mode: each rank saw other batches, yet the variances the projection uses are the same on
    every rank (averaged in the projection's collective) and moved from their initial values."""
    ranks = launch.ranks("eff_bntrain")
    assert ranks[0]["bn_var_sums"] == ranks[1]["bn_var_sums"]
    assert ranks[0]["bn_var_sums"] != launch.ranks("eff_pgm")[0]["bn_var_sums"]
    assert max(max(r["ratio_master"]) for r in ranks) <= 1 + common.BOUND_RTOL
