"""Creating the Accelerator, with the launcher settings that decide whether the projection is right."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs


def make_accelerator(grad_accum: int, mixed_precision: str, grad_clip: float | None,
                     collective_timeout_s: float | None = None, micro_batch: int | None = None) -> Accelerator:
    """An Accelerator for this machine and launcher.

    On CPU the process-group backend must be given (gloo), and `cpu=True` too — without it accelerate under
    torchrun reports DistributedType.NO and every process trains alone with no gradient sync — except under
    DeepSpeed, which `cpu=True` would switch off. `collective_timeout_s` bounds every collective's wait for the
    other ranks (torch's default is 10-30 min), so a run with a lost rank fails within it.
    """
    on_cpu = not torch.cuda.is_available()
    refuse_fsdp_on_cpu(on_cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a gloo group only makes sense with a launcher
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
        kwargs_handlers=[process_group_kwargs(on_cpu, collective_timeout_s)] if launched else [],
        cpu=on_cpu and not deepspeed,
        step_scheduler_with_optimizer=False,  # the trainer steps the LR schedule once per real update
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    configure_deepspeed(accelerator, grad_clip, micro_batch)
    return accelerator


def refuse_fsdp_on_cpu(on_cpu: bool) -> None:
    """accelerate runs FSDP on GPUs only: on a machine without CUDA an FSDP launch config silently becomes plain
    data parallelism (with `cpu=True`) or no distribution at all, so a user asking for sharded parameters would get
    whole ones. Stop instead, naming what runs here."""
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("the launch config asks for FSDP (ACCELERATE_USE_FSDP=true), which accelerate runs on GPUs "
                         "only: on this machine (no CUDA) it would silently run unsharded. Launch with "
                         "launch/accelerate/zero3.yaml (parameters partitioned) or cpu.yaml (DDP), or shard the model "
                         "with torch fully_shard yourself and attach the projection with mars_dist.api")


def process_group_kwargs(on_cpu: bool, timeout_s: float | None) -> InitProcessGroupKwargs:
    kwargs = {"backend": "gloo"} if on_cpu else {}
    if timeout_s:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    return InitProcessGroupKwargs(**kwargs)


def configure_deepspeed(accelerator: Accelerator, grad_clip: float | None, micro_batch: int | None = None) -> None:
    """Make DeepSpeed's "auto" values match the single-process semantics of the config.

    accelerate fills an "auto" gradient_clipping with 1.0, which would clip under ZeRO but not without it and break
    the equivalence between backends; set it from train.grad_clip (0 = off) instead. An "auto" micro-batch is
    taken from the trainer's batch size: accelerate would read it from the loaders, whose batches come from a batch
    sampler (mars_dist/data/loader.py) and so have no `batch_size` attribute.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(grad_clip or 0.0)
    if micro_batch and ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = int(micro_batch)
    ds.setdefault("zero_allow_untested_optimizer", True)  # we pass a plain torch optimizer (hooks live there)
    if (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none":
        # ZeRO-Offload: without this accelerate swaps our optimizer for DeepSpeedCPUAdam (sharding/zero.py)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)


def model_placement(accelerator, whole: bool = False):
    """Where `build_model` creates the parameters for this launch (mars_dist.models.placement): partitioned by zero.Init
    under ZeRO-3 with `zero3_init_flag: true`, whole otherwise (and always when `whole`, e.g. the one-rank export)."""
    from mars_dist.models.placement import WHOLE

    if getattr(accelerator.state, "deepspeed_plugin", None) is None:
        return WHOLE
    from mars_dist.sharding.zero_init import model_placement as zero_placement

    return zero_placement(accelerator, whole)


def adapt_to_precision(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Under DeepSpeed bf16/fp16 (low-precision parameters, fp32 buffers) BatchNorm computes in fp32
    (sharding/precision.py). Elsewhere accelerate's autocast keeps fp32 parameters: nothing to do."""
    if input_dtype(accelerator) is not None:
        from mars_dist.sharding.precision import batchnorm_in_fp32

        batchnorm_in_fp32(model)


def full_state_dict(accelerator: Accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's state dict for the export (a collective: call on every rank). Under DeepSpeed the
    parameters are the fp32 masters, also in bf16/fp16 runs: the weights the bound holds on exactly."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        from mars_dist.sharding.precision import deepspeed_fp32_state_dict

        return deepspeed_fp32_state_dict(model)
    return {k: v.float() for k, v in accelerator.get_state_dict(model).items()}


def input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype inputs must be cast to: DeepSpeed's bf16/fp16 modes hold low-precision module weights and do not
    autocast, so fp32 images would not match them. None where accelerate autocasts (or fp32)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
