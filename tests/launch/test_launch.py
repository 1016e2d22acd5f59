"""Launching the real trainer: two `accelerate launch` "machines" on loopback reach the weights of the
single-machine runs, and bad input at launch ends with a clear error naming what is wrong.

Also the helpers the other launch tests share (tests/run/test_kill_resume.py, tests/launch/test_slurm.py): the tiny recipe,
the launch commands and the reference runs, which are computed once per pytest session and reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mars_dist.cli import main

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
CLI = [sys.executable, "-m", "mars_dist", "train"]

# The tiny recipe of tests/run/test_train_ddp.py, 12 updates: 40 train images, 2 processes x micro-batch 4 x grad_accum 2
# = 16 images per update. SGD + BN in eval mode: one process with micro-batch 8 then matches to rounding. lr 0.01, not
# test_train_ddp's 0.05: over 12 updates 0.05 amplifies the 1e-7 rounding differences between one and two processes
# to 1e-2 (measured; 1e-7 at 9 updates), 0.01 keeps them at 1e-7.
RECIPE = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
          "train.max_steps=12", "train.bn_mode=eval", "train.optimizer=sgd", "train.lr=0.01", "train.grad_accum=2",
          "constraint.radius=0.05", "constraint.head_radius=1.0", "tracking.wandb_mode=disabled"]
SINGLE = [*RECIPE, "train.batch_size=8"]  # one process
PER_RANK = [*RECIPE, "train.batch_size=4"]  # each of two processes


def run_env(**extra: str) -> dict:
    """One thread per process (the same in every run compared bit for bit); DeepSpeed on its CPU accelerator."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", **extra}


def free_port() -> int:
    from launch_helpers import free_port as port  # one port policy for every launch (see there)

    return port()


def accelerate_cmd(config: str, *trainer_args: str, processes: int = 2, port: int | None = None) -> list[str]:
    """`accelerate launch --config_file launch/accelerate/CONFIG -m mars_dist train ARGS` on this machine."""
    return [*ACCELERATE, "--config_file", str(ROOT / "launch" / "accelerate" / config), "--num_processes",
            str(processes), "--main_process_port", str(port or free_port()), "-m", "mars_dist", "train", *trainer_args]


