"""The two examples end to end, as a user runs them: one process (`python examples/...`) and DeepSpeed ZeRO-3 on 2 CPU
processes (`accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes 2 ...`), fp32 and bf16, and
the Hugging Face Trainer's own DDP (cpu.yaml).
Every output is checked against the bound by tests/independent_bound.py (pretrained weights from the bundled file,
float64, none of mars_dist's constraint code). The fp32 accelerate loop on 2 processes is compared with the one-process
run element by element: same global batch of the same images, BatchNorm frozen (so the split does not matter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from independent_bound import assert_within_bound

ROOT = Path(__file__).resolve().parents[2]
RADIUS, HEAD_RADIUS, STEPS = 0.05, 1.0, 3
SAME_RUN_ATOL = 3e-5
SAME_RUN_LR = 1e-4
"""One process vs ZeRO-3 on two, fp32: the gradients are the same sums in another order (ulp-level), and AdamW
normalises each element's step, so an element whose gradient is near zero can move by up to ~lr more in one run
than in the other: the difference scales with lr, not with the projection. Measured at lr 1e-3 (radius 0.05):
6.1e-6 on an AVX-512 machine, 5.6e-5 on an AVX2 one. So this comparison runs at lr 1e-4 and checks that the
projection was active (rows clipped in both runs). The radius stays: the independent check's rounding allowance is
relative to it, and the fp32 rounding of W is not (a smaller radius would test the checker, not the projection)."""

pytestmark = pytest.mark.slow


def run_example(script: str, out: Path, processes: int = 1, extra: tuple[str, ...] = (), config: str = "zero3") -> Path:
    """One process, or `processes` under launch/accelerate/{config}.yaml (cpu: DDP over gloo, told CPU by
    ACCELERATE_USE_CPU as on nodes without GPUs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONPATH=str(ROOT),
               **({"ACCELERATE_USE_CPU": "true"} if config == "cpu" else {}))
    args = [f"examples/{script}", "--radius", str(RADIUS), "--head-radius", str(HEAD_RADIUS), "--max-steps",
            str(STEPS), "--output", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        from launch_helpers import free_port

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/accelerate/{config}.yaml",
               "--num_processes", str(processes), "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    backend = "zero" if processes > 1 and config.startswith("zero") else "replicated"  # zero: DeepSpeed's masters
    assert f"projected on the {backend} backend's fp32 weights, {processes} processes" in proc.stdout, \
        proc.stdout[-3000:]
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict = {}

    def get(name: str, script: str, processes: int, *extra: str, config: str = "zero3") -> Path:
        if name not in cache:
            cache[name] = run_example(script, tmp_path_factory.mktemp(name), processes, extra, config)
        return cache[name]

    return get


@pytest.mark.dist
def test_accelerate_loop_zero3_equals_one_process_and_holds_the_bound(runs):
    small = ("--bn-eval", "--lr", str(SAME_RUN_LR), "--ema", "0.5")
    one = runs("acc_one", "accelerate_loop.py", 1, *small)
    zero3 = runs("acc_zero3", "accelerate_loop.py", 2, *small)
    for path in (one, zero3, *(p.with_name("model_ema.safetensors") for p in (one, zero3))):
        assert_within_bound(path, RADIUS, HEAD_RADIUS)
    for run in (one, zero3):  # the projection clipped rows: the comparison covers it
        logged = [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()]
        assert max(r["constraint/rows_clipped"] for r in logged) > 0, logged
    a, b = load_file(str(one)), load_file(str(zero3))
    assert a.keys() == b.keys() and "conv_stem.weight" in a and "classifier.weight" in a  # timm's own names
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= SAME_RUN_ATOL, f"one process vs ZeRO-3 x2: max |difference| {worst:.3g}"
    print(f"one process vs ZeRO-3 x2: max |difference| {worst:.3g}")
    # the API's EMA (constrained.ema): ZeRO-3's, kept on each rank's fragments, equals one process's
    ea, eb = (load_file(str(p.with_name("model_ema.safetensors"))) for p in (one, zero3))
    assert ea.keys() == a.keys() and not torch.equal(ea["conv_stem.weight"], a["conv_stem.weight"])
    worst = max(float((ea[k].double() - eb[k].double()).abs().max()) for k in ea)
    assert worst <= SAME_RUN_ATOL, f"EMA, one process vs ZeRO-3 x2: max |difference| {worst:.3g}"


@pytest.mark.dist
def test_accelerate_loop_zero3_bf16_holds_the_bound_on_the_fp32_weights(runs):
    path = runs("acc_zero3_bf16", "accelerate_loop.py", 2, "--bf16", "--ema", "0.5")
    weights = load_file(str(path))
    assert all(v.dtype == torch.float32 for k, v in weights.items() if k.endswith(".weight"))
    assert_within_bound(path, RADIUS, HEAD_RADIUS)
    assert_within_bound(path.with_name("model_ema.safetensors"), RADIUS, HEAD_RADIUS)  # the EMA of in-ball weights


@pytest.mark.dist
def test_hf_trainer_zero3_bf16_holds_the_bound_and_logs_through_the_trainer(runs):
    path = runs("hf_zero3_bf16", "hf_trainer.py", 2, "--bf16")
    ratios = assert_within_bound(path, RADIUS, HEAD_RADIUS)
    assert sum(r > 0.999 for r in ratios.values()) > 10  # the projection was active
    logs = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logs if "loss" in entry]
    assert len(steps) == STEPS and all("mars/bound/C" in entry for entry in steps)
    assert steps[-1]["mars/layers/model.conv_stem.weight/radius"] == RADIUS


def test_hf_trainer_one_process_holds_the_bound(runs):
    assert_within_bound(runs("hf_one", "hf_trainer.py", 1), RADIUS, HEAD_RADIUS)


@pytest.mark.dist
def test_hf_trainer_ddp_holds_the_bound(runs):
    """The Trainer's own DDP (2 CPU processes over gloo): the replicated backend on every rank's whole weights."""
    assert_within_bound(runs("hf_ddp", "hf_trainer.py", 2, config="cpu"), RADIUS, HEAD_RADIUS)
