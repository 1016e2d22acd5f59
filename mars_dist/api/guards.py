"""The refusals of `mars_dist.attach`: what makes an attach wrong, checked before anything is changed.

An attach is right only when (1) the anchors it reads are the pretrained weights and (2) its hook sits on the
optimizer that updates the fp32 masters. Both go wrong silently otherwise - the ball is centred on a fine-tuned
copy, or the projection never runs - so each check raises naming the reason and what to do instead.

The pretrained fingerprint: per parameter, over its flattened fp32 values x_i at global positions i,
    (sum |x_i|, sum x_i^2, sum x_i * (i mod 9973 + 1))      in float64.
It is layout-free: fragments of a sharded parameter add up to the whole parameter's fingerprint (one reduce), so
the fingerprint taken from the model before `prepare` can be compared with the fp32 masters of any backend after it.
The first two terms do not cancel (a scale for the tolerance), the third sees values that changed places.
"""

from __future__ import annotations

import torch

FINGERPRINT_RTOL = 1e-9  # float64 sums of the same fp32 values in another order agree to ~1e-15
_INDEX_PERIOD = 9973


class AttachError(ValueError):
    """`attach` refused: the reason and what to call instead are in the message."""


def fingerprint(values: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """float64 (sum |x|, sum x^2, sum x * (i mod 9973 + 1)) of flat values starting at global position `offset`."""
    x = values.detach().reshape(-1).to("cpu", torch.float64)
    idx = torch.arange(offset, offset + x.numel(), dtype=torch.float64) % _INDEX_PERIOD + 1
    return torch.stack([x.abs().sum(), (x * x).sum(), (x * idx).sum()])


def check_not_stepped(optimizer: torch.optim.Optimizer, engine=None) -> None:
    """Refuse when the optimizer already made an update (its state is filled by the first step) or a DeepSpeed
    engine counts updates (also after `engine.load_checkpoint`): the weights have moved from the pretrained ones."""
    steps = int(getattr(engine, "global_steps", 0) or 0) if engine is not None else 0
    if steps or any(len(s) for s in optimizer.state.values()):
        what = f"the DeepSpeed engine has made {steps} updates" if steps else \
            f"{type(optimizer).__name__} already holds state (it has stepped)"
        raise AttachError(f"attach after the weights moved: {what}. Attach right after prepare / "
                          f"deepspeed.initialize / fully_shard, before the first update; to resume, attach first and "
                          f"load the checkpoint after (accelerator.load_state restores the constraint's state too)")


ATTACHED_ATTR = "_mars_dist_attached"
"""Set on the inner optimizer while a handle is attached to it (cleared by `detach`)."""


def check_not_attached(optimizer: torch.optim.Optimizer) -> None:
    """Refuse a second attach to the same optimizer: both would project at every update, with their own anchors."""
    if getattr(optimizer, ATTACHED_ATTR, False):
        raise AttachError(f"{type(optimizer).__name__} already has a constraint attached; call detach() on that "
                          f"handle first (the Hugging Face callback does it when train() is called again)")


def check_optimizer_steps_params(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> None:
    """Refuse an optimizer that does not hold the constrained parameters themselves (another model's, a copy's,
    or a subset): its step would never move them, and the hook would fire on the wrong updates."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        raise AttachError(f"the optimizer does not update the fp32 parameters of the model it is attached with: "
                          f"{len(missing)} constrained parameters are not in its param_groups ({missing[:3]}...). "
                          f"Pass the optimizer that steps this model (the one given to accelerator.prepare, or built "
                          f"over the parameters after fully_shard)")


def check_deepspeed_optimizer(given, engine) -> None:
    """Under DeepSpeed the fp32 masters are updated by the torch optimizer inside the engine's ZeRO optimizer
    (`engine.optimizer.optimizer`): `given` must be it or a wrapper around it."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    chain, obj = [], given
    while obj is not None and len(chain) < 8:
        chain.append(obj)
        obj = getattr(obj, "optimizer", None)
    if inner is None or not any(o is inner for o in chain):
        raise AttachError(f"the optimizer given ({type(given).__name__}) is not the one DeepSpeed steps on the fp32 "
                          f"masters ({type(inner).__name__}, engine.optimizer.optimizer). Pass the optimizer returned "
                          f"by accelerator.prepare / deepspeed.initialize, or the torch optimizer you gave them")


def check_fingerprints(expected: torch.Tensor, found: torch.Tensor, names: list[str]) -> None:
    """Compare per-parameter fingerprints (rows of `expected` / `found`, reduced over ranks); refuse naming the
    first parameter whose fp32 masters are not the captured pretrained values."""
    scale = expected[:, :2].abs().amax(1, keepdim=True).clamp_min(1e-30) * torch.tensor([1.0, 1.0, _INDEX_PERIOD])
    bad = ((expected - found).abs() > FINGERPRINT_RTOL * scale).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AttachError(f"attach after the weights moved: the fp32 master of {names[i]!r} is not the pretrained "
                          f"value captured by capture_pretrained (fingerprint {found[i].tolist()} vs "
                          f"{expected[i].tolist()}; {int(bad.sum())} parameters differ). Attach before the first "
                          f"update, and capture the pretrained weights of this same model")


def check_low_precision_masters(engine, pretrained, names: list[str] | None = None) -> None:
    """DeepSpeed bf16/fp16 builds the fp32 masters from the rounded copy: refuse without the captured fp32 values
    (`pretrained`), or when some of the constrained parameters `names` were partitioned by zero.Init before the
    capture (nothing was kept for them)."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return
    if pretrained is None:
        raise AttachError(LOW_PRECISION_HINT)
    lost = [n for n in names or () if n in pretrained.missing]
    if lost:
        raise AttachError(f"{len(lost)} constrained parameters ({lost[:3]}...) were partitioned by zero.Init before "
                          f"capture_pretrained and their fp32 values were not kept; the anchors would be their "
                          f"low-precision copy. Build the model whole, or through mars_dist.models.build_model with "
                          f"a zero.Init placement (it keeps each rank's fp32 partition)")


LOW_PRECISION_HINT = ("DeepSpeed bf16/fp16 built the fp32 masters from the low-precision copy of the model, so the "
                      "anchors would be a rounded copy of the pretrained weights. Call "
                      "`pretrained = mars_dist.capture_pretrained(model)` after loading the weights and before "
                      "accelerator.prepare / deepspeed.initialize, then `mars_dist.attach(..., pretrained=pretrained)`")
