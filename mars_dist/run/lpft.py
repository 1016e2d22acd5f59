"""LP-FT (Kumar et al., Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution, ICLR
2022): the first `train.linear_probe_steps` updates train the new head alone, then the whole network.

How the backbone is frozen: its parameters go into their own optimizer param group whose learning rate is 0 during
the probe; requires_grad never changes. DeepSpeed ZeRO-1/2/3 build their flat fp32 partitions (and the
checkpoint layout) from the parameters that require gradients when the engine is made, so unfreezing them later
would need a new engine; a learning rate is a number in the param group dicts that the schedule already writes
(ZeRO keeps the torch optimizer's group dicts and only swaps their 'params'), identical under every backend and in
every checkpoint. With lr 0 the update leaves a weight bit for bit (SGD: p - 0 * buf; Adam: p - 0 * m / (sqrt(v) +
eps); AdamW's decay: p * (1 - 0)). What it does not freeze, on purpose or as a cost:
- the backbone's gradients are still computed (no saving in backward) and still count in train.grad_clip's norm;
- Adam's moments of the backbone accumulate the probe's gradients: fine-tuning starts from warm moments and the
  shared step count (a fresh optimizer would start from zero moments);
- BatchNorm running statistics would move in train mode, and the projection would then move BatchNorm weights to
  keep their effective scales in the ball: BatchNorm stays in eval mode during the probe (frozen statistics).
The projection runs on every update as always: the head is projected in the probe too, the backbone, unchanged,
stays where it was. One learning-rate schedule spans the whole run (the head follows it during the probe).
Resume: the state is a function of the update count alone (lr set after every schedule step, BN mode at every
epoch start), so a checkpoint inside or after the probe resumes exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from mars_dist.run.loop import set_train_mode

BACKBONE, HEAD = 0, 1
"""Indices of the two param groups. The logged learning rate is the schedule's (LambdaLR records it before the
probe sets the backbone's to 0): during the probe, the head's."""


class LinearProbe:
    """The probe of a run: `steps` updates of the head alone (0: off, everything here a no-op)."""

    def __init__(self, steps: int, head_modules: list[str]):
        self.steps, self.head_modules = steps, head_modules

    def split(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before any step and before the schedule is made: one param group -> [backbone, head]."""
        if not self.steps:
            return
        if len(optimizer.param_groups) != 1 or optimizer.state:
            raise ValueError(f"train.linear_probe_steps={self.steps}: needs a fresh optimizer with one param group "
                             f"(found {len(optimizer.param_groups)} groups)")
        head = {id(p) for name in self.head_modules for p in model.get_submodule(name).parameters()}
        group = optimizer.param_groups[0]
        params = group.pop("params")
        heads = [p for p in params if id(p) in head]
        if not heads:
            raise ValueError(f"train.linear_probe_steps={self.steps}: no trainable parameter in the head modules "
                             f"{self.head_modules}")
        optimizer.param_groups = [{**group, "params": [p for p in params if id(p) not in head]},
                                  {**group, "params": heads}]

    def in_probe(self, step: int) -> bool:
        """Whether update number `step` (0-based: the one about to be made) is a probe update."""
        return step < self.steps

    def set_learning_rates(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """After every schedule step (and at start / resume): the backbone's lr is 0 while in the probe. The
        schedule (a LambdaLR: lr = base_lr * factor) rewrites both groups at its next step, which ends the probe."""
        if self.steps and self.in_probe(step):
            optimizer.param_groups[BACKBONE]["lr"] = 0.0

    def bn_mode(self, configured: str, step: int) -> str:
        """BatchNorm mode for the updates from `step` on: frozen statistics while in the probe."""
        return "eval" if self.steps and self.in_probe(step) else configured

    def after_update(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, configured: str) -> None:
        """After update `step` - 1 and the schedule's step: learning rates, and the train mode at the boundary."""
        self.set_learning_rates(optimizer, step)
        if self.steps and step == self.steps:
            set_train_mode(model, configured)
