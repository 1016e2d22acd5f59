"""DeepSpeed ZeRO-1/2/3 on 2 CPU processes (accelerate launch, gloo): the sharded projection reproduces the
single-process run, keeps every layer inside its ball on the fp32 master and in forward after every update, and
survives checkpoint / resume. One worker launch per stage (~20-45 s each) serves all tests of that stage."""

import dist_checks as checks
import pytest

pytestmark = pytest.mark.dist
STAGES = (1, 2, 3)


@pytest.mark.parametrize("stage,name", [c for s in STAGES for c in checks.equivalence_cases(s)])
def test_same_weights_as_single_process(launches, reference, stage, name):
    checks.assert_same_as_single_process(launches(stage), reference, name)


@pytest.mark.parametrize("stage,name", [c for s in STAGES for c in checks.cases(s)])
def test_within_radius_after_every_update(launches, stage, name):
    checks.assert_within_radius_every_update(launches(stage), name)


@pytest.mark.parametrize("stage,name", [c for s in STAGES for c in checks.cases(s)])
def test_anchor_checksum_is_layout_free(launches, stage, name):
    """Every rank reports the single-process checksum of the anchors (bf16 too: the fp32 pretrained weights, written into the masters)."""
    checks.assert_checksum_layout_free(launches(stage), name)


@pytest.mark.parametrize("stage,name,groups", [(1, "pgm_2groups", 2), (2, "pgm", 1), (3, "pgm", 1),
                                               (3, "pgm_subgroups", 2), (3, "l2sp_subgroups", 2)])
def test_hook_fires_per_group_but_acts_once(launches, stage, name, groups):
    """The multi-firing paths are really exercised (and the fp32 -> low-precision re-copy: forward is exact)."""
    ranks = launches(stage).ranks(name)
    assert [r["num_groups"] for r in ranks] == [groups, groups]
    assert all(r["updates"] == 4 for r in ranks)


@pytest.mark.parametrize("stage", (2, 3))
def test_projecting_after_the_step_needs_the_sync(launches, stage):
    """Fallback path: project after engine.step() (radius halved), sync_forward_weights(): forward sees it."""
    for r in launches(stage).ranks("pgm"):
        assert r["fallback_before_sync"] > 1e-4, "editing the master after the step should not reach forward alone"
        assert r["fallback_master_vs_forward"] == 0.0
        assert r["fallback_ratio_forward"] <= 1 + checks.common.BOUND_RTOL


@pytest.mark.parametrize("stage", (2, 3))
def test_skipped_step_does_not_project(launches, stage):
    """A non-finite gradient: DeepSpeed skips the update, the inner step never runs, the hook does nothing."""
    for r in launches(stage).ranks("pgm"):
        assert r["skip_ds_skipped"] == 1 and r["skip_hook_updates"] == 0 and r["skip_weights_changed"] == 0.0


@pytest.mark.parametrize("stage,name,kind", [(2, "bf16_pgm", "stage12"), (3, "bf16_pgm", "stage3"),
                                             (1, "bf16_fp32acc", "bf16_optimizer")])
def test_bf16_anchors_are_the_fp32_pretrained_weights(launches, stage, name, kind):
    for r in launches(stage).ranks(name):
        assert r["zero_kind"] == kind and r["anchor_vs_pretrained"] == 0.0


@pytest.mark.parametrize("stage,sharded,gather", [(2, "pgm", "gather"), (3, "pgm_subgroups", "gather"),
                                                  (3, "marssp", "gather_sp")])
def test_gather_mode_gives_the_same_weights(launches, stage, sharded, gather):
    checks.assert_gather_matches_sharded(launches(stage), sharded, gather)


def test_zero3_resume_is_exact(launches):
    """accelerate save_state / load_state + per-rank anchor_state, resumed in a fresh engine after update 2."""
    checks.assert_resume_exact(launches(3), "pgm_subgroups")


def test_zero3_anchor_state_refuses_another_layout(launches):
    for r in launches(3).ranks("pgm_subgroups"):
        assert "rank=" in r["layout_error"] and "rebuild the anchors from the pretrained weights" in r["layout_error"]


def test_zero3_bn_running_var_averaged(launches):
    checks.assert_bn_running_var_averaged(launches(3))
