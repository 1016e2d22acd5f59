"""DDP over 2 CPU processes (gloo) through `accelerate launch` ends with the single-process weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mars_dist import config
from mars_dist.run.train import train

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

COMMON = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
          "train.max_steps=3", "train.bn_mode=eval", "constraint.radius=0.05",
          # SGD: its update is linear in the gradient, so the fp32 rounding of a 2-rank gradient average stays at
          # rounding level (Adam divides by sqrt(v) and blows ~1e-9 gradient noise up to ~lr on near-zero grads)
          "train.optimizer=sgd", "train.lr=0.05",
          "constraint.head_radius=1.0", "tracking.wandb_mode=disabled", "train.grad_accum=2"]


def free_port() -> int:
    from launch_helpers import free_port as port  # one port policy for every launch (see there)

    return port()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(config.load(None, COMMON + ["train.batch_size=8", f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("launch_config", ["cpu.yaml", "zero1.yaml", "zero2.yaml", "zero3.yaml", "zero3_init.yaml"])
def test_two_processes_match_single_process(tmp_path, single_run, launch_config):
    """One process with micro-batch 8 == two processes with micro-batch 4 each (same global batch, same order),
    through the CLI under `accelerate launch` with the shipped configs (DDP, ZeRO-1/2/3, ZeRO-3 with zero.Init: the
    timm model created partitioned and the bundled weights loaded into the partitions). BN in eval mode:
    batch statistics would otherwise depend on the per-rank batch size."""
    single = single_run
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/accelerate" / launch_config),
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "mars_dist", "train",
           *COMMON, "train.batch_size=4", f"output_dir={ddp}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = load_file(str(single / "export" / "model.safetensors"))
    b = load_file(str(ddp / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-6, rtol=1e-5, msg=k)
    # the projection was active in both runs (some layer at its radius)
    for run in (single, ddp):
        layers = json.loads((run / "layers.json").read_text())["layers"]
        assert any(l["frac_at_bound"] > 0 for l in layers), run
