"""DELTA's math, pure (no model, no process group): the attention-weighted feature-map distance, the channel
attention from the loss increases, and the linear probe those increases are measured with.

DELTA (Li, Xiong, Wang, Huan, Chen, ICLR 2019, "DELTA: Deep Learning Transfer using Feature Map with Attention for
Convolutional Networks") adds to the task loss

    alpha * Omega'(w) + beta * Omega''(w),
    Omega'  = sum_j 1/2 sum_c C_j a_jc ||FM_jc(w, x) - FM_jc(w0, x)||^2 / N_j        (per sample)
    Omega'' = 1/2 ||W_head||^2

FM_j is the output of the j-th chosen layer of the model being trained (w) and of the frozen pretrained model (w0),
C_j its channel count, N_j its spatial size (h*w; tokens for a transformer block), a_j the channel attention.
Followed: the authors' code, github:lixingjian/DELTA `train.py` (`reg_att_fea_map`, `reg_classifier`, the
attention normalisation after `json.load(open(args.channel_wei))`) and `channel_eval.py` (`train_classifier`,
`feature_weight`), and tllib (github:thuml/Transfer-Learning-Library) `tllib/regularization/delta.py`
(`AttentionBehavioralRegularization`, `L2Regularization`) with `examples/task_adaptation/image_classification/
delta.py` (`calculate_channel_attention`). Deviations (docs/constraints.md, 'DELTA'):
- Omega' is averaged over the micro-batch (the references sum it): with a sum, a 2-process run would not equal the
  one-process run on the same images (the gradients are averaged across ranks). alpha here = alpha_ref x batch.
- The attention masks channel c of the chosen layer's OUTPUT (the reference zeroes output row c of that layer's
  conv weight, its `.weight[j]`; the chosen layers here are stage outputs, which have no weight of their own).
- The probe is fitted on the frozen pretrained features in eval mode by full-batch L-BFGS in float64 (the reference:
  10 epochs of SGD on the head, BatchNorm in train mode), so that every rank and world size fits the same probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def as_channels(fm: torch.Tensor) -> torch.Tensor:
    """A feature map as (batch, channels, positions): (B, C, H, W) conv maps, (B, N, C) token sequences
    (transformer blocks: the hidden size is the channel), (B, C) vectors."""
    if fm.dim() == 4:
        return fm.flatten(2)
    if fm.dim() == 3:
        return fm.transpose(1, 2)
    if fm.dim() == 2:
        return fm.unsqueeze(-1)
    raise ValueError(f"a feature map of shape {tuple(fm.shape)}: DELTA takes (B, C, H, W), (B, N, C) or (B, C)")


def channel_count(fm: torch.Tensor) -> int:
    return as_channels(fm).shape[1]


def feature_distance(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor],
                     attention: Sequence[torch.Tensor]) -> torch.Tensor:
    """Omega' averaged over the batch: mean_b sum_j 1/2 sum_c C_j a_jc ||FM_jc - FM0_jc||^2 / N_j, in fp32.

    The source maps carry no gradient (detached here too, as the references do)."""
    total = None
    for fm, fm0, a in zip(target, source, attention, strict=True):
        d = as_channels(fm).float() - as_channels(fm0).detach().float()
        _, c, n = d.shape
        per_channel = d.pow(2).sum(-1)  # (B, C): ||FM_c - FM0_c||^2
        term = 0.5 * c / n * (per_channel * a.to(per_channel)).sum(-1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("DELTA: no feature layer")
    return total


def channel_attention(increase: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    """The reference's weights from the mean loss increase per masked channel: standardised (numpy's std, the
    population one), then softmax(z / temperature). A layer whose channels all matter equally gets uniform weights."""
    inc = increase.double()
    std = inc.std(unbiased=False)
    z = (inc - inc.mean()) / std if std > 0 else torch.zeros_like(inc)
    return torch.softmax(z / temperature, dim=0).float()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
              iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear classifier (W, b) on frozen features, softmax cross-entropy + weight_decay/2 ||W||^2, fitted by
    full-batch L-BFGS in float64: deterministic, the same on every rank for the same features."""
    x, y = features.detach().double().flatten(1), labels.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_losses(features: torch.Tensor, labels: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor]
                 ) -> torch.Tensor:
    """Per-sample cross-entropy of the probe, float64."""
    w, b = probe
    return F.cross_entropy(features.detach().double().flatten(1) @ w.T + b, labels.long(), reduction="none")
