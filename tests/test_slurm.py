"""launch/slurm/*.sbatch on a real SLURM cluster of two slurmd "nodes" on loopback (tests/slurm_cluster.py), with the
stand-in trainer tests/fixtures/fake_trainer.py (same contract as `mars_dist train`: output_dir=, resume=auto,
SIGUSR1 -> checkpoint + preempted.json + exit 99) launched through the real `accelerate launch` (torchrun agent).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "launch" / "slurm"
FAKE = ROOT / "tests" / "fixtures" / "fake_trainer.py"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("cluster"), nodes=2) as c:
        yield c


def _submit(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, sbatch_args: tuple = (),
            **env: str) -> tuple[str, Path]:
    """sbatch launch/slurm/SCRIPT with the stand-in trainer; returns (job id, job log path)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 3, "step_time": 0.1}))
    log = tmp_path / "job.log"
    env_extra = {"MARS_ROOT": str(ROOT), "MARS_PYTHON": sys.executable, "MARS_TRAIN_CMD": f"{FAKE} train",
                 "OMP_NUM_THREADS": "1", **env}
    job = cluster.sbatch(SLURM_DIR / script, str(cfg), *args, env_extra=env_extra, chdir=tmp_path,
                         sbatch_args=(f"--output={log}", *sbatch_args))
    return job, log


def _wait(cluster: SlurmCluster, job: str, log: Path, timeout: float) -> str:
    try:
        return cluster.wait(job, timeout=timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n--- job log\n{log.read_text() if log.exists() else '(none)'}") from None


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _wait_for_steps(cluster: SlurmCluster, job: str, log: Path, out: Path, n: int, timeout: float = 90) -> None:
    """Wait until rank 0 of the stand-in has logged `n` steps (the job is mid-run)."""
    steps_log = out / "steps.rank0.log"
    deadline = time.monotonic() + timeout
    while not (steps_log.exists() and len(steps_log.read_text().splitlines()) >= n):
        states = cluster.states(job)
        assert time.monotonic() < deadline, f"never got going ({states}):\n{log.read_text() if log.exists() else ''}"
        assert not states or states[0] in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()
        time.sleep(0.2)


def test_multinode_rendezvous(cluster, tmp_path):
    out = tmp_path / "out"
    job, log = _submit(cluster, tmp_path, "multinode.sbatch", f"output_dir={out}", "steps=3")
    state = _wait(cluster, job, log, timeout=90)
    assert state == "COMPLETED", log.read_text()
    ranks = [_read(out / f"rank{r}.json") for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info["rank"] == r and info["world_size"] == 2
        assert info["allreduce"] == info["expected"] == 3.0  # both ranks really joined one gloo group
        assert info["SLURM_JOB_ID"] == job and info["start_step"] == 0
    # one agent per SLURM node, machine rank = SLURM_NODEID, rendezvous on the first node at the job's port
    assert {(i["SLURMD_NODENAME"], i["SLURM_NODEID"]) for i in ranks} == {("n1", "0"), ("n2", "1")}
    assert {i["MASTER_ADDR"] for i in ranks} == {"127.0.0.1"}
    assert {i["MASTER_PORT"] for i in ranks} == {str(20000 + int(job) % 20000)}
    assert (out / "model.safetensors").exists()
    assert "SLURM_RESTART_COUNT=unset" in log.read_text()


def test_single_node_two_processes(cluster, tmp_path):
    out = tmp_path / "out"
    job, log = _submit(cluster, tmp_path, "single_node.sbatch", f"output_dir={out}", "steps=2",
                       MARS_PROCS_PER_NODE="2")
    state = _wait(cluster, job, log, timeout=90)
    assert state == "COMPLETED", log.read_text()
    ranks = [_read(out / f"rank{r}.json") for r in (0, 1)]
    assert [(i["rank"], i["LOCAL_RANK"], i["world_size"], i["allreduce"]) for i in ranks] == \
        [(0, "0", 2, 3.0), (1, "1", 2, 3.0)]
    assert ranks[0]["SLURMD_NODENAME"] == ranks[1]["SLURMD_NODENAME"]  # one node, one agent, two workers
    assert (out / "model.safetensors").exists()


def test_preemption_checkpoints_requeues_and_resumes(cluster, tmp_path):
    out = tmp_path / "out"
    steps = 40
    job, log = _submit(cluster, tmp_path, "multinode.sbatch", f"output_dir={out}", f"steps={steps}",
                       "step_time=0.2")
    _wait_for_steps(cluster, job, log, out, 4)
    # What `#SBATCH --signal=B:USR1@120` does near the time limit: signal the batch shell only.
    cluster.scancel(job, "--signal=USR1", "--batch")
    state = _wait(cluster, job, log, timeout=120)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert cluster.job_info(job).get("Restarts") == "1", text

    preempted = _read(out / "preempted.json")
    ckpt = preempted["step"]
    assert preempted["signal"] == "SIGUSR1"
    assert 4 <= ckpt < steps, preempted
    assert (out / "checkpoints" / f"step_{ckpt}" / "state.json").exists()
    # the requeued run knew it was one and resumed from the checkpoint, on both nodes
    assert "SLURM_RESTART_COUNT=1" in text and "requeueing job" in text
    for r in (0, 1):
        info = _read(out / f"rank{r}.json")
        assert info["SLURM_RESTART_COUNT"] == "1" and info["start_step"] == ckpt, info
        runs = (out / f"steps.rank{r}.log").read_text().splitlines()
        assert runs == [f"run=0 step={s}" for s in range(1, ckpt + 1)] + \
            [f"run=1 step={s}" for s in range(ckpt + 1, steps + 1)], runs
    assert (out / "model.safetensors").exists()


def test_sweep_array_runs_each_task(cluster, tmp_path):
    out = tmp_path / "sweep"
    job, log = _submit(cluster, tmp_path, "sweep_array.sbatch", f"output_dir={out}", sbatch_args=("--array=0-1",),
                       MARS_SWEEP_CMD=f"{sys.executable} {FAKE} sweep", MARS_PROCS_PER_NODE="1")
    state = _wait(cluster, job, log, timeout=120)
    assert state == "COMPLETED", log.read_text()
    tasks = [_read(out / f"sweep_task{t}.json") for t in (0, 1)]
    assert [t["SLURM_ARRAY_TASK_ID"] for t in tasks] == ["0", "1"]
    assert len({t["SLURM_JOB_ID"] for t in tasks}) == 2  # two separate jobs of one array
    for t in tasks:
        assert t["trials"] == 1 and t["codes"] == [0], t
        assert "accelerate.commands.launch" in t["launcher"] and "--num_processes 1" in t["launcher"]
        assert (out / f"trial_t{t['task']}_0" / "model.safetensors").exists()


def test_plain_scancel_checkpoints_but_stays_cancelled(cluster, tmp_path):
    # scancel sends SIGTERM to every step (and the batch shell): the trainer checkpoints, but the job must not requeue
    out = tmp_path / "out"
    job, log = _submit(cluster, tmp_path, "multinode.sbatch", f"output_dir={out}", "steps=200", "step_time=0.2")
    _wait_for_steps(cluster, job, log, out, 2)
    cluster.scancel(job)
    state = _wait(cluster, job, log, timeout=60)
    text = log.read_text()
    assert state == "CANCELLED", text
    assert _read(out / "preempted.json")["signal"] == "SIGTERM"
    assert "not requeueing" in text and "requeueing job" not in text
    assert cluster.job_info(job).get("Restarts") == "0"
