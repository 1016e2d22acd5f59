"""Model-level recipe knobs applied after creation: activation checkpointing and torch.compile.

Both leave the parameters and their names as they are, so the constraint, the checkpoints and the export see the
same model. Pure PyTorch/timm/transformers: nothing here knows about processes or sharding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def enable_grad_checkpointing(model: nn.Module) -> None:
    """timm `set_grad_checkpointing(True)` or HF `activation_checkpointing_enable()` (formerly
    `gradient_checkpointing_enable()`): blocks are recomputed in the
    backward pass instead of keeping their activations. Refused, naming the model, where it has neither."""
    from mars_dist.models.factory import HFClassifier

    if isinstance(model, HFClassifier):
        hf = model.hf_model
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.grad_checkpointing = true: the HF model {type(hf).__name__} does not support "
                             f"gradient checkpointing; set it to false")
        # non-reentrant: recomputation works with inputs that need no grad and under ZeRO-3's parameter hooks
        kwargs = {"use_reentrant": False}
        if callable(getattr(hf, "activation_checkpointing_enable", None)):  # transformers >= 5's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    setter = getattr(model, "set_grad_checkpointing", None)
    if not callable(setter):
        raise ValueError(f"train.grad_checkpointing = true: {type(model).__name__} has no set_grad_checkpointing; "
                         f"set it to false")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as err:  # timm models that declare it but do not implement it
        raise ValueError(f"train.grad_checkpointing = true: {type(model).__name__} does not support it ({err}); "
                         f"set it to false") from err


def compile_model(model: nn.Module) -> None:
    """torch.compile in place (`nn.Module.compile`): the module, its parameters and state-dict names stay the
    same objects, so the optimizer, the projection hook on it, checkpoints and the export are unchanged."""
    model.compile()


def model_inputs(cast: torch.dtype | None, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model is fed: the batch in the compute dtype, and in channels-last memory order when asked.

    Only the inputs change order: convolutions then run channels-last (cuDNN and oneDNN follow the input's
    format) while the parameters stay contiguous, because the projection writes the fp32 masters in place
    through flat views of them (and ZeRO / FSDP2 keep them in flat buffers anyway)."""
    def to_model(x: torch.Tensor) -> torch.Tensor:
        x = x if cast is None else x.to(cast)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    return to_model


def apply_model_knobs(model: nn.Module, grad_checkpointing: bool, compile: bool) -> list[str]:
    """The knobs that are on, applied; returns their names (for the run's log)."""
    applied = []
    if grad_checkpointing:
        enable_grad_checkpointing(model)
        applied.append("activation checkpointing")
    if compile:
        compile_model(model)
        applied.append("torch.compile")
    return applied
