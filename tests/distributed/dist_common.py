"""Shared by the 2-process workers and the tests: tiny real timm models, fixed data, the single-process reference.

A case names a model, a method and the knobs of one sharded run (tests/distributed/test_*.py assert on what the workers
write). The models are real timm architectures kept tiny, with row counts that do NOT divide the world size (ViT
width 45, qkv/fc1 135 rows, head 5 rows), so ZeRO-3 / FSDP2 cut rows and leave empty shards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mars_dist.constraints import Fragment, identity_reduce, measure, select_constraints  # noqa: E402

WORLD, ACCUM, MICRO, UPDATES, IMG = 2, 2, 2, 4, 32
LR = 1e-3
EPS = 1e-6
BOUND_RTOL = 5e-5  # W0 + D * s rounds in fp32: a clipped row's norm lands within a few 1e-6 of the radius
ATOL = {"vit": 1e-6, "effnet": 5e-6, "hf_vit": 1e-6, "hf_resnet": 5e-6}
"""Equivalence tolerance. The EfficientNet case has one BN-bias element whose four micro-batch gradients cancel to
1e-4 of their size; AdamW normalises what is left, so ulp-level differences elsewhere move it by ~2.4e-6."""

CASES = {
    # name: model, method, param groups, ZeRO-3 sub_group_size, ZeRO-3 persistence threshold, bf16, bn_mode, mode
    "pgm": dict(model="vit", method="mars-pgm"),
    "pgm_2groups": dict(model="vit", method="mars-pgm", groups=2),
    "pgm_subgroups": dict(model="vit", method="mars-pgm", sub_group_size=20000, persistence=500),
    "l2pgm": dict(model="vit", method="l2-pgm"),
    "marssp": dict(model="vit", method="mars-sp"),
    "l2sp_2groups": dict(model="vit", method="l2-sp", groups=2),
    "l2sp_subgroups": dict(model="vit", method="l2-sp", sub_group_size=20000, persistence=500),
    "gather": dict(model="vit", method="mars-pgm", mode="gather", sub_group_size=20000, persistence=500),
    "gather_sp": dict(model="vit", method="mars-sp", mode="gather"),
    "eff_pgm": dict(model="effnet", method="mars-pgm"),
    "eff_bntrain": dict(model="effnet", method="mars-pgm", bn_mode="train"),
    # Hugging Face image classifiers built from a local config (LayerNorm and BatchNorm)
    "hf_vit_pgm": dict(model="hf_vit", method="mars-pgm"),
    "hf_resnet_pgm": dict(model="hf_resnet", method="mars-pgm"),
    "bf16_pgm": dict(model="vit", method="mars-pgm", bf16=True, persistence=500),
    # learned radii: the radius gradients are partial sums in the pre-step hook (per group when there are several)
    "ftp": dict(model="vit", method="mars-ftp"),
    "ftp_2groups": dict(model="vit", method="mars-ftp", groups=2),
    "ftp_subgroups": dict(model="vit", method="mars-ftp", sub_group_size=20000, persistence=500),
    "eff_ftp": dict(model="effnet", method="mars-ftp"),
    # SPD: pre-step partial sums (per group when there are several) reduced with the post-step ones
    "spd": dict(model="vit", method="spd"),
    "spd_2groups": dict(model="vit", method="spd", groups=2),
    "spd_subgroups": dict(model="vit", method="mars-spd", sub_group_size=20000, persistence=500),
    "eff_spd": dict(model="effnet", method="spd"),
    "hf_vit_spd": dict(model="hf_vit", method="mars-spd"),
    # ZeRO-1 + bf16 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer instead of the ZeRO-1/2 optimizer
    "bf16_fp32acc": dict(model="vit", method="mars-pgm", bf16=True, fp32_accum=True),
    # ZeRO-Offload: fp32 masters and the (torch) optimizer step on the CPU, offload_optimizer: {device: cpu}
    "offload_none": dict(model="vit", method="none", offload=True),
    "offload_pgm": dict(model="vit", method="mars-pgm", offload=True),
    "offload_pgm_2groups": dict(model="vit", method="mars-pgm", groups=2, offload=True),
    "offload_pgm_subgroups": dict(model="vit", method="mars-pgm", sub_group_size=20000, persistence=500,
                                  offload=True),
    "offload_marssp": dict(model="vit", method="mars-sp", offload=True),
    "offload_bf16_pgm": dict(model="vit", method="mars-pgm", bf16=True, persistence=500, offload=True),
}
DEFAULTS = dict(groups=1, sub_group_size=1_000_000_000, persistence=100_000, bf16=False, fp32_accum=False,
                bn_mode="eval", mode="sharded", offload=False)
# stage -> (cases, case to checkpoint and resume); FSDP2 is the key "fsdp2"
LAUNCHES = {
    1: (["pgm_2groups", "l2sp_2groups", "eff_pgm", "bf16_fp32acc", "ftp_2groups", "spd_2groups"], None),
    2: (["pgm", "gather", "marssp", "bf16_pgm", "ftp", "eff_spd", "hf_vit_spd"], None),
    3: (["pgm", "pgm_subgroups", "l2pgm", "marssp", "l2sp_subgroups", "gather", "gather_sp", "eff_pgm", "eff_bntrain",
         "bf16_pgm", "ftp_subgroups", "eff_ftp", "spd_subgroups"], "pgm_subgroups"),
    "fsdp2": (["pgm", "l2pgm", "marssp", "gather", "gather_sp", "eff_pgm", "eff_bntrain", "hf_vit_pgm",
               "hf_resnet_pgm", "ftp", "eff_ftp", "spd", "eff_spd"], "pgm"),
    # ZeRO-Offload, one launch per stage (the cases add offload_optimizer: cpu to the stage's config)
    "offload1": (["offload_pgm_2groups", "offload_bf16_pgm"], None),
    "offload2": (["offload_none", "offload_pgm", "offload_marssp"], None),
    "offload3": (["offload_none", "offload_pgm", "offload_pgm_subgroups", "offload_marssp", "offload_bf16_pgm"],
                 "offload_pgm_subgroups"),
}
LAUNCH_CONFIGS = {"offload1": "zero1", "offload2": "zero2", "offload3": "zero3_offload"}  # else zero{key}.yaml

HEADS = {"vit": ["head"], "effnet": ["classifier"], "hf_vit": ["hf_model.classifier"],
         "hf_resnet": ["hf_model.classifier"]}
RADII = {"vit": (0.06, 0.5), "effnet": (0.05, 0.5), "hf_vit": (0.06, 0.5), "hf_resnet": (0.05, 0.5)}
PENALTY = {"mars-sp": 3e-3, "l2-sp": 3e-1}


def case(name: str) -> dict:
    return {**DEFAULTS, **CASES[name], "name": name}


def build_model(kind: str) -> torch.nn.Module:
    """The same 'pretrained' weights on every rank and in the reference (seeded init stands in for them)."""
    import timm

    torch.manual_seed(0)
    if kind == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8,
                                 embed_dim=45, depth=2, num_heads=3, mlp_ratio=3, num_classes=5,
                                 qkv_bias=False)  # a key bias has zero gradient: Adam would amplify fp noise
    if kind == "effnet":
        return timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    if kind.startswith("hf_"):
        from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

        from mars_dist.models.factory import HFClassifier

        cfg = (ViTConfig(hidden_size=45, num_hidden_layers=2, num_attention_heads=3, intermediate_size=135,
                         image_size=IMG, patch_size=8, num_labels=5, qkv_bias=False) if kind == "hf_vit" else
               ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], layer_type="basic", num_labels=5))
        return HFClassifier(AutoModelForImageClassification.from_config(cfg))
    raise ValueError(kind)


def constraints_for(model: torch.nn.Module, c: dict):
    radius, head_radius = RADII[c["model"]]
    pen = PENALTY.get(c["method"], 0.0)
    return select_constraints(model, HEADS[c["model"]], c["method"], radius, head_radius, pen, pen,
                              norm_layers="clip", embeddings="clip")


def make_optimizer(model: torch.nn.Module, groups: int) -> torch.optim.Optimizer:
    """AdamW; with groups=2 the usual decay / no-decay split (two flat partitions under ZeRO-1/2).

    eps=1e-6 rather than 1e-8: Adam divides by sqrt(v) + eps, so with a tiny eps an element whose true gradient is
    ~0 (a dead channel) moves by +-lr on pure rounding noise, and two exact-in-math runs that only sum in another
    order differ by up to ~1e-5 there. A larger eps keeps that noise below the 1e-6 the tests check.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if groups == 1:
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.01, eps=EPS)
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=LR, weight_decay=0.01,
                             eps=EPS)


