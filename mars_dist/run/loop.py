"""The pieces of the training loop that are not the loop: one evaluation pass (the trainer's and `mars-dist eval`'s),
train mode with frozen BatchNorm statistics, the epoch length in updates, and the stop signals."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

EXIT_PREEMPTED = 99


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stops and the last checkpoint stays as it was."""


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's preemption warning): checkpoint at the next update, then exit 99."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.raised = True


def updates_per_epoch(batches: int, processes: int, grad_accum: int) -> int:
    """Optimizer updates in one epoch of `batches` (the unsharded loader's length, drop_last): each process gets
    batches // processes of them (accelerate drops the incomplete last round), and accelerate's `accumulate` ends
    the epoch with a partial update over the remainder (sync at end_of_dataloader), hence the ceil. 0 when one
    process sees fewer micro-batches than one whole update: refused."""
    per_process = batches // processes
    return 0 if per_process < grad_accum else math.ceil(per_process / grad_accum)


def gathered_batches(model, loader, accelerator, cast: torch.dtype | None = None,
                     labels: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits, labels, per-sample loss) of every batch, gathered from all processes without the samples that pad
    the last batch (`gather_for_metrics`). `labels` maps the data's labels to the model's classes."""
    with torch.no_grad():
        for x, y in loader:
            logits = model(x if cast is None else x.to(cast)).float()
            y = y if labels is None else labels(y)
            loss = F.cross_entropy(logits, y, reduction="none")  # per sample: gather_for_metrics drops padding
            yield accelerator.gather_for_metrics((logits, y, loss))


def evaluate(model, loader, accelerator, cast: torch.dtype | None = None) -> dict:
    """Accuracy and mean loss over `loader` (every process gets the same numbers)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for logits, y, loss in gathered_batches(model, loader, accelerator, cast):
        correct += int((logits.argmax(-1) == y).sum())
        total += int(y.numel())
        loss_sum += float(loss.sum())
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


def set_train_mode(model, bn_mode: str) -> None:
    model.train()
    if bn_mode == "eval":  # frozen running statistics (and no batch-size dependence between world sizes)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
