"""A rank lost mid-run (issue #10 part 4), two CPU processes under `accelerate launch` (launch/accelerate/cpu.yaml):
SIGKILL of one worker, or SIGSTOP (a hung node: its sockets stay open, only the collective timeout notices). The
launch ends within the bound, the survivor leaves OUTPUT_DIR/rank_lost.json (what launch/slurm/common.sh requeues
on), and `resume=auto` continues from the last complete checkpoint to the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mars_dist.run import checkpoint as ckpt
from test_kill_resume import _descendants, kill_tree, start
from test_launch import PER_RANK, accelerate_cmd, assert_same_weights, reference_run, run

pytestmark = [pytest.mark.slow, pytest.mark.dist]

TIMEOUT_S = 10  # train.collective_timeout_s in these runs
SHUTDOWN_S = 30  # torchrun's wait for a worker after its SIGTERM before SIGKILL (accelerate launch: 30 s, seen)


def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    for pid in _descendants(launcher.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher.pid}")


def lose_rank(tmp_path: Path, sig: int) -> tuple[float, list[str]]:
    """Start the 2-process run, lose rank 1 with `sig` after two checkpoints; (seconds to the launch's end, args)."""
    out = tmp_path / "run"
    args = [*PER_RANK, "checkpoint.every_steps=2", "checkpoint.keep_last=10", f"train.collective_timeout_s={TIMEOUT_S}",
            f"output_dir={out}", "resume=auto"]
    log = tmp_path / "lost.log"
    proc = start(accelerate_cmd("cpu.yaml", *args), log)
    deadline = time.monotonic() + 300
    while len(ckpt.list_checkpoints(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    victim = worker_of_rank(proc, 1)
    t0 = time.monotonic()
    os.kill(victim, sig)
    try:
        rc = proc.wait(timeout=TIMEOUT_S + SHUTDOWN_S + 60)
    finally:
        if sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGCONT) if Path(f"/proc/{victim}").exists() else None
        if proc.poll() is None:
            kill_tree(proc)
    took = time.monotonic() - t0
    assert rc != 0, log.read_text()[-3000:]
    assert not (out / "export").exists(), "the run finished before the rank was lost"
    marker = json.loads((out / "rank_lost.json").read_text())
    assert marker["rank"] == 0, marker
    assert "exiting 98 so that the job is requeued" in log.read_text()
    return took, args


def test_sigkilled_rank_ends_the_launch_at_once_and_resumes(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, "ddp", accelerate_cmd("cpu.yaml", *PER_RANK))
    took, args = lose_rank(tmp_path, signal.SIGKILL)
    print(f"launch ended {took:.1f} s after SIGKILL")
    assert took < 20, f"the launch took {took:.1f} s to end after a rank was killed"  # sockets close: ~1-2 s seen
    out = tmp_path / "run"
    last = ckpt.latest_checkpoint(out)
    run(accelerate_cmd("cpu.yaml", *args), tmp_path / "resumed.log")
    assert f"resumed from {last} at update {ckpt.read_state(last)['step']}" in (tmp_path / "resumed.log").read_text()
    assert_same_weights(reference, out, exact=True)


def test_hung_rank_ends_the_launch_within_the_collective_timeout(tmp_path):
    """(The resume after it is the same as after a SIGKILL, tested above.)"""
    took, _ = lose_rank(tmp_path, signal.SIGSTOP)
    print(f"launch ended {took:.1f} s after SIGSTOP")
    # the survivor fails after the timeout, then torchrun waits SHUTDOWN_S for the stopped worker and kills it
    assert TIMEOUT_S - 1 < took < TIMEOUT_S + SHUTDOWN_S + 15, f"the launch took {took:.1f} s to end"
