"""Low-precision weights under DeepSpeed (bf16 / fp16): BatchNorm in fp32, and the fp32 masters for the export.

DeepSpeed (0.19) casts a model's PARAMETERS to the training dtype and leaves its buffers as they were (fp32), so a
BatchNorm gets a bf16 input and bf16 weight/bias but fp32 running statistics, and `F.batch_norm` refuses the mix
("expected scalar type BFloat16 but found Float", on CPU and CUDA alike). Casting the statistics down instead would
round the running variance to 8 bits (its momentum updates vanish) and move the BatchNorm effective scale that the
constraint measures. So BatchNorm runs the way torch autocast runs it: in fp32, with the fp32 statistics, the weight
and bias upcast (their gradients flow back to the low-precision parameters), the output cast back to the input's
dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mars_dist.constraints import full_shape

_LOW = (torch.bfloat16, torch.float16)
_batch_norm = F.batch_norm  # the real one, called by the fp32 version


def _fp32_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    if input.dtype not in _LOW:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    out = _batch_norm(input.float(), running_mean, running_var, up(weight), up(bias), training, momentum, eps)
    return out.to(input.dtype)


@contextlib.contextmanager
def _fp32_batch_norm_active() -> Iterator[None]:
    # torch's and timm's BatchNorm modules call `F.batch_norm` through the module attribute at call time
    F.batch_norm = _fp32_batch_norm
    try:
        yield
    finally:
        F.batch_norm = _batch_norm


def batchnorm_in_fp32(model: nn.Module) -> int:
    """Make each BatchNorm module of `model` compute in fp32 (see the module doc); returns how many. Idempotent."""
    count = 0
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "_mars_fp32_bn", False):
            continue
        forward = m.forward

        def fp32_forward(*args, _forward=forward, **kwargs):
            with _fp32_batch_norm_active():
                return _forward(*args, **kwargs)

        m.forward = fp32_forward
        m._mars_fp32_bn = True
        count += 1
    return count


def deepspeed_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The model's state dict with every parameter taken from DeepSpeed's fp32 master (`safe_get_full_fp32_param`,
    DeepSpeed's own consolidation, one parameter at a time; a collective: call on every rank) and buffers as the
    module holds them. Under bf16 the masters are where the bound holds exactly; the bf16 copies only within
    rounding. Parameters without a master (frozen) are gathered as they are."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    out = {}
    for key in module.state_dict().keys():
        if key in params:
            p = params[key]
            full = safe_get_full_fp32_param(p)
            if full is None:
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            out[key] = full.detach().float().reshape(full_shape(p)).cpu()
        elif key in buffers:
            out[key] = buffers[key].detach().cpu().clone()
    return out