def run(cmd: list[str], log: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root, output to `log`; fail with the log's tail when it exits non-zero."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(**env), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
    return proc


def weights(out: Path) -> dict:
    return load_file(str(out / "export" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, exact: bool = True) -> None:
    """The exported weights of two runs: bit-identical, or (exact=False) equal to fp32 rounding."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), f"{k}: max diff {float((wa[k] - wb[k]).abs().max())} ({a} vs {b})"
        else:
            # one vs two processes differ by gradient rounding (~1e-7); a row sitting at its radius can then be
            # clipped in one run and not in the other (the projection is discontinuous there), and momentum carries
            # that: measured 1.7e-5 after 12 updates with float32 row sums (6e-7 with float64 sums, by luck of which
            # rows sat on the boundary)
            torch.testing.assert_close(wb[k], wa[k], atol=5e-5, rtol=1e-5, msg=k)


def reference_run(tmp_path_factory, name: str, cmd: list[str], **env: str) -> Path:
    """Run `cmd` + output_dir=... once per pytest session (several test modules compare against the same runs).
    Under pytest-xdist the workers share it: it lives in their common base temp dir, made under a file lock."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # popen-gwN's parent: the session's
    out = root / f"reference-{name}"
    with open(root / f"reference-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker making it: wait for it
        if not (out / "export" / "model.safetensors").is_file():
            out.mkdir(parents=True, exist_ok=True)
            run([*cmd, f"output_dir={out}"], out.parent / f"reference-{name}.log", **env)
    return out


def single_process_run(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory, "single", [*CLI, *SINGLE])


def two_process_run(tmp_path_factory) -> Path:
    """2 processes on one machine, DDP over gloo (launch/accelerate/cpu.yaml)."""
    return reference_run(tmp_path_factory, "ddp", accelerate_cmd("cpu.yaml", *PER_RANK))


# ---- multi-node on one machine ----------------------------------------------------------------------------------

@pytest.mark.dist
@pytest.mark.slow
def test_two_machines_on_loopback_match_single_machine(tmp_path, tmp_path_factory):
    """Two `accelerate launch` invocations, one per "machine" (machine rank 0 and 1, one process each, rendezvous on
    127.0.0.1), exactly as launch/slurm/multinode.sbatch starts them on two nodes: bit-identical to 2 processes on one
    machine (same gloo all-reduce of two ranks), and equal to one process with twice the micro-batch."""
    out, port = tmp_path / "two_machines", free_port()
    procs = []
    for rank in (0, 1):
        cmd = [*ACCELERATE, "--config_file", str(ROOT / "launch/accelerate/cpu.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "-m", "mars_dist", "train", *PER_RANK, f"output_dir={out}"]
        log = open(tmp_path / f"machine{rank}.log", "w")
        # what cpu.yaml says a node without GPUs needs (launch/slurm/common.sh sets it there)
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"), stdout=log,
                                       stderr=subprocess.STDOUT), log))
    for rank, (proc, log) in enumerate(procs):
        code = proc.wait(timeout=300)
        log.close()
        assert code == 0, (tmp_path / f"machine{rank}.log").read_text()[-4000:]
    assert "resumed" not in (tmp_path / "machine0.log").read_text()
    assert_same_weights(two_process_run(tmp_path_factory), out, exact=True)
    assert_same_weights(single_process_run(tmp_path_factory), out, exact=False)
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert any(layer["frac_at_bound"] > 0 for layer in layers)  # the projection was active


# ---- bad input at launch: one line naming the problem, exit code 2 ------------------------------------------------

def cli(capsys, *args: str) -> tuple[int, str]:
    """`mars-dist train ARGS` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    return exit_info.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mars-dist train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "corrupt_state", "corrupt_latest"])
def test_bad_resume_path_is_named(capsys, tmp_path, case):
    out = tmp_path / "out"
    ckpt = tmp_path / "ckpt"
    if case == "not_a_checkpoint":
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"")
        resume, expected = str(ckpt), f"not a complete checkpoint (no trainer_state.json): {ckpt}"
    elif case == "corrupt_state":
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text('{"step": 3, "epo')
        resume, expected = str(ckpt), f"unreadable checkpoint state {ckpt / 'trainer_state.json'}"
    elif case == "corrupt_latest":  # resume=PATH names a damaged checkpoint (resume=auto would skip it)
        latest = out / "checkpoints" / "step_00000004"
        latest.mkdir(parents=True)
        (latest / "trainer_state.json").write_text("not json")
        resume, expected = str(latest), f"unreadable checkpoint state {latest / 'trainer_state.json'}"
    else:
        resume, expected = str(tmp_path / "nope"), f"checkpoint directory not found: {tmp_path / 'nope'}"
    code, err = cli(capsys, *SINGLE, f"output_dir={out}", f"resume={resume}")
    assert code == 2
    assert expected in one_error_line(err)


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(capsys, tmp_path, tmp_path_factory):
    ckpt = single_process_run(tmp_path_factory) / "checkpoints" / "step_00000012"
    before = sorted(p.name for p in ckpt.iterdir())
    code, err = cli(capsys, *SINGLE, "model.name=resnet18", "model.pretrained=none", f"output_dir={tmp_path}",
                    f"resume={ckpt}")
    assert code == 2
    line = one_error_line(err)
    # the config check (mars_dist/run/resume_guard.py) names the changed keys before the model identity is compared
    assert f"checkpoint {ckpt} was made with another config: model.name" in line
    assert "'tf_efficientnet_lite0'" in line and "'resnet18'" in line and "refusing to resume" in line
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing touched


@pytest.mark.slow
def test_batch_larger_than_train_split_one_process(capsys, tmp_path):
    code, err = cli(capsys, *RECIPE, "train.batch_size=16", "train.grad_accum=4", f"output_dir={tmp_path}")
    assert code == 2
    assert ("train split has 40 images: fewer than one update of batch_size 16 x grad_accum 4 x 1 processes; "
            "lower train.batch_size or raise data.train_per_class") in one_error_line(err)


@pytest.mark.dist
@pytest.mark.slow
def test_batch_inconsistent_with_world_size(tmp_path):
    """8 x 3 = 24 images per update fit the 40-image split with one process, not with two: every rank stops with the
    one line naming the sizes and the world size (exit 2); accelerate's launcher then exits 1."""
    cmd = accelerate_cmd("cpu.yaml", *RECIPE, "train.batch_size=8", "train.grad_accum=3", f"output_dir={tmp_path}")
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = ("mars-dist train: ValueError: train split has 40 images: fewer than one update of batch_size 8 x "
            "grad_accum 3 x 2 processes")
    assert proc.stderr.count(line) == 2, proc.stderr[-4000:]  # once per rank
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of the workers' exit code


@pytest.mark.dist
@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
def test_main_process_port_in_use(tmp_path, listening):
    """A plain multi-node `accelerate launch` on a port someone holds fails within seconds on machine rank 0 (before
    the trainer starts), naming the port: accelerate's own check finds a listening socket; a socket that is only
    bound is found by torch's TCPStore (EADDRINUSE). The other machines would wait for the rendezvous (minutes):
    launch/slurm/common.sh checks the port before starting any node (tests/launch/test_slurm.py)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        if listening:
            holder.listen()
        cmd = [*ACCELERATE, "--config_file", str(ROOT / "launch/accelerate/cpu.yaml"), "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port",
               str(port), "-m", "mars_dist", "train", *PER_RANK, f"output_dir={tmp_path}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    if listening:
        assert last.startswith(f"ConnectionError: Tried to launch distributed communication on port `{port}`, but "
                               "another process is utilizing it"), proc.stderr[-3000:]
    else:
        assert "DistNetworkError" in last and f"port: {port}" in last and "EADDRINUSE" in last, proc.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()  # no trainer process got that far
