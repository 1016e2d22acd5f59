"""torch FSDP2 (fully_shard on a CPU mesh of 2, gloo): same checks as for ZeRO, plus empty shards and a
torch.distributed.checkpoint resume. One torchrun launch (~20 s) serves all tests."""

import dist_checks as checks
import pytest

pytestmark = pytest.mark.dist
KEY = "fsdp2"


@pytest.mark.parametrize("key,name", checks.equivalence_cases(KEY))
def test_same_weights_as_single_process(launches, reference, key, name):
    checks.assert_same_as_single_process(launches(key), reference, name)


@pytest.mark.parametrize("key,name", checks.cases(KEY))
def test_within_radius_after_every_update(launches, key, name):
    checks.assert_within_radius_every_update(launches(key), name)


@pytest.mark.parametrize("key,name", checks.cases(KEY))
def test_anchor_checksum_is_layout_free(launches, key, name):
    checks.assert_checksum_layout_free(launches(key), name)


def test_rows_that_do_not_divide_leave_empty_shards(launches):
    """cls_token (1, 1, 45) and pos_embed (1, 17, 45) have one row: rank 1 holds nothing of them."""
    ranks = launches(KEY).ranks("pgm")
    assert ranks[0]["empty_fragments"] == 0 and ranks[1]["empty_fragments"] == 2


@pytest.mark.parametrize("sharded,gather", [("pgm", "gather"), ("marssp", "gather_sp")])
def test_gather_mode_gives_the_same_weights(launches, sharded, gather):
    checks.assert_gather_matches_sharded(launches(KEY), sharded, gather)


def test_dcp_resume_is_exact(launches):
    """{"model", "optim", "anchor"} through torch.distributed.checkpoint, resumed in a fresh model after update 2."""
    checks.assert_resume_exact(launches(KEY), "pgm")


def test_bn_running_var_averaged(launches):
    checks.assert_bn_running_var_averaged(launches(KEY))
