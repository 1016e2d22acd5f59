"""The weight EMA under FSDP2 (fully_shard on a CPU mesh of 2, gloo; one torchrun launch): element by element the
one-process EMA on the same global batches (a ViT whose one-row embeddings leave rank 1 empty, an EfficientNet with
BatchNorm), ~1/2 of the fp32 model per rank, and its per-rank checkpoint files re-cut into one process's layout."""

from __future__ import annotations

import subprocess
import sys

import dist_common as common
import pytest
import torch
import torch.nn.functional as F

from mars_dist.run.ema import WeightEma

pytestmark = pytest.mark.dist
CASES = ["pgm", "eff_pgm"]
DECAY = 0.7


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema_fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(common.free_port()), "tests/distributed/ema_fsdp2_worker.py", str(out), *CASES]
    proc = subprocess.run(cmd, cwd=common.ROOT, env=common.worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


def one_process(name: str):
    """dist_common.reference_run's loop (mean over all WORLD x ACCUM micro-batches per update) with the EMA."""
    from mars_dist.run.hook import ProjectionHook
    from mars_dist.sharding import ReplicatedBackend

    c = common.case(name)
    model = common.build_model(c["model"])
    opt = common.make_optimizer(model, c["groups"])
    backend = ReplicatedBackend(common.constraints_for(model, c), model, opt)
    ProjectionHook(backend)
    ema = WeightEma(backend, model, DECAY, True)
    x, y = common.data()
    common.set_train_mode(model, c["bn_mode"])
    params = [p for p in model.parameters() if p.requires_grad]
    for u in range(common.UPDATES):
        total = [torch.zeros_like(p) for p in params]
        for m in range(common.ACCUM):
            per_rank = []
            for r in range(common.WORLD):
                (F.cross_entropy(model(x[u, r, m]), y[u, r, m]) / common.ACCUM).backward()
                per_rank.append([p.grad.clone() for p in params])
                opt.zero_grad()
            for i in range(len(params)):
                total[i] += sum(g[i] for g in per_rank) / common.WORLD
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return model, ema


@pytest.mark.parametrize("name", CASES)
def test_sharded_ema_equals_one_process(launch, name):
    model, ema = one_process(name)
    atol = common.ATOL[common.case(name)["model"]]
    with ema.applied():
        expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = torch.load(launch / f"{name}_ema.pt")
    trained = torch.load(launch / f"{name}.pt")
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=atol, rtol=0, msg=k)
    assert any(not torch.equal(got[k], trained[k]) for k in got)  # an average, not the last weights
    # the two ranks' checkpoint files, re-cut by (offset, numel) into this process's whole parameters
    recut = WeightEma(ema.backend, model, DECAY, True)
    recut.load(launch / f"{name}_ema", say=lambda _: None)
    assert recut.updates == common.UPDATES
    for a, b in zip(ema.shadow, recut.shadow):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_ema_holds_half_the_model_per_rank(launch, name):
    import json

    ranks = json.loads((launch / f"{name}.json").read_text())
    assert all(r["updates"] == common.UPDATES for r in ranks)
    assert sum(r["fragments"] for r in ranks) == ranks[0]["whole"]  # the row blocks add up to one model, no more
    assert all(0.3 < r["fragments"] / r["whole"] < 0.7 for r in ranks), ranks  # uneven row splits: not exactly 1/2
    assert all(r["bytes"] - r["fragments"] < 0.1 * r["whole"] for r in ranks)  # + the replicated BN statistics
