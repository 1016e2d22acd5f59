"""Where a model's parameters live while it is built: the small interface between the model factory and the launcher.

`build_model` creates modules inside `placement.modules()` (plain torch / timm) or `placement.transformers()`
(Hugging Face builders), loads weights with `placement.load_state_dict` and writes the fresh head through
`placement.edit`. `Whole` (this module) builds every parameter whole in this process: one process, DDP, FSDP2, and
ZeRO when the model fits. The sharding layer provides the other placement, parameters created already partitioned by
DeepSpeed's zero.Init (`mars_dist.sharding.zero_init`); nothing here knows about processes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


class Whole:
    """Every parameter is created and loaded whole in this process."""

    partitioned = False

    def modules(self) -> contextlib.AbstractContextManager:
        """Context in which plain torch / timm modules are created."""
        return contextlib.nullcontext()

    def transformers(self) -> contextlib.AbstractContextManager:
        """Context in which Hugging Face models are created and loaded."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def edit(self, params: list[nn.Parameter]) -> Iterator[bool]:
        """Inside: the whole values of `params` can be read; writes count if the yielded flag is True."""
        yield True

    def shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """The whole shape of a parameter or buffer."""
        return tuple(tensor.shape)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Non-strict load; returns (missing, unexpected) keys. Shapes are checked by the caller."""
        result = model.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def finish(self, model: nn.Module) -> None:
        """Called once the model is built and loaded."""


WHOLE = Whole()


def init_fresh_head_(model: nn.Module, head_modules: list[str], seed: int, placement: Whole = WHOLE) -> None:
    """Initialise the new classifier head from its own generator seeded with `seed`: the same values whether the
    model was built whole or partitioned, in one process or N, whatever random numbers construction consumed
    before. The distribution is torch's default for Linear/Conv (uniform +-1/sqrt(fan_in), weight and bias)."""
    gen = torch.Generator().manual_seed(int(seed))
    for head in head_modules:
        for module in model.get_submodule(head).modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            shape = placement.shape(module.weight)
            bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
            values = {"weight": (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound}
            if module.bias is not None:
                values["bias"] = (torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 - 1) * bound
            params = [getattr(module, k) for k in values]
            with placement.edit(params) as writer, torch.no_grad():
                if writer:
                    for k, v in values.items():
                        getattr(module, k).copy_(v.to(getattr(module, k).dtype))
