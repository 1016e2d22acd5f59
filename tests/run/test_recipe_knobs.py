"""The large-model recipe knobs, piece by piece (fast, one process): config validation, parameter groups (layer
decay, no weight decay on norms / biases / embeddings), drop-path at creation, activation checkpointing (same
gradients), the training loss (smoothing, mixup / cutmix), the augmentation transforms, and torch.compile under the
projection (the bound holds, computed here independently). End to end: test_recipe_runs.py."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mars_dist
from mars_dist import config
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
from mars_dist.models.factory import HFClassifier, build_model
from mars_dist.models.knobs import compile_model, enable_grad_checkpointing, model_inputs
from mars_dist.run.loss import TrainLoss
from mars_dist.run.param_groups import build_param_groups


def load(*overrides):
    return config.load(None, list(overrides))


@pytest.mark.parametrize("override,words", [
    ("train.layer_decay=0", "train.layer_decay"), ("train.layer_decay=1.5", "train.layer_decay"),
    ("model.drop_path_rate=1", "model.drop_path_rate"), ("data.reprob=1.5", "data.reprob"),
    ("train.label_smoothing=-0.1", "train.label_smoothing"), ("data.mixup=-1", "data.mixup"),
    ("data.auto_augment=' '", "data.auto_augment")])
def test_bad_values_are_refused_naming_the_key(override, words):
    with pytest.raises(config.ConfigError, match=words):
        load(override)


def test_mixup_refuses_an_odd_micro_batch():
    with pytest.raises(config.ConfigError, match="'train.batch_size' = 15 must be even"):
        load("data.cutmix=1.0", "train.batch_size=15")
    load("data.cutmix=1.0", "train.batch_size=16")


def test_defaults_keep_todays_run():
    cfg, demo = load(), config.load("recipes/demo.yaml")
    assert demo.train.weight_decay == 0  # so no_weight_decay_norm_bias (default on) changes nothing there
    for c in (cfg, demo):
        assert (c.model.drop_path_rate, c.data.mixup, c.data.cutmix, c.data.reprob, c.train.label_smoothing) == (0,) * 5
        assert c.data.auto_augment is None and c.train.layer_decay is None
        assert not c.train.grad_checkpointing and not c.train.compile
    model = build_model("tf_efficientnet_lite0", "bundled", 10)
    flat = build_param_groups(model, 1e-3, 0.0)
    assert flat == [p for p in model.parameters()]  # one group, today's order


def lite0():
    return build_model("tf_efficientnet_lite0", "bundled", 10)


def test_layer_decay_gives_each_block_its_group_and_the_head_the_full_lr():
    model = lite0()
    groups = build_param_groups(model, 1e-3, 0.05, layer_decay=0.5)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # every parameter once
    assert len(groups) >= 30  # 18 layers x (decay, no decay)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.classifier.weight)]["lr"] == 1e-3
    assert by_param[id(model.conv_stem.weight)]["lr"] == pytest.approx(1e-3 * 0.5 ** 17)
    assert by_param[id(model.blocks[5][3].conv_pw.weight)]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert by_param[id(model.blocks[6][0].conv_pw.weight)]["lr"] == pytest.approx(1e-3 * 0.5)  # with conv_head
    # no weight decay on norms and biases
    assert by_param[id(model.bn1.weight)]["weight_decay"] == 0
    assert by_param[id(model.classifier.bias)]["weight_decay"] == 0
    assert by_param[id(model.conv_stem.weight)]["weight_decay"] == 0.05


def test_no_weight_decay_on_norms_biases_and_embeddings_of_a_vit():
    model = timm.create_model("test_vit", num_classes=10)
    groups = build_param_groups(model, 1e-3, 0.05)
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    for name, p in model.named_parameters():
        expect = not (p.ndim <= 1 or name in ("pos_embed", "cls_token", "reg_token"))
        assert (id(p) in decay) == expect, name
    off = build_param_groups(model, 1e-3, 0.05, no_decay_norm_bias=False)
    assert off == list(model.parameters())  # the knob off: one group, weight decay on everything


def test_weight_decay_split_reads_the_real_shape_of_a_partitioned_parameter():
    model = nn.Linear(4, 4)
    model.weight.data, model.bias.data = torch.empty(0), torch.empty(0)  # as zero.Init leaves them on a rank
    model.weight.ds_shape, model.bias.ds_shape = torch.Size([4, 4]), torch.Size([4])
    groups = build_param_groups(model, 1.0, 0.05)
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.0, 1), (0.05, 1)]
    assert groups[1]["params"][0] is model.weight


def tiny_hf_vit(layers=3, **extra):
    from transformers import AutoModelForImageClassification, ViTConfig

    cfg = ViTConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=16,
                    image_size=16, patch_size=8, num_labels=3, **extra)
    return HFClassifier(AutoModelForImageClassification.from_config(cfg))


def test_hf_layer_decay_follows_the_encoder_layer_index():
    model = tiny_hf_vit(layers=3)
    groups = build_param_groups(model, 1.0, 0.0, layer_decay=0.5)
    lr = {n: g["lr"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert lr["hf_model.vit.embeddings.cls_token"] == 0.5 ** 4
    layer = lambda i: next(v for n, v in lr.items() if f".{i}.mlp." in n or f".{i}.output." in n)  # noqa: E731
    assert (layer(0), layer(1), layer(2)) == (0.5 ** 3, 0.5 ** 2, 0.5)
    assert lr["hf_model.classifier.weight"] == 1.0 and lr["hf_model.vit.layernorm.weight"] == 1.0


def test_layer_decay_is_refused_without_layer_structure():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="train.layer_decay: Plain has no layer structure"):
        build_param_groups(Plain(), 1.0, 0.0, layer_decay=0.5)
    with pytest.raises(ValueError, match="train.layer_decay: the HF model Sequential"):
        build_param_groups(HFClassifier(nn.Sequential(nn.Linear(4, 2))), 1.0, 0.0, layer_decay=0.5)


def test_drop_path_rate_reaches_the_model():
    model = build_model("tf_efficientnet_lite0", "bundled", 10, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.2 * 15 / 16)  # linear in depth, as timm does
    assert not [m for m in lite0().modules() if isinstance(m, timm.layers.DropPath)]


def test_drop_path_is_refused_for_a_hf_model_without_it(tmp_path):
    from transformers import ConvNextConfig, ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16,
              patch_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="model.drop_path_rate = 0.1: the HF model .*ViTConfig"):
        build_model(str(tmp_path / "vit"), "none", 3, drop_path_rate=0.1)
    ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3).save_pretrained(tmp_path / "cnx")
    model = build_model(str(tmp_path / "cnx"), "none", 3, drop_path_rate=0.1)
    assert model.hf_model.config.drop_path_rate == 0.1
    # 0 is off, also where the HF config's own default is not (BEiT: 0.1)
    from transformers import BeitConfig

    BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16,
               patch_size=8).save_pretrained(tmp_path / "beit")
    assert BeitConfig.from_pretrained(tmp_path / "beit").drop_path_rate > 0
    assert build_model(str(tmp_path / "beit"), "none", 3, drop_path_rate=0.0).hf_model.config.drop_path_rate == 0.0


def grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_grad_checkpointing_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=5, drop_path_rate=0.0) if kind == "timm" else tiny_hf_vit()
    size = 160 if kind == "timm" else 16
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 1])
    model.train()
    plain = grads(model, x, y)
    enable_grad_checkpointing(model)
    on = [getattr(m, "grad_checkpointing", False) or getattr(m, "gradient_checkpointing", False)
          for m in model.modules()]
    assert any(on)
    again = grads(model, x, y)
    for n in plain:
        torch.testing.assert_close(again[n], plain[n], rtol=0, atol=0, msg=n)


def test_grad_checkpointing_is_refused_where_unsupported():
    with pytest.raises(ValueError, match="train.grad_checkpointing = true: Linear"):
        enable_grad_checkpointing(nn.Linear(2, 2))


def test_the_loss_is_todays_when_off_and_smooths_and_mixes_when_on():
    torch.manual_seed(0)
    logits, y, x = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.randn(6, 3, 8, 8)
    plain = TrainLoss(4)
    assert plain.mix(x, y)[0] is x and torch.equal(plain(logits, y), F.cross_entropy(logits, y))
    smooth = TrainLoss(4, label_smoothing=0.1)
    assert torch.equal(smooth(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    mixed = TrainLoss(4, label_smoothing=0.1, mixup=0.8, cutmix=1.0)
    xm, target = mixed.mix(x.clone(), y)
    assert target.shape == (6, 4) and torch.allclose(target.sum(-1), torch.ones(6))
    assert not torch.equal(xm, x) and target.min() > 0  # mixed inputs, smoothed soft targets
    soft = F.one_hot(y, 4).float()
    assert torch.allclose(mixed(logits, soft), F.cross_entropy(logits, y))


def test_randaugment_and_random_erasing_are_in_the_training_transform_and_seeded_per_item():
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
           "crop_pct": 0.875}
    parts = lambda t: [type(s) for s in t.transforms[1].transforms]  # noqa: E731  [ToRGB, timm's Compose]
    plain, augmented = build_transforms(cfg, True), build_transforms(cfg, True, "rand-m9-mstd0.5-inc1", 0.25)
    assert RandAugment not in parts(plain) and RandomErasing not in parts(plain)
    assert RandAugment in parts(augmented) and RandomErasing in parts(augmented)
    assert RandomErasing not in parts(build_transforms(cfg, False, "rand-m9-mstd0.5-inc1", 0.25))
    import datasets
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ds = ImageClassificationDataset(datasets.Dataset.from_dict({"image": [img] * 2, "label": [0, 1]}),
                                    augmented, seed=3)
    first = ds[(0, 1)][0]
    np.random.seed(123)  # another global NumPy state: the item's augmentation does not depend on it
    assert torch.equal(ds[(0, 1)][0], first) and not torch.equal(ds[(1, 1)][0], first)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


def test_compiled_model_keeps_the_projection_and_matches_eager():
    torch.manual_seed(0)
    model = Tiny()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    pretrained = mars_dist.capture_pretrained(model)
    compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    mars_dist.attach(model, optimizer, radius=0.05, head_radius=0.5, pretrained=pretrained)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert model._compiled_call_impl is not None  # the forward above ran compiled
    names = [n for n, _ in model.named_parameters()]
    assert names == list(w0)  # no _orig_mod prefix: checkpoints and the export see the same names
    for name, radius, anchor in [("body.0.weight", 0.05, w0["body.0.weight"]),
                                 ("body.2.weight", 0.05, w0["body.2.weight"]), ("head.weight", 0.5, 0.0)]:
        w = model.get_parameter(name).detach().double()
        mars = (w - anchor).abs().sum(dim=1).max()  # max absolute row sum, computed here
        assert 0.9 * radius < mars <= radius * (1 + 5e-5), (name, float(mars))  # moved to the bound, not past it
    eager = Tiny()
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-6)


def test_channels_last_reorders_the_inputs_only_and_keeps_the_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert model_inputs(None, False)(x) is x
    assert model_inputs(torch.bfloat16, False)(x).dtype == torch.bfloat16
    fed = model_inputs(None, True)(x)
    assert fed.is_contiguous(memory_format=torch.channels_last) and not fed.is_contiguous()
    # frozen BatchNorm: batch statistics of 4 images would amplify the other summation order's fp32 rounding
    model = lite0().eval()
    plain, reordered = grads(model, x, y), grads(model, fed, y)
    assert all(p.is_contiguous() for p in model.parameters())  # the projection's flat views still work
    for n in plain:
        assert (reordered[n] - plain[n]).abs().max() <= 1e-4 * plain[n].abs().max(), n