def data(seed: int = 1):
    """x[u, rank, micro] is the micro-batch of `rank` at micro-step `micro` of update u."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(UPDATES, WORLD, ACCUM, MICRO, 3, IMG, IMG, generator=g)
    y = torch.randint(0, 5, (UPDATES, WORLD, ACCUM, MICRO), generator=g)
    return x, y


def set_train_mode(model: torch.nn.Module, bn_mode: str) -> None:
    model.train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def max_ratios(constraints, weights: dict, pretrained: dict) -> dict:
    """Per constrained parameter: distance / radius on whole weights (the bound holds iff <= 1)."""
    frags = []
    for c in constraints:
        w = weights[c.name].detach().float().reshape(-1)
        frags.append(Fragment(c, w, c.anchor_fragment(pretrained[c.name].float().reshape(-1), 0), 0))
    out = {}
    for c, s in zip(constraints, measure(frags, identity_reduce)):
        if c.radius is None or c.action != "project":
            continue
        dist = s.frobenius if (c.norm == "l2" and c.kind == "rows") else s.distance
        # W0 + s D rounds to fp32: up to 2^-24 |w| per element, which matters next to a tiny (learned) radius
        out[c.name] = dist / (c.radius + 2.0 ** -23 * s.layer_norm)
    return out


def bf16_excess(constraints, forward: dict, masters: dict, pretrained: dict) -> float:
    """How far bf16 forward weights exceed the radius, in units of what bf16 rounding allows: forward =
    bf16(master) moves each element by at most 2^-9 |master|, so a row may exceed the radius by
    2^-9 * ||master_row||_1 (the bound holds exactly on the fp32 master). <= 1 means rounding explains it all."""
    worst = float("-inf")
    for c in constraints:
        if c.action != "project" or c.norm != "mars":
            continue
        rows = c.num_rows
        w0 = pretrained[c.name].float() if c.centered else torch.zeros_like(masters[c.name])
        d = (forward[c.name] - w0).reshape(rows, -1).abs().sum(1)
        allow = 2.0 ** -9 * masters[c.name].reshape(rows, -1).abs().sum(1)
        worst = max(worst, float(((d - c.radius * (1 + BOUND_RTOL)) / (allow + 1e-30)).max()))
    return worst


def reference_run(name: str) -> dict[str, torch.Tensor]:
    """The single-process run the sharded ones must reproduce: same model, data, constraints, optimizer; the mean
    over all WORLD * ACCUM micro-batches per update (what DeepSpeed / FSDP2 compute), projection by the
    ReplicatedBackend hook."""
    from mars_dist.run.hook import ProjectionHook
    from mars_dist.sharding import ReplicatedBackend

    c = case(name)
    model = build_model(c["model"])
    constraints = constraints_for(model, c)
    opt = make_optimizer(model, c["groups"])
    hook = ProjectionHook(ReplicatedBackend(constraints, model, opt))
    x, y = data()
    set_train_mode(model, c["bn_mode"])
    params = [p for p in model.parameters() if p.requires_grad]
    for u in range(UPDATES):
        total = [torch.zeros_like(p) for p in params]
        for m in range(ACCUM):
            # ZeRO-2/3 and FSDP2 reduce every micro-step and accumulate the averages: sum over m of the rank mean.
            # Summing in that order keeps fp32 association noise out of the comparison (AdamW amplifies it where
            # gradients cancel).
            per_rank = []
            for r in range(WORLD):
                (F.cross_entropy(model(x[u, r, m]), y[u, r, m]) / ACCUM).backward()
                per_rank.append([p.grad.clone() for p in params])
                opt.zero_grad()
            for i in range(len(params)):
                total[i] += sum(g[i] for g in per_rank) / WORLD
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
        opt.zero_grad()
    assert hook.updates == (UPDATES if c["method"] != "none" else 0)  # method none: no hook
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def free_port() -> int:
    from launch_helpers import free_port as port  # one port policy for every launch (see there)

    return port()


def worker_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return env
