"""Optimizer and learning-rate schedule builders (flat arguments; the schedule counts real updates)."""

from __future__ import annotations

import math

import torch
from torch import nn

from mars_dist.run.param_groups import build_param_groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, amsgrad: bool = False, layer_decay: float | None = None,
                    no_decay_norm_bias: bool = True) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over all trainable parameters: one param group, or groups per layer and weight decay
    (mars_dist/run/param_groups.py) with layer-wise lr decay or weight decay split from norms and biases.

    A plain torch optimizer on purpose: DeepSpeed wraps it ("zero_allow_untested_optimizer") instead of needing
    its compiled Adam, and its step hooks are where the projection runs (over every group).
    """
    params = build_param_groups(model, lr, weight_decay, layer_decay, no_decay_norm_bias)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (adamw, adam, sgd)")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_updates: int, warmup_steps: int = 0,
                    step_size: int = 20, step_gamma: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    """'cosine' (to zero at total_updates), 'step' (x step_gamma every step_size updates) or 'constant', each after
    a linear warm-up. Stepped once per real update by the trainer, so it does not depend on the world size."""
    total = max(1, total_updates)

    def factor(update: int) -> float:
        if warmup_steps and update < warmup_steps:
            return (update + 1) / warmup_steps
        if name == "cosine":
            progress = min(1.0, (update - warmup_steps) / max(1, total - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "step":
            return step_gamma ** ((update - warmup_steps) // step_size)
        if name == "constant":
            return 1.0
        raise ValueError(f"train.scheduler: unknown scheduler {name!r} (cosine, step, constant)")

    factor(0)  # fail now, not at the first update, on a bad name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
