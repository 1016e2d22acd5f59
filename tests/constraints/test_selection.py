"""Layer selection (mars_dist.constraints.selection) on real timm architectures, randomly initialised: which
parameters are constrained, with which role and radius, and that the rows of the MARS norm are the output units
(one per channel for depthwise convolutions)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mars_dist.constraints import Fragment, measure, project, select_constraints, summary


def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier, found by identity with model.get_classifier() (not by guessing names)."""
    classifier = model.get_classifier()
    return [name for name, module in model.named_modules() if module is classifier]


_MODELS: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    """One random-init instance per architecture for the whole file (they are only read, never trained)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = timm.create_model(name, pretrained=False, num_classes=7)
    return _MODELS[name]


def select(name: str, method: str = "mars-pgm", **kw):
    m = model(name)
    return {c.name: c for c in select_constraints(m, head_names(m), method, radius=kw.pop("radius", 3.0),
                                                  head_radius=kw.pop("head_radius", 11.0), **kw)}


def roles_of(m: nn.Module, module_types) -> list[str]:
    return [f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, module_types)]


# ---- architectures -------------------------------------------------------------------------------------------------
def test_resnet18_convs_bn_and_fc_head():
    m = model("resnet18")
    assert head_names(m) == ["fc"]
    cs = select("resnet18", bn_eps=1e-6)
    convs, bns = roles_of(m, nn.Conv2d), roles_of(m, nn.BatchNorm2d)
    assert len(convs) == 20 and len(bns) == 20
    assert {n for n, c in cs.items() if c.role == "matrix"} == set(convs)
    assert {n for n, c in cs.items() if c.role == "bn"} == set(bns)
    assert [n for n, c in cs.items() if c.role == "head"] == ["fc.weight"]
    assert len(cs) == 41 and not any(n.endswith("bias") for n in cs)  # biases (and BN beta) never
    assert list(cs) == [n for n, _ in m.named_parameters() if n in cs]  # named_parameters() order
    conv1, fc = cs["conv1.weight"], cs["fc.weight"]
    assert (conv1.num_rows, conv1.row_len, conv1.radius, conv1.action, conv1.norm) == (64, 3 * 7 * 7, 3.0, "project",
                                                                                       "mars")
    assert (fc.radius, fc.centered, fc.num_rows, fc.row_len) == (11.0, False, 7, 512)
    bn = cs["layer1.0.bn1.weight"]
    assert bn.running_var is m.layer1[0].bn1.running_var  # the live buffer...
    assert bn.running_var0 is not bn.running_var and torch.equal(bn.running_var0, bn.running_var)  # ...and a copy
    assert bn.bn_eps == 1e-6 and bn.kind == "diag" and bn.radius == 3.0
    assert summary(cs.values()) == {"count": 41, "by_role": {"matrix": 20, "bn": 20, "head": 1},
                                    "parameters": sum(c.numel for c in cs.values())}


def test_efficientnet_lite0_depthwise_rows_per_channel_and_classifier_head():
    m = model("tf_efficientnet_lite0")
    assert head_names(m) == ["classifier"]
    cs = select("tf_efficientnet_lite0")
    depthwise = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert len(depthwise) == 16
    for n in depthwise:
        c = cs[f"{n}.weight"]
        channels, _, kh, kw = c.shape
        assert c.role == "matrix" and c.num_rows == channels and c.row_len == kh * kw  # one row per channel
    assert cs["classifier.weight"].role == "head" and cs["conv_head.weight"].role == "matrix"
    assert {n for n, c in cs.items() if c.role == "bn"} == set(roles_of(m, nn.BatchNorm2d))  # BatchNormAct2d too


def test_vit_qkv_is_a_matrix_layernorm_is_norm_embeddings_opt_in():
    m = model("vit_tiny_patch16_224")
    assert head_names(m) == ["head"]
    cs = select("vit_tiny_patch16_224")
    qkv = cs["blocks.0.attn.qkv.weight"]
    assert (qkv.role, qkv.shape, qkv.num_rows, qkv.row_len) == ("matrix", (576, 192), 576, 192)  # fused: 3*192 rows
    assert cs["patch_embed.proj.weight"].role == "matrix"  # the patch embedding is a conv
    assert cs["blocks.0.norm1.weight"].role == "norm" and cs["norm.weight"].role == "norm"
    assert {n for n, c in cs.items() if c.role == "norm"} == set(roles_of(m, nn.LayerNorm))
    assert cs["head.weight"].role == "head"
    assert "pos_embed" not in cs and "cls_token" not in cs  # default: embeddings are not layers of the bound
    assert not any(n.endswith("bias") for n in cs)
    clip = select("vit_tiny_patch16_224", embeddings="clip")
    assert clip["pos_embed"].role == "embed" and clip["cls_token"].role == "embed"
    assert clip["pos_embed"].kind == "diag" and clip["pos_embed"].radius == 3.0
    assert set(clip) - set(cs) == {"pos_embed", "cls_token"}
    no_norm = select("vit_tiny_patch16_224", norm_layers="none")
    assert set(cs) - set(no_norm) == {n for n, c in cs.items() if c.role == "norm"}
    scaled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, init_values=1e-5, depth=2)
    assert "blocks.0.ls1.gamma" in dict(scaled.named_parameters())
    picked = [c.name for c in select_constraints(scaled, head_names(scaled), "mars-pgm", 3.0, 11.0)]
    assert not any("gamma" in n for n in picked)  # LayerScale: free


def test_convnext_layernorm2d_is_norm_and_layerscale_is_free():
    m = model("convnext_atto")
    assert head_names(m) == ["head.fc"]
    cs = select("convnext_atto")
    assert cs["head.fc.weight"].role == "head"
    assert cs["head.norm.weight"].role == "norm"  # LayerNorm2d inside the head module, but not the classifier
    assert cs["stages.0.blocks.0.norm.weight"].role == "norm" and cs["stem.1.weight"].role == "norm"
    dw = cs["stages.0.blocks.0.conv_dw.weight"]
    assert dw.role == "matrix" and (dw.num_rows, dw.row_len) == (40, 49)
    assert not any(n.endswith("gamma") for n in cs)  # LayerScale: not constrained
    assert any(n.endswith("gamma") for n, _ in m.named_parameters())


# ---- groups, methods, errors ----------------------------------------------------------------------------------------
def test_groups_first_match_wins_and_none_frees():
    groups = [("layer1.*", None), ("layer2.0.conv1.weight", 2.0), ("layer2.*", 7.0), ("fc.*", 4.0),
              ("layer2.0.conv1.*", 99.0)]
    cs = select("resnet18", groups=groups)
    assert not any(n.startswith("layer1.") for n in cs)
    assert cs["layer2.0.conv1.weight"].radius == 2.0  # the first matching pattern wins over later ones
    assert cs["layer2.0.bn1.weight"].radius == 7.0 and cs["layer2.1.conv2.weight"].radius == 7.0
    assert cs["fc.weight"].radius == 4.0  # a group overrides the head radius too
    assert cs["layer3.0.conv1.weight"].radius == 3.0 and cs["conv1.weight"].radius == 3.0  # no match: defaults
    assert len(cs) == 41 - 8  # layer1: 2 blocks x (2 convs + 2 BNs)
    assert "layer2.0.conv1.bias" not in cs  # patterns never add parameters the policy excludes


@pytest.mark.parametrize("method, action, norm", [("mars-pgm", "project", "mars"), ("l2-pgm", "project", "l2"),
                                                  ("mars-sp", "penalty", "mars"), ("l2-sp", "penalty", "l2"),
                                                  ("none", "none", "mars")])
def test_methods_set_action_norm_and_penalty_weights(method, action, norm):
    cs = select("resnet18", method=method, penalty=0.01, head_penalty=0.5)
    assert set(cs) == set(select("resnet18"))  # every method (even "none") sees the same layers
    assert {(c.action, c.norm) for c in cs.values()} == {(action, norm)}
    assert cs["fc.weight"].weight == 0.5 and cs["conv1.weight"].weight == 0.01 and cs["bn1.weight"].weight == 0.01


def test_unknown_method_and_missing_head_are_errors():
    m = model("resnet18")
    with pytest.raises(ValueError, match="'mars-pgn'"):
        select_constraints(m, ["fc"], "mars-pgn", radius=1.0, head_radius=1.0)
    with pytest.raises(ValueError, match="head"):
        select_constraints(m, [], "mars-pgm", radius=1.0, head_radius=1.0)
    with pytest.raises(ValueError, match="global_pool"):
        select_constraints(m, ["global_pool"], "mars-pgm", radius=1.0, head_radius=1.0)


def test_frozen_parameters_and_stat_less_batchnorm_are_skipped():
    model_ = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                           nn.Linear(4, 2))
    model_[0].weight.requires_grad_(False)
    cs = select_constraints(model_, ["3"], "mars-pgm", radius=1.0, head_radius=1.0)
    assert [c.name for c in cs] == ["3.weight"]


def test_selected_efficientnet_projects_every_row_into_its_ball():
    """End to end on a real architecture: perturb every weight, project, measure — all within the radii."""
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    m.eval()
    cs = select_constraints(m, head_names(m), "mars-pgm", radius=2.0, head_radius=5.0)
    params = dict(m.named_parameters())
    anchors = [c.anchor_fragment(params[c.name].detach().view(-1), 0) for c in cs]
    torch.manual_seed(1)
    with torch.no_grad():
        for c in cs:
            params[c.name].add_(torch.randn(c.shape) * 0.3)
    frags = lambda: [Fragment(c, params[c.name].data.view(-1), a, 0) for c, a in zip(cs, anchors)]  # noqa: E731
    assert project(frags()) > 0
    for s in measure(frags()):
        assert s.distance <= s.radius * (1 + 1e-5), s
    before = {c.name: params[c.name].detach().clone() for c in cs}
    project(frags())  # idempotent: a second projection moves nothing
    assert all(torch.equal(params[n], w) for n, w in before.items())
