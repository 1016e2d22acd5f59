"""launch/slurm/*.sbatch on a real SLURM cluster of two slurmd "nodes" on loopback (tests/slurm_cluster.py), one
cluster for the whole module.

First with the stand-in trainer tests/fixtures/fake_trainer.py (same contract as `mars_dist train`: output_dir=,
resume=auto, SIGUSR1 -> checkpoint + preempted.json + exit 99) launched through the real `accelerate launch` (torchrun
agent): fast checks of the signal path. Then with the REAL trainer and sweep (the `test_real_*` tests): the weights
of a 2-node job, of a preempted and requeued one, and a job array sharing one Optuna study.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from mars_dist import config
from slurm_cluster import SlurmCluster
from test_launch import PER_RANK, RECIPE, assert_same_weights, free_port, two_process_run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
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


def test_port_in_use_fails_before_any_node_starts(cluster, tmp_path):
    """MARS_MAIN_PORT taken on the first node: the batch shell stops with exit 2 naming the port, before srun (a
    multi-node launch would otherwise fail on the first node only and leave the others waiting for the rendezvous)."""
    out = tmp_path / "out"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        port = holder.getsockname()[1]
        job, log = _submit(cluster, tmp_path, "multinode.sbatch", f"output_dir={out}", MARS_MAIN_PORT=str(port))
        state = _wait(cluster, job, log, timeout=60)
    text = log.read_text()
    assert state == "FAILED" and cluster.job_info(job).get("ExitCode") == "2:0", text
    assert f"error: MARS_MAIN_PORT={port} is already in use on" in text
    assert not (out / "rank0.json").exists() and "launch:" not in text  # no node started


# ---- the real trainer ------------------------------------------------------------------------------------------

def _submit_real(cluster: SlurmCluster, tmp_path: Path, script: str, recipe: list[str], *args: str,
                 sbatch_args: tuple = (), **env: str) -> tuple[str, Path]:
    """sbatch launch/slurm/SCRIPT RECIPE.yaml ARGS with `mars-dist train` (the scripts' default command)."""
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(config.to_dict(config.load(None, recipe)), sort_keys=False))
    log = tmp_path / "job.log"
    env_extra = {"MARS_ROOT": str(ROOT), "MARS_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                 "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", **env}
    job = cluster.sbatch(SLURM_DIR / script, str(cfg), *args, env_extra=env_extra, chdir=tmp_path,
                         sbatch_args=(f"--output={log}", *sbatch_args))
    return job, log


def _updates_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train/loss"' in line]
    return max(steps, default=0)


def test_real_trainer_two_nodes_match_one_machine(cluster, tmp_path, tmp_path_factory):
    """The shipped multinode.sbatch, --nodes=2, one process per node: bit-identical to 2 processes on one machine."""
    reference = two_process_run(tmp_path_factory)  # before the job: not competing with it for the 2 cores
    out = tmp_path / "out"
    job, log = _submit_real(cluster, tmp_path, "multinode.sbatch", PER_RANK, f"output_dir={out}",
                            sbatch_args=("--nodes=2",))
    state = _wait(cluster, job, log, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert "launch: 2 node(s) x 1 process(es)" in text and "resumed from" not in text
    assert {p.name for p in (out / "checkpoints" / "step_00000012").glob("random_states_*")} == \
        {"random_states_0.pkl", "random_states_1.pkl"}  # two ranks
    assert_same_weights(reference, out, exact=True)


def _wait_until(cluster: SlurmCluster, job: str, log: Path, condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        states = cluster.states(job)
        # COMPLETING: transient, between a preempted step ending and the requeue (seen under load)
        assert states and states[0] in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "COMPLETING"), \
            f"{states}: {log.read_text()}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s ({states}):\n{log.read_text()}"
        time.sleep(0.05)


def _step_running(cluster: SlurmCluster, job: str) -> bool:
    steps = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i", check=False).stdout.split()
    return any(step.startswith(f"{job}.") and step.split(".")[1].isdigit() for step in steps)


def test_real_trainer_preempted_requeued_resumes_exactly(cluster, tmp_path, tmp_path_factory):
    """Two preemptions (scancel --signal=USR1 --batch), each followed by a requeue:
    1. while the trainer is still starting (no signal handler yet: the workers die without a checkpoint): the step
       fails, and is requeued all the same;
    2. mid-run: checkpoint, exit 99, requeue, resume=auto from that checkpoint (not from update 0) on both nodes.
    The final weights are bit-identical to the uninterrupted run's."""
    reference = two_process_run(tmp_path_factory)
    out = tmp_path / "out"
    job, log = _submit_real(cluster, tmp_path, "multinode.sbatch", PER_RANK, f"output_dir={out}")
    _wait_until(cluster, job, log, lambda: _step_running(cluster, job), "srun step started")
    cluster.scancel(job, "--signal=USR1", "--batch")
    _wait_until(cluster, job, log, lambda: cluster.job_info(job).get("Restarts") == "1", "first requeue")
    _wait_until(cluster, job, log, lambda: _updates_done(out) >= 2, "2 updates after the first requeue")
    cluster.scancel(job, "--signal=USR1", "--batch")
    state = _wait(cluster, job, log, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert cluster.job_info(job).get("Restarts") == "2", text
    runs = text.split("SLURM_RESTART_COUNT=")[1:]  # the log of each run, in order (--open-mode=append)
    assert [r.split()[0] for r in runs] == ["unset", "1", "2"], text
    early = re.search(r"step finished with status (\d+) after SIGUSR1", runs[0])
    assert early and int(early.group(1)) not in (0, 99) and "requeueing job" in runs[0], runs[0]
    assert "resumed from" not in runs[1]  # the first run died before any checkpoint: the second starts over
    stopped = _read(out / "preempted.json")["step"]
    assert 2 <= stopped < 12, text  # mid-run
    assert "after SIGUSR1" in runs[1] and "requeueing job" in runs[1]
    assert f"resumed from {out}/checkpoints/step_{stopped:08d} at update {stopped}" in runs[2]
    assert_same_weights(reference, out, exact=True)


def test_real_trainer_preempted_on_two_nodes_requeued_onto_one(cluster, tmp_path):
    """multinode.sbatch on two nodes; the second node is drained and the job preempted mid-run (SIGUSR1):
    checkpoint, requeue; the requeued job, pending for want of a second node, is given one (scontrol update
    NumNodes=1, as an admin or a `--nodes=1-2` request would): it resumes the 2-process checkpoint with one process
    (global batch 16 -> 8, allowed with the constant schedule, said in one line) and completes within the bound."""
    from launch_helpers import assert_bound_holds

    out = tmp_path / "out"
    job, log = _submit_real(cluster, tmp_path, "multinode.sbatch", [*PER_RANK, "train.scheduler=constant"],
                            f"output_dir={out}")
    try:
        _wait_until(cluster, job, log, lambda: _updates_done(out) >= 2, "2 updates on two nodes", timeout=180)
        cluster.run("scontrol", "update", f"nodename={cluster.nodes[1]}", "state=drain", "reason=gone")
        cluster.scancel(job, "--signal=USR1", "--batch")
        _wait_until(cluster, job, log, lambda: cluster.job_info(job).get("Restarts") == "1"
                    and cluster.states(job)[:1] == ["PENDING"], "requeued, pending", timeout=120)
        cluster.run("scontrol", "update", f"jobid={job}", "NumNodes=1", "NumTasks=1")
        state = _wait(cluster, job, log, timeout=300)
    finally:
        cluster.run("scontrol", "update", f"nodename={cluster.nodes[1]}", "state=resume", check=False)
    text = log.read_text()
    assert state == "COMPLETED", text
    runs = text.split("SLURM_RESTART_COUNT=")[1:]
    assert [r.split()[0] for r in runs] == ["unset", "1"], text
    assert "launch: 2 node(s) x 1 process(es)" in runs[0] and "requeueing job" in runs[0], runs[0]
    stopped = _read(out / "preempted.json")["step"]
    assert 2 <= stopped < 12, text
    assert "launch: 1 node(s) x 1 process(es)" in runs[1], runs[1]
    assert f"resumed from {out}/checkpoints/step_{stopped:08d} at update {stopped}" in runs[1]
    assert "resume: layout changed: world size 2 -> 1, micro batch 4, grad accum 2, global batch 16 -> 8" in runs[1]
    assert "resume: global batch 16 -> 8: continuing at the same epoch position" in runs[1]
    assert _updates_done(out) == 12
    assert_bound_holds(out)


def test_real_sweep_array_shares_one_study(cluster, tmp_path):
    """A 2-task job array of `mars-dist sweep --trials 1` (each trial through accelerate launch): both trials end in
    the one Optuna study in the shared output dir, with different parameters, each in its own trial directory."""
    out = tmp_path / "sweep"
    recipe = [*RECIPE, "train.batch_size=8", "train.max_steps=3", "sweep.trials=2", "sweep.study_name=study"]
    job, log = _submit_real(cluster, tmp_path, "sweep_array.sbatch", recipe, f"output_dir={out}",
                            sbatch_args=("--array=0-1",), MARS_PROCS_PER_NODE="1")
    state = _wait(cluster, job, log, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{out.resolve()}/study.db")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 == len(study.trials), [t.state for t in study.trials]
    assert {t.user_attrs["worker"] for t in trials} == {"0", "1"}  # one trial per array task
    assert trials[0].params != trials[1].params
    for t in trials:
        trial_dir = out / t.user_attrs["trial_dir"]
        assert t.value == _read(trial_dir / "summary.json")["val_accuracy"]
        assert (trial_dir / "export" / "model.safetensors").is_file()
    assert "sweep task 0: 1 trial(s)" in text and "sweep task 1: 1 trial(s)" in text


def _worker_pid(rank: int, out: Path) -> int | None:
    """The trainer process of `rank` writing to `out` (a SLURM step's process on one of the loopback nodes)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env) and \
                f"output_dir={out}".encode() in cmdline and b"accelerate" not in cmdline:
            return int(proc.name)
    return None


def test_real_trainer_rank_killed_requeued_resumes_exactly(cluster, tmp_path, tmp_path_factory):
    """SIGKILL of rank 1's trainer (the process on the second node) mid-run: rank 0's next collective fails, it
    writes rank_lost.json and exits 98, both launchers exit, the batch script requeues on the marker; the next run
    resumes from the last complete checkpoint and ends bit-identical to the uninterrupted run."""
    import os
    import signal

    from mars_dist.run import checkpoint as ckpt

    reference = two_process_run(tmp_path_factory)
    out = tmp_path / "out"
    job, log = _submit_real(cluster, tmp_path, "multinode.sbatch", PER_RANK, f"output_dir={out}",
                            "checkpoint.every_steps=2", "checkpoint.keep_last=10", "train.collective_timeout_s=30")
    _wait_until(cluster, job, log, lambda: len(ckpt.list_checkpoints(out)) >= 2, "two checkpoints")
    victim = _worker_pid(1, out)
    assert victim is not None, log.read_text()
    os.kill(victim, signal.SIGKILL)
    state = _wait(cluster, job, log, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", text
    assert cluster.job_info(job).get("Restarts") == "1", text
    runs = text.split("SLURM_RESTART_COUNT=")[1:]
    assert "exiting 98 so that the job is requeued" in runs[0] and "requeueing job" in runs[0], runs[0]
    assert _read(out / "rank_lost.json")["rank"] == 0
    resumed = re.search(r"resumed from \S+/step_(\d+) at update (\d+)", runs[1])
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) >= 2, runs[1]
    assert_same_weights(reference, out, exact=True)
