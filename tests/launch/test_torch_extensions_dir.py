"""DeepSpeed's CPU op is built once per virtual env (issue #10 part 6): importing mars_dist points
TORCH_EXTENSIONS_DIR into the env unless it is set already; torch's extension builder then builds there."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import mars_dist, os, sys; from torch.utils.cpp_extension import _get_build_directory; "
         "print(os.environ['TORCH_EXTENSIONS_DIR']); print(_get_build_directory('deepspeed_shm_comm', False))")


def probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    return subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not in a virtual env")
def test_default_is_inside_the_env(tmp_path):
    env_dir, build = probe()
    assert env_dir == os.path.join(sys.prefix, "torch_extensions")
    assert build.startswith(env_dir + os.sep) and build.endswith("deepspeed_shm_comm")


def test_a_set_value_is_kept(tmp_path):
    env_dir, build = probe(TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert env_dir == str(tmp_path) and build.startswith(str(tmp_path))
