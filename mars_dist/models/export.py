"""The export: weights + config that timm or transformers load alone, class names included, and loading it back.

timm models: timm's `save_for_hf` (config.json with `label_names` and the training preprocessing in
`pretrained_cfg`); `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds it, and transformers' TimmWrapper
loads the same folder (`pipeline("image-classification", model=DIR)`).
Hugging Face models: `save_pretrained` with `id2label` / `label2id`, plus an image processor (BitImageProcessor:
shorter side to size / crop_pct, centre crop, normalise; with `backend="pil"` exactly the eval transform of
training) so that `pipeline("image-classification", model=DIR)` classifies images as they are.
Both: `mars_dist.json` records the class names and the exact preprocessing of training (for eval / predict).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mars_dist.models.factory import HFClassifier, classifier_module_names, resolve_data_config, resolve_source

META_FILE = "mars_dist.json"
_PIL_ENUM = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def export_model(model: nn.Module, out_dir: str | Path, model_name: str, num_classes: int, source: str = "auto",
                 data_config: dict | None = None, class_names: list[str] | None = None) -> Path:
    """Write model.safetensors + config.json (+ preprocessor_config.json for HF models) loadable WITHOUT mars_dist,
    and mars_dist.json; returns `out_dir`.

    timm: `timm.create_model('local-dir:' + out_dir, pretrained=True)`, or `timm.create_model(name, pretrained=True,
    num_classes=N, pretrained_cfg_overlay=dict(file=out_dir/'model.safetensors', num_classes=N))` (the overlay needs
    num_classes too, else timm compares N with the architecture's default 1000 and drops the trained head).
    HF: `AutoModelForImageClassification.from_pretrained(out_dir)`. `data_config` (from resolve_data_config) is the
    preprocessing used in training; `class_names` the label of each output (index order).
    """
    out = Path(out_dir)
    heads = classifier_module_names(model)
    outputs = [m.out_features for h in heads for m in model.get_submodule(h).modules() if isinstance(m, nn.Linear)]
    if outputs and outputs[-1] != num_classes:
        raise ValueError(f"export of {model_name!r}: head has {outputs[-1]} outputs, expected {num_classes}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"export of {model_name!r}: {len(class_names)} class names for {num_classes} outputs")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"export of {model_name!r}: class names are not unique: {class_names}")
    data_config = dict(data_config or resolve_data_config(model, None))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HFClassifier):
        kind = "hf"
        if class_names is not None:
            model.hf_model.config.id2label = dict(enumerate(class_names))
            model.hf_model.config.label2id = {c: i for i, c in enumerate(class_names)}
        model.hf_model.save_pretrained(str(out), safe_serialization=True)
        image_processor(data_config).save_pretrained(str(out))
    else:
        kind = "timm"
        if resolve_source(model_name, source) != "timm":
            raise ValueError(f"export of {model_name!r}: a timm model was given but the name resolves to source 'hf'")
        from timm.models import save_for_hf

        dc = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
              if k in data_config}
        save_for_hf(model, str(out), safe_serialization=True, data_config=dc,
                    model_config={"label_names": class_names} if class_names else None)
        # transformers' TimmWrapper passes num_classes itself and fails on a second one in model_args; timm takes
        # the class count from the top-level num_classes without it
        cfg = json.loads((out / "config.json").read_text())
        cfg.get("model_args", {}).pop("num_classes", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    meta = {"format": 1, "model_name": model_name, "kind": kind, "class_names": class_names,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def image_processor(data_config: dict):
    """A transformers image processor doing the eval transform of `data_config`: resize the shorter side to
    floor(size / crop_pct), centre crop to size, scale to [0, 1], normalise (timm's eval transform)."""
    from transformers import BitImageProcessor

    _, h, w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 1.0
    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": math.floor(min(h, w) / crop_pct)},
        resample=_PIL_ENUM.get(data_config.get("interpolation", "bilinear"), 2), do_center_crop=True,
        crop_size={"height": h, "width": w}, do_rescale=True, do_normalize=True,
        image_mean=list(data_config["mean"]), image_std=list(data_config["std"]), do_convert_rgb=True,
        crop_pct=crop_pct)


# ---------------------------------------------------------------- loading back
@dataclass
class Export:
    """A loaded export: `model(images) -> logits` (eval mode), the label of each output, its preprocessing."""
    path: Path
    kind: str
    model: nn.Module
    class_names: list[str]
    data_config: dict
    meta: dict
    labelled: bool = True
    """False for an export without class names (made before they were recorded): names are '0', '1', ..."""


def find_export(path: str | Path) -> Path:
    """The export folder for a run directory (RUN/export) or an export folder itself; an error naming `path`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run or export directory")
    if (p / "export" / "config.json").is_file():
        return p / "export"
    if (p / "config.json").is_file():
        return p
    if (p / "config.yaml").is_file():
        raise FileNotFoundError(f"{p} is a run directory without an export ({p / 'export'}): the run has not "
                                f"finished; resume it with resume=auto to get one")
    raise FileNotFoundError(f"{p}: neither an export (config.json + model.safetensors) nor a run directory "
                            f"(config.yaml + export/)")


def load_export(path: str | Path, device: str | torch.device = "cpu") -> Export:
    """Load an export (or a run directory's export) with timm or transformers, no network."""
    p = find_export(path)
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"{p}: no weights file ({' or '.join(_WEIGHT_FILES[:2])})")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / 'config.json'}: not valid JSON ({e})") from e
    meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
    if "architecture" in cfg and "model_type" not in cfg:
        import timm

        kind = "timm"
        model = timm.create_model("local-dir:" + str(p), pretrained=True)
        labels = cfg.get("label_names") or meta.get("class_names")
        if isinstance(labels, dict):
            labels = [labels.get(str(i), labels.get(i, str(i))) for i in range(model.num_classes)]
        labelled = bool(labels)
        names = [str(c) for c in labels] if labels else [str(i) for i in range(model.num_classes)]
    else:
        from transformers import AutoModelForImageClassification

        kind = "hf"
        hf = AutoModelForImageClassification.from_pretrained(str(p))
        model = HFClassifier(hf, source_dir=str(p))
        names = [str(hf.config.id2label.get(i, i)) for i in range(hf.config.num_labels)]
        labelled = names != [f"LABEL_{i}" for i in range(len(names))]  # transformers' placeholder names
    model.eval().to(device)
    data_config = meta.get("data_config") or resolve_data_config(model, None)
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    return Export(p, kind, model, names, data_config, meta, labelled)
