"""The training loss: cross-entropy, with label smoothing, or timm's Mixup / CutMix and the soft-target loss.

`TrainLoss.mix(x, y)` turns a micro-batch into what the model sees and the targets the loss takes; `loss(logits,
target)` is then the loss. With every knob off it is `F.cross_entropy(logits, y)` on the batch as loaded, exactly.
Mixup pairs sample i with sample n-1-i of the micro-batch (each rank mixes its own), so it needs an even
micro-batch: the config refuses an odd train.batch_size, and the train loader drops the last incomplete batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TrainLoss:
    def __init__(self, num_classes: int, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        self.label_smoothing = label_smoothing
        self.mixer = None
        if mixup or cutmix:
            from timm.data import Mixup

            # timm's defaults: one of mixup / cutmix per batch (half the time each when both are on), batch mode
            self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer is None:
            return x, y
        return self.mixer(x, y)  # soft targets, smoothed by the mixer itself

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()  # timm SoftTargetCrossEntropy
        if self.label_smoothing:
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return F.cross_entropy(logits, target)


def build_loss(cfg, num_classes: int) -> TrainLoss:
    return TrainLoss(num_classes, cfg.train.label_smoothing, cfg.data.mixup, cfg.data.cutmix)
