"""How `mars_dist.attach` finds its way through the wrappers: the DeepSpeed engine, the unwrapped model, the inner
torch optimizer, the classifier head, the sharding backend, and the check that the fp32 masters are the captured
pretrained weights. No public surface here (mars_dist.api is the one)."""

from __future__ import annotations

import torch
from torch import nn

from mars_dist.api import guards


def deepspeed_engine(model, accelerator):
    """The DeepSpeedEngine behind `model`, or None (also finds it when given accelerate's unwrapped module)."""
    if hasattr(model, "zero_optimization_stage") and hasattr(model, "module"):
        return model
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return getattr(wrapped, "engine", None)


def unwrap(model: nn.Module, accelerator=None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def inner_optimizer(optimizer, engine) -> torch.optim.Optimizer:
    """The torch optimizer whose step hooks fire once per real update (under accelerate's / DeepSpeed's wrappers)."""
    if engine is not None:
        return engine.optimizer.optimizer
    obj = optimizer
    for _ in range(8):
        if isinstance(obj, torch.optim.Optimizer) and type(obj).__name__ != "AcceleratedOptimizer":
            return obj
        obj = getattr(obj, "optimizer", None)
    raise guards.AttachError(f"{type(optimizer).__name__} is not a torch optimizer nor a wrapper around one; pass the "
                             f"optimizer that steps the model's fp32 parameters")


def find_head(module: nn.Module) -> list[str]:
    """The classifier head: the model's own (`get_classifier`), or that of the first submodule that has one (a
    timm model inside a wrapper, e.g. for the Hugging Face Trainer)."""
    from mars_dist.models.factory import classifier_module_names

    for prefix, sub in module.named_modules():
        if hasattr(sub, "get_classifier") or sub is module:
            try:
                names = classifier_module_names(sub)
            except ValueError:
                continue
            return [f"{prefix}.{n}" if prefix else n for n in names]
    raise guards.AttachError(f"{type(module).__name__}: no classifier head found; pass head=[module names]")


def use_pretrained_running_vars(constraints, pretrained) -> None:
    """BatchNorm anchors from the running variances as captured, not as a forward pass before attach left them."""
    for c in constraints:
        key = c.name.rsplit(".", 1)[0] + ".running_var"
        if c.role == "bn" and key in pretrained.running_vars:
            c.running_var0 = pretrained.running_vars[key].to(c.running_var0.device)


def constrained_params(module: nn.Module, constraints) -> dict[str, nn.Parameter]:
    from mars_dist.sharding import named_parameters

    params = named_parameters(module)
    return {c.name: params[c.name] for c in constraints}


def build_backend(model, engine, module, inner, constraints, mode, accelerator, pretrained):
    from mars_dist import sharding

    weights = pretrained.weights if pretrained is not None else None
    if accelerator is not None:
        backend = sharding.build_backend(accelerator, engine if engine is not None else model, inner, constraints,
                                         mode, weights)
    elif engine is not None:
        backend = sharding.build_zero_backend(engine, constraints, mode, weights)
    elif any(type(p).__name__ == "DTensor" for p in module.parameters()):
        backend = sharding.build_fsdp2_backend(module, inner, constraints, mode)
    else:
        backend = sharding.build_replicated_backend(module, inner, constraints)
    return backend


def check_pretrained(backend, pretrained) -> None:
    """The fp32 masters of the constrained parameters must be the captured pretrained values (one reduce)."""
    names = [f.constraint.name for f in backend.fragments()]
    known = [i for i, n in enumerate(names) if n in pretrained.fingerprints]
    found = torch.stack([guards.fingerprint(f.w, f.offset) for f in backend.fragments()]) if names else \
        torch.zeros(0, 3, dtype=torch.float64)
    partial = torch.stack([pretrained.fingerprints[n] if n in pretrained.partitioned and n in pretrained.fingerprints
                           else torch.zeros(3, dtype=torch.float64) for n in names]) if names else found
    summed, _ = backend.reduce(torch.cat([found.reshape(-1), partial.reshape(-1)]), torch.zeros(0, dtype=torch.float64))
    summed = summed.cpu()  # FSDP2 reduces on the parameters' device
    found, partial = summed[:found.numel()].reshape(-1, 3), summed[found.numel():].reshape(-1, 3)
    expected = torch.stack([partial[i] if names[i] in pretrained.partitioned else pretrained.fingerprints[names[i]]
                            for i in known]) if known else torch.zeros(0, 3, dtype=torch.float64)
    if known:
        guards.check_fingerprints(expected, found[known], [names[i] for i in known])
