"""ZeRO-Offload configuration, no processes: the trainer keeps its own torch optimizer under offload, the shipped
zero3_offload config offloads to the CPU, and what the projection cannot follow is refused with what to change.
(The 2-process runs are tests/distributed/test_zero_offload.py.)"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

from mars_dist.sharding.accelerate_setup import configure_deepspeed
from mars_dist.sharding.zero import check_offload

ROOT = Path(__file__).resolve().parents[2]


def accelerator_with(ds: dict):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))


def engine_with(**offload):
    cfg = DeepSpeedZeroOffloadOptimizerConfig(**offload) if offload else None
    return SimpleNamespace(zero_offload_optimizer=lambda: cfg)


def adamw():
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])


def test_trainer_keeps_its_optimizer_under_offload():
    """Without zero_force_ds_cpu_optimizer: false accelerate swaps a torch optimizer for DeepSpeedCPUAdam (SGD
    too, keeping only lr and weight_decay): the cause of the 0.11 difference measured before."""
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    configure_deepspeed(accelerator_with(ds), grad_clip=None)
    assert ds["zero_force_ds_cpu_optimizer"] is False
    plain = {"zero_optimization": {"stage": 2}}
    configure_deepspeed(accelerator_with(plain), grad_clip=None)
    assert "zero_force_ds_cpu_optimizer" not in plain
    explicit = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                "zero_force_ds_cpu_optimizer": True}
    configure_deepspeed(accelerator_with(explicit), grad_clip=None)
    assert explicit["zero_force_ds_cpu_optimizer"] is True  # the user's choice stays; the backend refuses it


def test_shipped_zero3_offload_config():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "launch/accelerate/zero3_offload.yaml"))
    ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True


def test_offload_detected_and_allowed_with_a_torch_optimizer():
    assert check_offload(engine_with(), adamw()) is False
    assert check_offload(engine_with(device="none"), adamw()) is False
    assert check_offload(engine_with(device="cpu", pin_memory=True), adamw()) is True


@pytest.mark.parametrize("offload,match", [
    (dict(device="nvme", nvme_path="/tmp"), "device='nvme' is not supported"),
    (dict(device="cpu", super_offload=True), "super_offload is not supported"),
])
def test_refused_offload_modes(offload, match):
    with pytest.raises(NotImplementedError, match=match):
        check_offload(engine_with(**offload), adamw())


def test_refuses_a_swapped_in_deepspeed_optimizer():
    """The class check only (building DeepSpeedCPUAdam JIT-compiles its C++ op, minutes on 2 cores)."""
    swapped = DeepSpeedCPUAdam.__new__(DeepSpeedCPUAdam)
    with pytest.raises(NotImplementedError, match="stepped DeepSpeedCPUAdam, not the configured torch optimizer"):
        check_offload(engine_with(device="cpu"), swapped)
