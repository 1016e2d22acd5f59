"""DeepSpeed ZeRO-Offload (offload_optimizer: {device: cpu}) under ZeRO-1/2/3 on 2 CPU processes (accelerate launch,
gloo): DeepSpeed keeps the flat fp32 masters on the CPU and steps the trainer's torch optimizer there; the projection
hook fires inside that step on those CPU masters. Same checks as without offload: element by element the
single-process run (also with no constraint at all: the update itself is the same), the bound on the fp32 master and
on the weights forward uses after every update, layout-free anchors. One worker launch per stage (ZeRO-3 through the
shipped launch/accelerate/zero3_offload.yaml). Refusals (NVMe, SuperOffload, a swapped-in DeepSpeed optimizer) are
unit-tested in tests/run/test_offload_config.py."""

import dist_checks as checks
import pytest

pytestmark = pytest.mark.dist
KEYS = ("offload1", "offload2", "offload3")
PROJECTING = [c for k in KEYS for c in checks.cases(k, lambda c: c["method"] != "none")]


def common_cases(key) -> list[str]:
    return [name for _, name in checks.cases(key)]


@pytest.mark.parametrize("key", KEYS)
def test_deepspeed_really_offloads_and_steps_our_optimizer(launches, key):
    """DeepSpeed's own offload flag is set and the inner optimizer it steps is the trainer's torch AdamW (not
    DeepSpeedCPUAdam, which accelerate substitutes unless zero_force_ds_cpu_optimizer is false)."""
    for name in common_cases(key):
        for r in launches(key).ranks(name):
            assert r["offload"] is True and r["inner_optimizer"] == "AdamW", (name, r["offload"], r["inner_optimizer"])


@pytest.mark.parametrize("key", ("offload2", "offload3"))
def test_update_without_constraint_is_the_single_process_update(launches, reference, key):
    """Method none: the offloaded update alone equals the single-process one (measured 1.4e-7 for ZeRO-2 and 3;
    before, accelerate had silently replaced the optimizer by DeepSpeedCPUAdam: 0.11 off with SGD)."""
    got, ref = launches(key).weights("offload_none"), reference("offload_none")
    worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{key}: {worst[1]} differs from the single-process run by {worst[0]:.3g}"


@pytest.mark.parametrize("key,name", [c for c in PROJECTING if not checks.common.case(c[1])["bf16"]])
def test_same_weights_as_single_process(launches, reference, key, name):
    """With the projection (or penalty) active; tolerance 1e-6 (measured <= 1.7e-7)."""
    checks.assert_same_as_single_process(launches(key), reference, name)


@pytest.mark.parametrize("key,name", PROJECTING)
def test_within_radius_after_every_update(launches, key, name):
    """On the CPU fp32 master and on the weights forward uses (bf16: forward == bf16(projected master))."""
    checks.assert_within_radius_every_update(launches(key), name)


@pytest.mark.parametrize("key,name", [("offload1", "offload_pgm_2groups"), ("offload3", "offload_pgm_subgroups")])
def test_multi_group_offload_recopies_earlier_groups(launches, key, name):
    """Two flat CPU partitions: the projection acts once, on the last firing, and the group copied to the forward
    weights before it is re-copied (forward == master is checked in the bound test above)."""
    for r in launches(key).ranks(name):
        assert r["num_groups"] == 2 and r["updates"] == checks.common.UPDATES


@pytest.mark.parametrize("key,name", [("offload2", "offload_pgm"), ("offload3", "offload_pgm_subgroups")])
def test_anchor_checksum_is_layout_free(launches, key, name):
    checks.assert_checksum_layout_free(launches(key), name)


def test_zero3_offload_resume_is_exact(launches):
    """accelerate save_state / load_state (optimizer state and fp32 masters from the CPU) + per-rank anchor_state,
    resumed in a fresh engine after update 2: bit-identical to the uninterrupted run (measured 0.0)."""
    checks.assert_resume_exact(launches("offload3"), "offload_pgm_subgroups")
