"""The public API in a plain torch loop on 2 CPU processes (no accelerate): DDP and FSDP2 `fully_shard`, one torchrun
launch (tests/distributed/api_torch_worker.py). Each ends equal to the same loop in one process (the whole global
batch) and inside the bound; an optimizer built before fully_shard is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import api_torch_worker as worker
import dist_common as common
import pytest
import torch
import torch.nn.functional as F

import mars_dist

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("api_torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(common.free_port()), "tests/distributed/api_torch_worker.py", str(out)]
    proc = subprocess.run(cmd, cwd=common.ROOT, env=common.worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def single_process():
    model = common.build_model("effnet")
    opt = torch.optim.AdamW(model.parameters(), lr=common.LR, eps=common.EPS, weight_decay=0.01)
    mars_dist.attach(model, opt, radius=worker.RADIUS, head_radius=worker.HEAD_RADIUS,
                     pretrained=mars_dist.capture_pretrained(model))
    common.set_train_mode(model, "eval")
    x, y = worker.data()
    for u in range(worker.UPDATES):
        F.cross_entropy(model(x[u]), y[u]).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_same_weights_as_one_process_and_inside_the_bound(launch, single_process, kind):
    result = torch.load(launch / f"{kind}.pt")
    assert result["backend"] == ("replicated" if kind == "ddp" else "fsdp2") and result["updates"] == worker.UPDATES
    weights = result["weights"]
    assert weights.keys() == single_process.keys()
    for k, v in single_process.items():  # AdamW's normalised steps: ulp-level sums in another order, 5e-6 at most
        torch.testing.assert_close(weights[k].float(), v, atol=common.ATOL["effnet"], rtol=1e-5, msg=k)
    pretrained = common.build_model("effnet")
    constraints = common.constraints_for(pretrained, common.case("eff_pgm"))
    ratios = common.max_ratios(constraints, weights, dict(pretrained.named_parameters()))
    assert max(ratios.values()) <= 1 + common.BOUND_RTOL
    assert result["max_ratio"] == pytest.approx(max(ratios.values()), rel=1e-4)


def test_optimizer_built_before_fully_shard_is_refused(launch):
    message = json.loads((launch / "refusal.json").read_text())["optimizer_before_sharding"]
    assert "not in its param_groups" in message
