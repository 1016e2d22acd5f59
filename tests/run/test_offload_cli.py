"""ZeRO-Offload through the CLI (2 CPU processes, gloo, real DeepSpeed): `mars-dist train` under the shipped
launch/accelerate/zero3_offload.yaml, and under ZeRO-2 with an offload_optimizer block and NO
zero_force_ds_cpu_optimizer key (the trainer must set it false, or accelerate swaps the optimizer and the backend
refuses), ends with the single-process weights, the projection active and the bound holding on the export."""

import json

import pytest

from launch_helpers import ROOT, assert_bound_holds, assert_same_weights, export_weights, projection_was_active, run_cli

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=3", "train.bn_mode=eval", "constraint.radius=0.05", "constraint.head_radius=1.0",
         # SGD (linear in the gradient): accelerate used to turn it into DeepSpeedCPUAdam under offload
         "train.optimizer=sgd", "train.lr=0.05", "tracking.wandb_mode=disabled", "train.grad_accum=2",
         "train.eval_every_epoch=false"]


def zero2_offload_config(tmp_path) -> str:
    ds = json.loads((ROOT / "launch/deepspeed/zero2.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert "zero_force_ds_cpu_optimizer" not in ds
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml = (ROOT / "launch/accelerate/zero2.yaml").read_text()
    yaml = yaml.replace("launch/deepspeed/zero2.json", str(tmp_path / "ds.json"))
    (tmp_path / "zero2_offload.yaml").write_text(yaml)
    return str(tmp_path / "zero2_offload.yaml")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_cli(out, SMALL + ["train.batch_size=8"])
    return out


@pytest.mark.parametrize("launch_config", ["zero3_offload.yaml", "zero2_offload"])
def test_offload_matches_single_process_and_bounds_the_export(tmp_path, single, launch_config):
    if launch_config == "zero2_offload":
        launch_config = zero2_offload_config(tmp_path)
    run = tmp_path / "run"
    run_cli(run, SMALL + ["train.batch_size=4"], launch_config)
    assert_same_weights(export_weights(single), export_weights(run))
    assert projection_was_active(run) and projection_was_active(single)
    assert_bound_holds(run)
