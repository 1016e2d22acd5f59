"""A frozen copy of the pretrained model that runs forward only (DELTA's source model), placed like the model being
trained: whole per rank where the trained model's parameters are whole per rank too (one process, DDP, ZeRO-1/2),
partitioned under ZeRO-3 — a whole frozen copy per rank would undo what ZeRO-3 is for.

ZeRO-3: a second DeepSpeed engine with no optimizer (DeepSpeed's "ZeRO-Inference": `deepspeed.initialize` without
optimizer at stage 3 builds a `DeepSpeedZeRoOffload`, which partitions the parameters and gathers each module's
just before its forward, releasing them after). Built whole (zero3.yaml) or under zero.Init (zero3_init.yaml) as
the trained model is (`model_placement`). FSDP2 is refused: accelerate runs FSDP on GPUs only, where this has not
been tested; ZeRO-3 is the partitioned alternative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FrozenSource:
    forward: Callable[[torch.Tensor], torch.Tensor]
    """Call with the (already cast) inputs; the engine under ZeRO-3, the module otherwise."""
    module: nn.Module
    """The model itself (hooks go on its submodules)."""
    placement: str
    """'whole' or 'partitioned (ZeRO-3 inference engine)', for the log."""
    local_bytes: int
    """Bytes of the source's parameters held by this rank outside a forward (its partition under ZeRO-3)."""


def _inference_config(plugin, micro_batch: int) -> dict:
    """The run's ZeRO-3 settings without optimizer, offload of optimizer state, or scheduler."""
    ds = plugin.deepspeed_config
    zero = {k: v for k, v in ds.get("zero_optimization", {}).items()
            if k == "stage" or k.startswith("stage3_") and not isinstance(v, str)}
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": zero}
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled") is True:
            config[key] = {"enabled": True}
    return config


def _local_bytes(module: nn.Module) -> int:
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in module.parameters())


def build_frozen_source(accelerator, build: Callable, micro_batch: int, what: str = "DELTA") -> FrozenSource:
    """`build(placement)` -> the pretrained model; frozen (no grad, eval mode: BatchNorm uses its running statistics,
    as the reference's `model_source.eval()`), and placed for this launch."""
    from accelerate.utils import DistributedType

    from mars_dist.sharding.accelerate_setup import adapt_to_precision, input_dtype, model_placement

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(f"{what}: its frozen pretrained model is not supported under FSDP2; launch with "
                         f"launch/accelerate/zero3.yaml (or zero3_init.yaml), where it is partitioned like the model "
                         f"being trained, or with DDP / ZeRO-1/2")
    model = build(model_placement(accelerator))
    model.requires_grad_(False)
    model.eval()
    adapt_to_precision(accelerator, model)  # BatchNorm in fp32 under DeepSpeed bf16/fp16, as the trained model
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        engine = deepspeed.initialize(model=model, config=_inference_config(plugin, micro_batch))[0]
        engine.eval()
        return FrozenSource(engine, engine.module, "partitioned (ZeRO-3 inference engine)", _local_bytes(model))
    model.to(accelerator.device)
    dtype = input_dtype(accelerator)  # DeepSpeed bf16/fp16: parameters in that dtype (buffers stay fp32), as its engine
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return FrozenSource(model, model, "whole", _local_bytes(model))
