"""DELTA as a term of the training loss (`constraint.method: delta`; the math: mars_dist/constraints/delta.py).

`build_regulariser(run)` returns what the trainer adds to its loss: `regulariser(inputs)` after the model's forward
on `inputs`. For DELTA it runs the frozen pretrained model (mars_dist/sharding/frozen.py: whole per rank, partitioned
under ZeRO-3) on the same inputs and returns alpha x the attention-weighted distance between the feature maps the
forward hooks caught on both models. The head's beta/2 ||W||^2 is not here: it is the L2 penalty gradient the
constraint engine adds to the head's (sharded) weights before every update (api/core.attach).

The channel attention is measured once, before the first update, on every rank alike (the first
`attention_samples` images of the seeded training split, evaluation transforms, a float64 probe): it depends on
the seed, the data and the pretrained weights only, so a resume recomputes the same weights instead of storing
them (written to <output_dir>/delta_attention.json for inspection).
"""

from __future__ import annotations

import fnmatch
import json
import re
import time

import torch
from torch import nn

from mars_dist.constraints.delta import (channel_attention, channel_count, feature_distance, fit_probe,
                                         probe_losses)
from mars_dist.models.factory import HFClassifier

_HF_BLOCK = re.compile(r"(.*\.)?(layer|layers|stages|blocks|block)\.\d+$")
AUTO_LAYERS = 4


def no_regulariser(_inputs) -> float:
    return 0.0


def choose_layers(model: nn.Module, patterns: list[str], head: list[str]) -> list[str]:
    """Module names whose outputs are the feature maps: those matching `patterns` (constraint.delta.layers), else
    the last AUTO_LAYERS stage outputs (timm's feature_info; a HF model's outermost numbered encoder blocks)."""
    names = [n for n, _ in model.named_modules() if n and not any(n == h or n.startswith(h + ".") for h in head)]
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(f"constraint.delta.layers = {patterns!r} matches no module of {type(model).__name__}; "
                             f"modules are named like {', '.join(names[:3])}, ..., {names[-1]}")
        return chosen
    if not isinstance(model, HFClassifier) and getattr(model, "feature_info", None) is not None:
        chosen = [f["module"] for f in model.feature_info]  # timm: a list of dicts on a built model
    else:
        blocks = [n for n in names if _HF_BLOCK.match(n)]
        depth = min((n.count(".") for n in blocks), default=0)
        chosen = [n for n in blocks if n.count(".") == depth]
    chosen = [n for n in chosen if n in set(names)]
    if not chosen:
        raise ValueError(f"DELTA: no stage outputs found in {type(model).__name__}; name the layers in "
                         f"constraint.delta.layers (fnmatch patterns on module names)")
    return chosen[-AUTO_LAYERS:]


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    first = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    return first


