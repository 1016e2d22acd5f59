"""Launch helpers for the 2-process tests: each worker launch runs several cases and writes one JSON + one .pt per
case; a launch is started once per session (lazily, by the first test that needs it) and shared by its tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_common as common  # noqa: E402


def _command(key, out: Path) -> list[str]:
    cases, resume = common.LAUNCHES[key]
    args = [str(out), *(["--resume", resume] if resume else []), *cases]
    if key == "fsdp2":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(common.free_port()), "tests/distributed/fsdp2_worker.py", *args]
    config = common.LAUNCH_CONFIGS.get(key, f"zero{key}")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{config}.yaml",
            "--num_processes", "2", "--main_process_port", str(common.free_port()), "tests/distributed/zero_worker.py", *args]


class Launch:
    """The results of one worker launch: per case, the per-rank JSON records and the final fp32 masters."""

    def __init__(self, key, out: Path):
        self.key, self.out = key, out
        proc = subprocess.run(_command(key, out), cwd=common.ROOT, env=common.worker_env(), capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise AssertionError(f"worker launch {key} failed (exit {proc.returncode}):\n{tail}")

    def ranks(self, case: str) -> list[dict]:
        return json.loads((self.out / f"{case}.json").read_text())

    def weights(self, case: str, suffix: str = "") -> dict:
        return torch.load(self.out / f"{case}{suffix}.pt")


@pytest.fixture(scope="session")
def launches(tmp_path_factory):
    cache: dict = {}

    def get(key) -> Launch:
        if key not in cache:
            cache[key] = Launch(key, tmp_path_factory.mktemp(f"launch_{key}"))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference():
    cache: dict = {}

    def get(case: str) -> dict:
        if case not in cache:
            cache[case] = common.reference_run(case)
        return cache[case]

    return get
