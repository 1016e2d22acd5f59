"""Building a model under DeepSpeed ZeRO-3: whole, or partitioned at creation by `deepspeed.zero.Init`.

Which one is decided by the accelerate config's `zero3_init_flag` (launch/accelerate/zero3.yaml: false, the model is
built whole in every process and partitioned when the engine is created; zero3_init.yaml: true, for models that do
not fit whole). Two traps this module exists for:
- accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and transformers then
  builds every model under zero.Init when that config is ZeRO-3: a "whole" build must unregister it while it runs.
- zero.Init creates every floating tensor in the training dtype, BatchNorm running statistics included; the whole
  path keeps them fp32 (DeepSpeed casts parameters only), so they are put back to fp32 before anything is loaded.
Pretrained weights go into the partitions one module at a time (`GatheredParameters`, modifier rank 0): at most one
module is ever whole, and only while the model is built — never after the optimizer exists (docs/distributed-notes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mars_dist.placement import Whole


def _transformers_deepspeed():
    from transformers.integrations import deepspeed as hf_ds

    return hf_ds


def _batchnorm_buffers_fp32(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name, None)
                if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                    buf.data = buf.data.float()


class WholeUnderZero3(Whole):
    """Whole parameters although a ZeRO-3 config is active (transformers is told nothing while the model is built)."""

    def __init__(self, plugin):
        self.plugin = plugin

    @contextlib.contextmanager
    def transformers(self) -> Iterator[None]:
        hf_ds = _transformers_deepspeed()
        hf_ds.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.plugin.set_deepspeed_weakref()  # accelerate's registration, as it was


class ZeroInit(Whole):
    """Parameters created partitioned by deepspeed.zero.Init; weights loaded into the partitions."""

    partitioned = True

    def __init__(self, plugin):
        self.plugin = plugin
        if getattr(plugin, "dschf", None) is None:
            plugin.set_deepspeed_weakref()
        # accelerate's copy of the DeepSpeed config with the "auto" batch values resolved (zero.Init reads dtype,
        # stage-3 and offload settings from it)
        self.config = plugin.dschf.config

    def modules(self) -> contextlib.AbstractContextManager:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=self.config)

    @contextlib.contextmanager
    def transformers(self) -> Iterator[None]:
        hf_ds = _transformers_deepspeed()
        if not hf_ds.is_deepspeed_zero3_enabled():
            self.plugin.set_deepspeed_weakref()
        yield  # transformers' from_config / from_pretrained enter zero.Init and load into partitions themselves

    @contextlib.contextmanager
    def edit(self, params: list[nn.Parameter]) -> Iterator[bool]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield dist.get_rank() == 0

    def shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        keys = list(model.state_dict().keys())
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in set(keys)]
        _batchnorm_buffers_fp32(model)
        with torch.no_grad():
            for module_name, module in model.named_modules():
                prefix = f"{module_name}." if module_name else ""
                own = {prefix + n: p for n, p in module.named_parameters(recurse=False) if prefix + n in state}
                if own:
                    with self.edit(list(own.values())) as writer:
                        if writer:
                            for key, p in own.items():
                                p.copy_(state[key].to(p.dtype).view_as(p))
                for n, buf in module.named_buffers(recurse=False):
                    if buf is not None and prefix + n in state:  # buffers are never partitioned
                        buf.copy_(state[prefix + n].to(buf.dtype).view_as(buf))
        return missing, unexpected

    def finish(self, model: nn.Module) -> None:
        _batchnorm_buffers_fp32(model)


def model_placement(accelerator, whole: bool = False) -> Whole:
    """How to build the model for this launch: partitioned by zero.Init under a ZeRO-3 config with
    zero3_init_flag true (unless `whole`: e.g. the export, built on one rank), else whole."""
    from mars_dist.placement import WHOLE

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return WHOLE
    if plugin.zero3_init_flag and not whole:
        return ZeroInit(plugin)
    return WholeUnderZero3(plugin)
