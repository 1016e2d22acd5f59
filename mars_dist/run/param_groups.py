"""The optimizer's parameter groups: layer-wise lr decay and no weight decay on norms / biases / embeddings.

Every group is a plain torch param group (`params`, `lr`, `weight_decay`, plus `lr_scale` for the record): the
schedule multiplies each group's own initial lr, so a block's lr keeps its scale all along. The projection does
not read groups: under ZeRO each group becomes DeepSpeed sub-groups whose stepping masks the sharding layer follows.
The radii never see an lr (learned radii have their own optimizer), so the scaling does not reach them.
"""

from __future__ import annotations

import re

from torch import nn

# HF encoders: the first block index in a parameter name (ViT/BEiT `encoder.layer.3.`, Swin `encoder.layers.1.`,
# ConvNeXt `encoder.stages.2.`); embeddings come first, anything after the encoder (final norm, head) last
_HF_BLOCK = re.compile(r"\.(?:layer|layers|stages|blocks|block)\.(\d+)\.")
_HF_EMBEDDING = ("embeddings.", "embedder.")
# embeddings by name (their tensors are >= 2-d, so the 1-d rule misses them)
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "position_embeddings", "mask_token",
                    "distillation_token", "relative_position_bias_table")


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None,
                       no_decay_norm_bias: bool = True) -> list:
    """A flat parameter list when neither knob changes anything (today's single group), else param groups keyed
    by (layer, decay or not) with their lr and weight decay set."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    split_decay = weight_decay > 0 and no_decay_norm_bias
    if layer_decay is None and not split_decay:
        return [p for _, p in named]
    layer_of, layers = _layers(model, [n for n, _ in named]) if layer_decay is not None else ({}, 1)
    no_decay = _no_decay_names(model) if split_decay else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        layer = layer_of.get(name, layers - 1)
        decays = name not in no_decay and not (split_decay and (_ndim(p) <= 1 or name.endswith(".bias")))
        scale = 1.0 if layer_decay is None else layer_decay ** (layers - 1 - layer)
        group = groups.setdefault((layer, decays), {"params": [], "lr": lr * scale, "lr_scale": scale,
                                                    "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _ndim(p) -> int:
    """The parameter's own rank: under zero.Init `.data` is an empty 1-d partition, `ds_shape` the real shape."""
    return len(getattr(p, "ds_shape", p.shape))


def _no_decay_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in _EMBEDDING_NAMES}
    own = getattr(model, "no_weight_decay", None)  # timm models list theirs (names that may not exist here)
    if callable(own):
        names |= set(own()) & {n for n, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{prefix}.weight" if prefix else "weight")
    return names


def _layers(model: nn.Module, names: list[str]) -> tuple[dict[str, int], int]:
    """(layer index per parameter name, number of layers); the last index is the head's (full lr)."""
    from mars_dist.models.factory import HFClassifier

    if isinstance(model, HFClassifier):
        return _hf_layers(model, names)
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(f"train.layer_decay: {type(model).__name__} has no layer structure (no timm group_matcher); "
                         f"set train.layer_decay to null")
    from timm.models import group_parameters

    layer_of = group_parameters(model, matcher(coarse=False), reverse=True)
    return layer_of, max(layer_of.values()) + 1


def _hf_layers(model: nn.Module, names: list[str]) -> tuple[dict[str, int], int]:
    blocks = {n: int(m.group(1)) for n in names if (m := _HF_BLOCK.search(n))}
    if not blocks:
        raise ValueError(f"train.layer_decay: the HF model {type(model.hf_model).__name__} has no encoder layer "
                         f"index in its parameter names (encoder.layer.N / layers.N / stages.N); set "
                         f"train.layer_decay to null")
    count = max(blocks.values()) + 1
    layer_of = {}
    for n in names:
        if n in blocks:
            layer_of[n] = blocks[n] + 1
        elif any(e in n for e in _HF_EMBEDDING):
            layer_of[n] = 0
        else:
            layer_of[n] = count + 1
    return layer_of, count + 2
