"""DELTA's pieces against independent statements: the feature term and the attention normalisation against float64
loops written from the paper / reference code, the attention measurement (output channel masked, batch replicated)
against the reference's own way (zero the conv's weight row, one forward per channel), the head's L2 penalty
against beta * W, and the layer choice on timm / HF models."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mars_dist.api import attach
from mars_dist.constraints.delta import channel_attention, feature_distance, fit_probe, probe_losses
from mars_dist.run.delta import Tap, choose_layers, measure_attention


def _reference_term(target, source, attention) -> float:
    """sum_j 1/2 sum_c C_j a_jc sum_positions (f - f0)^2 / N_j, per sample, then averaged over the batch."""
    total = 0.0
    for fm, fm0, a in zip(target, source, attention):
        fm, fm0, a = (t.detach().double().numpy() for t in (fm, fm0, a))
        b = fm.shape[0]
        for i in range(b):
            if fm.ndim == 4:  # (B, C, H, W)
                c, n = fm.shape[1], fm.shape[2] * fm.shape[3]
                per = [((fm[i, k] - fm0[i, k]) ** 2).sum() for k in range(c)]
            else:  # (B, N, C): tokens, the hidden size is the channel
                c, n = fm.shape[2], fm.shape[1]
                per = [((fm[i, :, k] - fm0[i, :, k]) ** 2).sum() for k in range(c)]
            total += 0.5 * sum(c * a[k] * per[k] / n for k in range(c)) / b
    return total


def test_feature_term_matches_float64_statement():
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 7, 8, generator=g)]
    source = [t + 0.3 * torch.randn(t.shape, generator=g) for t in target]
    attention = [torch.softmax(torch.randn(4, generator=g), 0), torch.softmax(torch.randn(8, generator=g), 0)]
    got = feature_distance([t.requires_grad_() for t in target], source, attention)
    assert math.isclose(float(got.detach()), _reference_term(target, source, attention), rel_tol=1e-5)
    got.backward()  # the gradient reaches the trained model's maps, not the source's
    assert target[0].grad is not None and source[0].grad is None


def test_attention_normalisation_matches_reference():
    increase = torch.tensor([0.3, -0.1, 0.05, 1.2, 0.0], dtype=torch.float64)
    js = increase.numpy()
    js = (js - np.mean(js)) / np.std(js)  # lixingjian/DELTA train.py, then F.softmax(cw / 5)
    want = np.exp(js / 5) / np.exp(js / 5).sum()
    np.testing.assert_allclose(channel_attention(increase, 5.0).numpy(), want, rtol=1e-6)
    assert torch.allclose(channel_attention(torch.ones(4)), torch.full((4,), 0.25))  # no spread: uniform


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, bias=False)  # no bias: zeroing its weight row zeroes the output channel
        self.block = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).mean((2, 3)))


def test_attention_measurement_matches_weight_row_masking():
    model = _Tiny().eval()
    with torch.no_grad():
        model.block[0].running_mean.uniform_(-0.2, 0.2)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 1])
    tap = Tap(model, ["conv", "block"])
    got = measure_attention(model, tap, model.head, images, labels, 3, rows=12, temperature=5.0)  # 3 per forward
    tap.remove()
    # the reference's way: fit the probe on the head's inputs, then zero one weight row per forward
    feats = {}
    model.head.register_forward_pre_hook(lambda _m, a: feats.__setitem__("z", a[0]))
    with torch.no_grad():
        model(images)
        probe = fit_probe(feats["z"], labels, 3)
        base = probe_losses(feats["z"], labels, probe)
        increase = []
        for j in range(6):
            saved = model.conv.weight[j].clone()
            model.conv.weight[j] = 0
            model(images)
            increase.append(float((probe_losses(feats["z"], labels, probe) - base).mean()))
            model.conv.weight[j] = saved
    inc = np.array(increase)
    z = (inc - inc.mean()) / inc.std()
    want = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5)
    assert got[1].shape == (5,)


def test_probe_is_fitted():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    w, b = fit_probe(x, y, 3, weight_decay=1e-2)
    w.requires_grad_(), b.requires_grad_()
    loss = nn.functional.cross_entropy(x.double() @ w.T + b, y) + 0.5e-2 * w.pow(2).sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-6 and float(b.grad.abs().max()) < 1e-6  # at the optimum


def test_head_l2_is_beta_times_weight():
    """The head's term beta/2 ||W||^2 arrives as the gradient beta * W (the engine's L2 penalty, head_penalty =
    beta/2); the backbone is left to the loss (no penalty, no projection)."""
    model = _Tiny()
    w0 = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = attach(model, opt, method="delta", delta={"beta": 0.2}, head=["head"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        want = w0[n] * (1 - 0.2) if n == "head.weight" else w0[n]
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7, msg=n)
    assert {c.action for c in handle.constraints if c.role != "head"} == {"none"}


def test_layers_auto_and_by_pattern(tmp_path):
    from mars_dist.models.factory import build_model, classifier_module_names
    from test_core_configs import write_hf_model

    lite0 = build_model("tf_efficientnet_lite0", "none", 3)
    assert choose_layers(lite0, [], classifier_module_names(lite0)) == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert choose_layers(lite0, ["blocks.5", "blocks.6"], ["classifier"]) == ["blocks.5", "blocks.6"]
    with pytest.raises(ValueError, match=r"constraint.delta.layers = \['nope\*'\]"):
        choose_layers(lite0, ["nope*"], ["classifier"])
    overrides = write_hf_model(tmp_path / "vit", "vit")
    vit = build_model(overrides[0].split("=", 1)[1], "none", 3)
    blocks = choose_layers(vit, [], classifier_module_names(vit))  # encoder.layer.N, or layers.N (transformers 5)
    assert len(blocks) == 2 and blocks[0][:-1] == blocks[1][:-1] and blocks[0].endswith("0")
    assert type(vit.get_submodule(blocks[0])).__name__ == "ViTLayer"


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_tap_catches_stage_outputs_under_activation_checkpointing(name):
    """timm's checkpoint_seq(blocks, flatten=True) (EfficientNet) calls a stage's children, never the stage: the
    tap must still catch the stage's output, the same as without checkpointing, in training and with a backward."""
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    layers = ["blocks.1", "blocks.2"]
    x = torch.randn(2, 3, 32, 32)
    caught = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        tap = Tap(model, layers)
        model(x).sum().backward()  # the backward recomputes checkpointed blocks: the caught maps stay those of forward
        maps = tap.take()
        tap.remove()
        assert len(maps) == 2 and all(m.requires_grad for m in maps), name
        caught.append(maps)
    for a, b in zip(*caught):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
