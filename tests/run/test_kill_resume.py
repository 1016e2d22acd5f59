"""A run killed with SIGKILL at an arbitrary point and resumed with resume=auto ends with bit-identical weights to an
uninterrupted run (one process; ZeRO-3 with two processes); a kill while a checkpoint is being written leaves the
previous one loadable; a preempted sweep trial exits 99 and resumes from its own checkpoint.

Every run is a real `mars-dist train` / `accelerate launch` process tree, killed the way a node failure kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from safetensors.torch import load_file

from mars_dist.run import checkpoint as ckpt
from test_launch import (CLI, RECIPE, ROOT, accelerate_cmd, assert_same_weights, free_port, reference_run, run,
                         run_env)

pytestmark = pytest.mark.slow

# AdamW and BN in train mode: the state a resume must restore includes Adam moments and BN running statistics.
KILL_RECIPE = [*RECIPE, "train.optimizer=adamw", "train.lr=3e-3", "train.bn_mode=train"]


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start `cmd` in its own session (so it can be killed as a whole, like a node going away)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` and of every descendant (torchrun starts each worker in a session of its
    own, so killing the launcher's group alone would leave the workers running)."""
    groups = {os.getpgid(proc.pid)}
    for pid in _descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{g}").exists() for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_when(proc: subprocess.Popen, condition, log: Path, timeout: float = 300, poll: float = 0.002) -> None:
    """SIGKILL the run the moment `condition()` holds; fail if the run ended (or never got there) first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"condition never met:\n{log.read_text()[-3000:]}"
        time.sleep(poll)
    kill_tree(proc)


def resume_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "resumed from" in line]
    assert len(lines) == 1, log.read_text()[-3000:]
    return lines[0]


def _kill_after_two_checkpoints_and_resume(tmp_path: Path, command, reference: Path) -> None:
    out = tmp_path / "run"
    args = ["checkpoint.every_steps=2", "checkpoint.keep_last=10", f"output_dir={out}", "resume=auto"]
    proc = start(command(*args), tmp_path / "killed.log")
    kill_when(proc, lambda: len(ckpt.list_checkpoints(out)) >= 2, tmp_path / "killed.log")
    assert not (out / "export").exists(), "the run finished before the kill"
    last = ckpt.latest_checkpoint(out)  # the resume starts here (a later, half-written one does not count)
    step = ckpt.read_state(last)["step"]
    assert 2 <= step < 12
    run(command(*args), tmp_path / "resumed.log")
    assert f"resumed from {last} at update {step}" in resume_line(tmp_path / "resumed.log")
    assert_same_weights(reference, out, exact=True)
    assert not list((out / "checkpoints").glob(".tmp_step_*"))


def test_sigkill_one_process_resumes_bit_identical(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, "kill-single", [*CLI, *KILL_RECIPE, "train.batch_size=8"])
    _kill_after_two_checkpoints_and_resume(tmp_path, lambda *a: [*CLI, *KILL_RECIPE, "train.batch_size=8", *a],
                                           reference)


@pytest.mark.dist
def test_sigkill_zero3_two_processes_resumes_bit_identical(tmp_path, tmp_path_factory):
    """ZeRO-3: every rank's partition of the fp32 masters and Adam moments comes back from the per-rank files."""
    recipe = [*KILL_RECIPE, "train.batch_size=4", "train.max_steps=8"]
    reference = reference_run(tmp_path_factory, "kill-zero3", accelerate_cmd("zero3.yaml", *recipe))
    _kill_after_two_checkpoints_and_resume(tmp_path, lambda *a: accelerate_cmd("zero3.yaml", *recipe, *a), reference)


def test_sigkill_while_writing_a_checkpoint(tmp_path, tmp_path_factory):
    """Kill -9 while checkpoints/.tmp_step_N is being written: step N-1 stays the latest complete checkpoint, loads,
    and the resume from it ends bit-identical. (If the rename wins the race against the kill, the run is resumed and
    killed again at a later checkpoint.)"""
    reference = reference_run(tmp_path_factory, "kill-single", [*CLI, *KILL_RECIPE, "train.batch_size=8"])
    out = tmp_path / "run"
    root = ckpt.checkpoint_root(out)
    cmd = [*CLI, *KILL_RECIPE, "train.batch_size=8", "checkpoint.every_steps=1", f"output_dir={out}", "resume=auto"]

    def writing() -> bool:  # a checkpoint being written while a complete one exists
        return root.is_dir() and any(p.name.startswith(".tmp_step_") for p in os.scandir(root)) and \
            ckpt.latest_checkpoint(out) is not None

    for attempt in range(4):
        log = tmp_path / f"attempt{attempt}.log"
        kill_when(start(cmd, log), writing, log)
        partial = sorted(root.glob(".tmp_step_*"))
        if partial:
            break
    assert partial, "the kill never landed while a checkpoint was being written"
    n = int(partial[-1].name.rsplit("_", 1)[1])
    previous = ckpt.latest_checkpoint(out)
    assert ckpt.read_state(previous)["step"] == n - 1
    assert load_file(str(previous / "model.safetensors"))  # the previous checkpoint is whole
    run(cmd, tmp_path / "resumed.log")
    assert f"resumed from {previous} at update {n - 1}" in resume_line(tmp_path / "resumed.log")
    assert_same_weights(reference, out, exact=True)
    assert not list(root.glob(".tmp_step_*"))


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to `proc` and every descendant: what `scancel --signal=USR1 JOBID` does to a SLURM job step."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_preempted_sweep_trial_exits_99_and_resumes(tmp_path):
    """A sweep whose trial runs under `accelerate launch` (as in launch/slurm/sweep_array.sbatch) gets SIGUSR1 in
    every process, as from SLURM: the trial checkpoints (the launcher then exits 1, the trial's preempted.json tells
    it apart from a failure), the sweep records the trial as preempted and exits 99 (the array script requeues on
    that); the next run resumes the same trial in its own directory with its own parameters."""
    out = tmp_path / "sweep"
    launcher = f"{sys.executable} -m accelerate.commands.launch --config_file {ROOT}/launch/accelerate/cpu.yaml " \
               f"--num_machines 1 --num_processes 1 --main_process_port {free_port()}"
    cmd = [*CLI[:-1], "sweep", *KILL_RECIPE, "train.batch_size=8", "checkpoint.every_steps=1", "sweep.trials=1",
           f"output_dir={out}", "--trials", "1", "--launcher", launcher]
    env = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}  # as launch/slurm/common.sh sets it
    proc = start(cmd, tmp_path / "first.log", **env)
    trial_dir = out / "trial_0000"
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(trial_dir):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    signal_tree(proc, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 99, (tmp_path / "first.log").read_text()[-3000:]
    stopped = json.loads((trial_dir / "preempted.json").read_text())["step"]
    assert 1 <= stopped < 12
    storage = f"sqlite:///{out.resolve()}/study.db"
    (first,) = optuna.load_study(study_name="sweep", storage=storage).trials
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["preempted"]

    run(cmd, tmp_path / "second.log", **env)
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    again = trials[1]
    assert again.params == first.params and again.user_attrs["trial_dir"] == "trial_0000"
    assert f"at update {stopped}" in resume_line(trial_dir / "trial.log")
    assert again.value == json.loads((trial_dir / "summary.json").read_text())["val_accuracy"]
    assert json.loads((out / "sweep_best.json").read_text())["best_trial"] == 1
