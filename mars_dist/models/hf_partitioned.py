"""Hugging Face classifiers built partitioned (DeepSpeed zero.Init) the way timm models are: on the meta device, then
loaded and partitioned one module at a time by the placement (`sharding/zero_init.py`).

Why not transformers' own ZeRO-3 loading: it creates the partitions in the training dtype, so a bf16 run has only
bf16(pretrained) to start its fp32 masters from; and its weight initialisation of missing keys runs on partitioned
(empty) tensors for some architectures (ResNet's `_init_weights` computes a fan-in from one: "Fan in and fan out can
not be computed for tensor with fewer than 2 dimensions"). Here the checkpoint's tensors go into the model by name,
every module is filled whole before it is partitioned, and the placement records this rank's fp32 partition.

Checkpoint names: `save_pretrained` writes some architectures' legacy names (ViT's `attention.attention.query`).
They are mapped back with transformers' own save-time conversion, inverted: each model key is sent through
`revert_weight_conversion` as a one-element probe and comes out under the name a saved file uses. A conversion that
is more than a renaming (fused or split tensors) is refused with the launch config that loads it whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def saved_name_map(model: nn.Module) -> dict[str, str]:
    """name in a `save_pretrained` file -> the model's state_dict key."""
    from transformers.core_model_loading import revert_weight_conversion

    keys = list(model.state_dict().keys())
    probe = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    saved = revert_weight_conversion(model, dict(probe))
    out = {}
    for name, value in saved.items():
        if not (torch.is_tensor(value) and value.numel() == 1 and value.item() == int(value.item())):
            raise NotImplementedError(f"{type(model).__name__}: its checkpoint format is more than a renaming of the "
                                      f"model's keys ({name!r}); build it whole (launch/accelerate/zero3.yaml)")
        out[name] = keys[int(value.item())]
    return out


def read_checkpoint(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a `save_pretrained` directory (model.safetensors, its sharded index, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(d / shard)))
        return state
    if (d / "pytorch_model.bin").is_file():
        return torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hub_directory(name: str) -> str:
    """A local directory for `name`: itself, or the hub snapshot (downloaded once into the HF cache)."""
    if (Path(name) / "config.json").is_file():
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin"])


def to_model_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the model's own keys (legacy saved names mapped back; others kept)."""
    own = set(model.state_dict().keys())
    if all(k in own for k in state):
        return state
    names = saved_name_map(model)
    return {(k if k in own else names.get(k, k)): v for k, v in state.items()}