def _output_module(module: nn.Module) -> nn.Module:
    """The module whose output IS `module`'s output: the last child of a Sequential, recursively. Activation
    checkpointing may call a stage's children without calling the stage (timm's `checkpoint_seq(blocks,
    flatten=True)` in EfficientNet / MobileNet), so a hook on the stage itself would never fire."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


class Tap:
    """Forward hooks catching the outputs of `layers` of `model`; with `mask` set, channel masked[r] of replica r
    (of `replicas` copies of the batch) is zeroed in the output of `mask_layer` (the attention measurement)."""

    def __init__(self, model: nn.Module, layers: list[str]):
        self.layers, self.caught = layers, {}
        self.mask_layer, self.masked = None, None
        self._handles = [_output_module(model.get_submodule(n)).register_forward_hook(self._hook(n)) for n in layers]

    def _hook(self, name: str):
        def hook(_module, _args, output):
            if name == self.mask_layer and self.masked is not None:
                output = self._zero_channels(output)
            self.caught[name] = _first_tensor(output)
            return output
        return hook

    def _zero_channels(self, output):
        t = _first_tensor(output)
        c = channel_count(t)
        keep = torch.ones(len(self.masked), c, dtype=t.dtype, device=t.device)
        keep[torch.arange(len(self.masked)), self.masked] = 0
        keep = keep.repeat_interleave(t.shape[0] // len(self.masked), 0)
        t = t * (keep[:, :, None, None] if t.dim() == 4 else keep[:, None, :] if t.dim() == 3 else keep)
        return t if isinstance(output, torch.Tensor) else (t, *output[1:]) if isinstance(output, tuple) else output

    def take(self) -> list[torch.Tensor]:
        maps, self.caught = [self.caught[n] for n in self.layers], {}
        return maps

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def measure_attention(source, tap: Tap, head: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      num_classes: int, rows: int, temperature: float) -> list[torch.Tensor]:
    """The reference's attention: fit a probe on the pretrained features, then per channel of each layer the mean
    increase of its loss when that channel is zeroed, standardised and softmaxed (constraints/delta.py)."""
    caught = {}
    handle = head.register_forward_pre_hook(lambda _m, args: caught.__setitem__("z", args[0].detach()))
    try:
        with torch.no_grad():
            source(images)
            z = caught["z"]
            probe = fit_probe(z, labels, num_classes)
            base = probe_losses(z, labels, probe)
            widths = [channel_count(m) for m in tap.take()]
            out = []
            for name, width in zip(tap.layers, widths):
                increase = torch.zeros(width, dtype=torch.float64)
                per = max(1, rows // len(images))
                for start in range(0, width, per):
                    chans = torch.arange(start, min(start + per, width))
                    tap.mask_layer, tap.masked = name, chans
                    source(images.repeat(len(chans), *[1] * (images.dim() - 1)))
                    tap.take()
                    loss = probe_losses(caught["z"], labels.repeat(len(chans)), probe).view(len(chans), -1)
                    increase[chans] = (loss - base).mean(1)
                out.append(channel_attention(increase, temperature))
    finally:
        tap.mask_layer = tap.masked = None
        handle.remove()
    return out


class DeltaLoss:
    """alpha x the attention-weighted feature distance between the model just run and the frozen source."""

    def __init__(self, accelerator, source, target_tap: Tap, source_tap: Tap, attention, alpha: float):
        self.accelerator, self.source, self.alpha = accelerator, source, alpha
        self.target_tap, self.source_tap = target_tap, source_tap
        self.attention = [a.to(accelerator.device) for a in attention]
        self.last = 0.0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            self.source.forward(inputs)
        term = self.alpha * feature_distance(self.target_tap.take(), self.source_tap.take(), self.attention)
        self.last = float(term.detach())
        return term


def build_regulariser(run):
    """The loss term for `run` (a run/train.FineTune after its attach phase): DELTA's, or none."""
    cfg, acc = run.cfg, run.accelerator
    if cfg.constraint.method != "delta":
        return no_regulariser
    from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
    from mars_dist.models.factory import build_model, classifier_module_names
    from mars_dist.sharding.accelerate_setup import input_dtype
    from mars_dist.sharding.frozen import build_frozen_source

    d = cfg.constraint.delta
    build = lambda placement: build_model(cfg.model.name, cfg.model.pretrained, run.num_classes,  # noqa: E731
                                          source=cfg.model.source, placement=placement, head_seed=cfg.seed)
    source = build_frozen_source(acc, build, max(cfg.train.batch_size, d.attention_rows))
    target = acc.unwrap_model(run.net)
    target = getattr(target, "module", target)  # a DeepSpeed engine's model
    layers = choose_layers(source.module, d.layers, classifier_module_names(source.module))
    source_tap, target_tap = Tap(source.module, layers), Tap(target, layers)
    ds = ImageClassificationDataset(run.splits.train, build_transforms(run.data_cfg, train=False))
    items = [ds[i] for i in range(min(d.attention_samples, len(ds)))]
    cast = input_dtype(acc) or torch.float32
    images = torch.stack([x for x, _ in items]).to(acc.device, cast)
    labels = torch.tensor([y for _, y in items])
    head = source.module.get_submodule(classifier_module_names(source.module)[0])
    start = time.perf_counter()
    attention = measure_attention(source.forward, source_tap, head, images, labels, run.num_classes,
                                  d.attention_rows, d.temperature)
    acc.print(f"DELTA: source model {source.placement} ({source.local_bytes / 2**20:.1f} MiB of parameters on this "
              f"rank); feature layers {', '.join(layers)}; attention from {len(items)} images in "
              f"{time.perf_counter() - start:.1f} s")
    if acc.is_main_process:
        (run.out / "delta_attention.json").write_text(json.dumps(
            {"layers": layers, "attention": [a.tolist() for a in attention]}))
    return DeltaLoss(acc, source, target_tap, source_tap, attention, d.alpha)
