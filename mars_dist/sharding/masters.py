"""The pretrained weights in full precision, kept from the moment the model is loaded until the fp32 masters hold them.

Why this exists: DeepSpeed in bf16/fp16 casts the module's parameters to the training dtype and THEN builds its fp32
masters from the cast copies. Without a correction the masters (and so the anchors read from them) are
bf16(pretrained), the ball is centred on a rounded copy of the weights the user started from, and an export that is
inside the ball around bf16(W0) can be far outside the ball around W0 (a BatchNorm channel with running variance 0
amplifies the rounding of its scale a thousandfold). So the values are captured before the cast and written into the
masters right after the engine exists, through DeepSpeed's own setters (`sharding/zero.py`).

What is captured costs nothing for a model built whole: the capture holds references to the fp32 tensors, and
DeepSpeed's cast replaces `param.data` rather than writing into it, so the fp32 storage lives on only through the
capture until the masters have been written (then `release()`). A model built partitioned by zero.Init keeps, per
parameter, only this rank's fp32 partition (`sharding/zero_init.py` records it at creation: never a whole copy).
"""

from __future__ import annotations

import torch
from torch import nn

LOCAL_ATTR = "_mars_fp32_partition"
"""Set by the zero.Init builder on a partitioned parameter: (offset in the flattened parameter, fp32 values)."""


def record_partition(param: nn.Parameter, offset: int, values: torch.Tensor | None) -> None:
    """Remember this rank's fp32 partition of `param` (None: the value was rewritten since, in the training dtype;
    the master keeps what DeepSpeed gives it)."""
    setattr(param, LOCAL_ATTR, None if values is None else (int(offset), values.detach().float().reshape(-1)))


class PretrainedWeights:
    """fp32 values of a model's parameters as they were loaded, by the unwrapped model's parameter names.

    `fragment(name, offset, numel)` gives flatten(W0)[offset : offset + numel] from a whole value or from this rank's
    recorded partition; None where nothing was kept for that name (then the master is left as it is).
    """

    def __init__(self, whole: dict[str, torch.Tensor] | None = None,
                 partitions: dict[str, tuple[int, torch.Tensor]] | None = None):
        self.whole = dict(whole or {})
        self.partitions = dict(partitions or {})

    @classmethod
    def capture(cls, model: nn.Module) -> PretrainedWeights:
        """Call after the weights are loaded and before `accelerator.prepare` / `deepspeed.initialize`."""
        from mars_dist.sharding import named_parameters

        whole, partitions = {}, {}
        for name, p in named_parameters(model).items():
            if hasattr(p, LOCAL_ATTR):
                if getattr(p, LOCAL_ATTR) is not None:
                    partitions[name] = getattr(p, LOCAL_ATTR)
            elif not p.is_meta and p.numel() and not hasattr(p, "ds_id"):  # ds_id: partitioned by someone else
                if p.dtype != torch.float32 and p.is_floating_point():
                    continue  # already low precision when captured: nothing better to restore than what it is
                whole[name] = p.detach()  # a reference: DeepSpeed's cast swaps param.data, this keeps the fp32 one
        return cls(whole, partitions)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PretrainedWeights:
        """Whole values by parameter name (e.g. read from the pretrained file)."""
        return cls({k: v.detach() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()})

    def __contains__(self, name: str) -> bool:
        return name in self.whole or name in self.partitions

    def __len__(self) -> int:
        return len(self.whole) + len(self.partitions)

    def fragment(self, name: str, offset: int, numel: int) -> torch.Tensor | None:
        if name in self.whole:
            flat = self.whole[name].reshape(-1)
            return flat[offset:offset + numel].float()
        if name in self.partitions:
            start, values = self.partitions[name]
            if offset < start or offset + numel > start + values.numel():
                raise ValueError(f"pretrained values of {name!r}: elements [{offset}, {offset + numel}) asked, this "
                                 f"rank kept [{start}, {start + values.numel()}): the partitioning changed since "
                                 f"the model was built")
            return values[offset - start:offset - start + numel]
        return None

    def release(self) -> None:
        """Drop the references (the masters hold the values now)."""
        self.whole.clear()
        self.partitions.clear()
