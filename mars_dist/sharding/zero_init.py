"""Building a model under DeepSpeed ZeRO-3: whole, or partitioned at creation by `deepspeed.zero.Init`.

Which one is decided by the accelerate config's `zero3_init_flag` (launch/accelerate/zero3.yaml: false, the model is
built whole in every process and partitioned when the engine is created; zero3_init.yaml: true, for models that do
not fit whole). Two traps this module exists for:
- accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and transformers then
  builds every model under zero.Init when that config is ZeRO-3: a "whole" build must unregister it while it runs.
- zero.Init creates every floating tensor in the training dtype, BatchNorm running statistics included; the whole
  path keeps them fp32 (DeepSpeed casts parameters only), so they are put back to fp32 before anything is loaded.
Pretrained weights go into the partitions one module at a time: at most one module is ever whole, and only while the
model is built. Later edits (the seeded fresh head) go through `GatheredParameters` with modifier rank 0 — only before
the optimizer exists, where that edit reaches the fp32 master (docs/sharding.md, 'Traps').
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mars_dist.constraints import full_shape
from mars_dist.models.placement import Whole
from mars_dist.sharding.masters import LOCAL_ATTR, record_partition


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


@contextlib.contextmanager
def _transformers_told_nothing(plugin) -> Iterator[None]:
    """transformers does not see the ZeRO-3 config while a model is built (else it builds under zero.Init).
    Re-entrant: an inner use must not re-register before the outer one ends."""
    hf_ds = _transformers_deepspeed()
    registered = hf_ds.is_deepspeed_zero3_enabled()
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered:
            plugin.set_deepspeed_weakref()  # accelerate's registration, as it was


class WholeUnderZero3(Whole):
    """Whole parameters although a ZeRO-3 config is active (transformers is told nothing while the model is built)."""

    def __init__(self, plugin):
        self.plugin = plugin

    def transformers(self) -> contextlib.AbstractContextManager:
        return _transformers_told_nothing(self.plugin)


class ZeroInit(Whole):
    """Parameters partitioned at creation; pretrained weights loaded into the partitions.

    timm and Hugging Face models alike: not inside zero.Init itself — timm's model-level init (EfficientNet's, ResNet's) runs after the
    children are partitioned and divides by their empty shapes. Instead the parameters are created on the meta device
    (accelerate's `init_empty_weights`, buffers stay real: some are computed in __init__), and `finish` then turns them
    into ZeRO-3 partitions one module at a time, children first: materialise that module's own parameters, fill them
    from the weights being loaded, partition (`deepspeed.zero.Init(module=...)`). At most one module is whole at once.
    """

    partitioned = True

    def __init__(self, plugin):
        self.plugin = plugin
        if getattr(plugin, "dschf", None) is None:
            plugin.set_deepspeed_weakref()
        # accelerate's copy of the DeepSpeed config, "auto" batch values resolved, bf16/fp16 set
        self.config = plugin.dschf.config
        self.dtype = (torch.bfloat16 if self.config.get("bf16", {}).get("enabled") is True else
                      torch.float16 if self.config.get("fp16", {}).get("enabled") is True else torch.float32)

    def modules(self) -> contextlib.AbstractContextManager:
        from accelerate import init_empty_weights

        return init_empty_weights(include_buffers=False)

    @contextlib.contextmanager
    def transformers(self) -> Iterator[None]:
        """Hugging Face models are created like timm's (on the meta device, loaded and partitioned by `finish`),
        not by transformers' own zero.Init loading (mars_dist/models/hf_partitioned.py says why): transformers is told
        nothing of ZeRO-3 while the model is created."""
        with _transformers_told_nothing(self.plugin), self.modules():
            yield

    @contextlib.contextmanager
    def edit(self, params: list[nn.Parameter]) -> Iterator[bool]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield dist.get_rank() == 0
        for p in params:  # rewritten in the training dtype: the fp32 partition recorded at creation is stale
            if hasattr(p, LOCAL_ATTR):
                record_partition(p, 0, None)

    def shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return full_shape(tensor)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Buffers now; parameters (on the meta device) when `finish` partitions them."""
        keys = list(model.state_dict().keys())
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in set(keys)]
        _batchnorm_buffers_fp32(model)
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for k, v in state.items():
                if k in buffers and buffers[k] is not None:
                    buffers[k].copy_(v.to(buffers[k].dtype).view_as(buffers[k]))
        pending = getattr(model, "_mars_pending_weights", {})
        pending.update({k: v for k, v in state.items() if k not in buffers})
        model._mars_pending_weights = pending
        return missing, unexpected

    def finish(self, model: nn.Module) -> None:
        import deepspeed

        _batchnorm_buffers_fp32(model)
        pending = model.__dict__.pop("_mars_pending_weights", {})
        for module_name, module in reversed(list(model.named_modules())):  # children before their parents
            prefix = f"{module_name}." if module_name else ""
            meta = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_meta]
            if not meta:
                continue
            for n, p in meta:
                module._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32),
                                                     requires_grad=p.requires_grad)
            # shapes were checked at load; a pending value of another shape belongs to a module replaced since
            # (the 1000-class head of the bundled weights, before reset_classifier)
            loaded = {n for n, p in meta if prefix + n in pending and tuple(pending[prefix + n].shape) == tuple(p.shape)}
            unloaded = [n for n, _ in meta if n not in loaded]
            if unloaded:  # no weights for them (pretrained 'none', a new head): torch's default init
                self._default_init(module, unloaded)
            with torch.no_grad():
                for n, _ in meta:
                    p = module._parameters[n]
                    if n in loaded:
                        p.copy_(pending[prefix + n])
                    p.data = p.data.to(self.dtype)
            deepspeed.zero.Init(module=module, config_dict_or_path=self.config, mem_efficient_linear=False)
            for n, _ in meta:  # this rank's partition of the values as loaded, before any cast (sharding/masters.py)
                p = module._parameters[n]
                start = dist.get_rank(p.ds_process_group) * p.ds_tensor.numel()
                value = pending[prefix + n].reshape(-1)[start:start + p.ds_tensor.numel()] if n in loaded else None
                record_partition(p, start, None if value is None else value.float().clone())

    @staticmethod
    def _default_init(module: nn.Module, names: list[str]) -> None:
        if not any(True for _ in module.children()) and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # a leaf layer: its own parameters only
            return
        with torch.no_grad():
            for n in names:
                nn.init.trunc_normal_(module._parameters[n], std=0.02)


def model_placement(accelerator, whole: bool = False) -> Whole:
    """How to build the model for this launch: partitioned by zero.Init under a ZeRO-3 config with
    zero3_init_flag true (unless `whole`: e.g. the export, built on one rank), else whole."""
    from mars_dist.models.placement import WHOLE

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return WHOLE
    if plugin.zero3_init_flag and not whole:
        return ZeroInit(plugin)
    return WholeUnderZero3(plugin)
