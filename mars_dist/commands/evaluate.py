"""`mars-dist eval EXPORT_OR_RUN_DIR [key=value ...]`: an export on the training config's test split (or any data
set given with data.* overrides), on one process or under `accelerate launch` (each rank a shard, gathered).

Accuracy, loss, per-class accuracy, expected calibration error (15 equal-width confidence bins), top-5 accuracy,
the confusion matrix as JSON and PNG. The preprocessing is the export's own (mars_dist.json: exactly the eval
transform of training), so on the training config's test split the numbers equal the trainer's test evaluation.
Data classes are matched to the model's by name: an evaluation set may hold a subset of the classes, in any order.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from mars_dist import config as config_mod
from mars_dist.models.export import find_export, load_export

ECE_BINS = 15


def eval_config(target: str | Path, overrides: list[str]) -> config_mod.Config:
    """The run's resolved config (export/training_config.yaml, else RUN/config.yaml) with `overrides` applied."""
    export = find_export(target)
    path = next((p for p in (export / "training_config.yaml", export.parent / "config.yaml") if p.is_file()), None)
    if path is None and not any(o.startswith("data.name=") for o in overrides):
        raise FileNotFoundError(f"{export}: no training config (training_config.yaml, or config.yaml in "
                                f"{export.parent}); name the data set with data.name=... (and data.path=...)")
    return config_mod.load(path, overrides)


def eval_dataset(cfg: config_mod.Config, split: str):
    """(HF dataset with `image`/`label`, class names, skipped files) of `split` of the config's data set. An image
    folder without train/ and test/ (only class folders) is evaluated whole."""
    from mars_dist.data.splits import build_splits

    root = Path(cfg.data.path) if cfg.data.path else None
    if cfg.data.name == "imagefolder" and root is not None and root.is_dir() and not (root / "test").is_dir() \
            and not (root / "train").is_dir():
        return _class_folders(root, cfg.data.on_bad_image)
    splits = build_splits(cfg.data.name, cfg.data.path, cfg.data.train_per_class, cfg.data.val_per_class,
                          cfg.data.val_fraction, cfg.data.test_limit, cfg.seed, cfg.data.on_bad_image)
    return getattr(splits, split), splits.class_names, splits.skipped


def _class_folders(root: Path, on_bad_image: str):
    """ROOT/<class>/**/<image>: every image, labelled by its class folder (sorted names, as datasets does)."""
    import datasets

    from mars_dist.data.splits import image_checker
    from mars_dist.commands.predict import collect_images

    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{root}: no class folders (expected {root}/<class>/<image>, or train/ and test/)")
    files = [(str(f), c) for c, name in enumerate(names) for f in collect_images([str(root / name)])]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [f for f, _ in files], "label": [c for _, c in files]}, features=feats)
    skipped: list[str] = []
    usable = image_checker(ds.cast_column("image", datasets.Image(decode=False)), "eval", on_bad_image, skipped)
    return ds.select([i for i in range(len(ds)) if usable(i)]), names, skipped


def label_map(data_names: list[str], model_names: list[str]) -> list[int]:
    """Model output index of each data class, by name; an error naming the classes the model does not know."""
    if list(data_names) == list(model_names):
        return list(range(len(model_names)))
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        raise ValueError(f"data classes {unknown[:8]} are not among the model's {len(model_names)} classes "
                         f"{model_names[:10]}{' ...' if len(model_names) > 10 else ''}")
    return [model_names.index(n) for n in data_names]


def metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], loss_sum: float) -> dict:
    """Accuracy, loss, top-5, ECE, per-class accuracy and the confusion matrix (rows true, columns predicted)."""
    n, k = logits.shape
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    hit = (pred == labels).float()
    bins = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    ece = 0.0
    for b in range(ECE_BINS):
        m = bins == b
        if m.any():
            ece += float(m.sum()) / n * abs(float(hit[m].mean()) - float(conf[m].mean()))
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {class_names[c]: {"n": int(confusion[c].sum()),
                                  "accuracy": int(confusion[c, c]) / int(confusion[c].sum())}
                 for c in range(k) if confusion[c].sum() > 0}
    top5 = float((logits.topk(min(5, k), -1).indices == labels[:, None]).any(-1).float().mean())
    return {"n": n, "accuracy": int(hit.sum()) / n, "loss": loss_sum / n, "top5_accuracy": top5, "ece": ece,
            "ece_bins": ECE_BINS, "mean_confidence": float(conf.mean()), "per_class": per_class,
            "class_names": list(class_names), "confusion": confusion.tolist()}


def plot_confusion(result: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(result["confusion"], dtype=torch.float64)
    names = result["class_names"]
    rows = cm.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    size = min(40.0, max(5.0, 0.35 * k + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow((cm / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 60:
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] / rows[i, 0] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tag(cfg: config_mod.Config, split: str) -> str:
    name = Path(cfg.data.path).resolve().name if cfg.data.name == "imagefolder" and cfg.data.path else cfg.data.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{split}")


def run_eval(target: str | Path, overrides: list[str] = (), split: str = "test",
             output_dir: str | Path | None = None) -> dict:
    """Evaluate the export of `target` (an export or run directory); the main process writes
    OUTPUT_DIR/eval_<data>-<split>.json and confusion_<data>-<split>.png (default OUTPUT_DIR: RUN/eval, or
    EXPORT/eval for a lone export). Returns the metrics on every process."""
    from tqdm.auto import tqdm

    from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
    from mars_dist.data.loader import build_loader
    from mars_dist.run.loop import gathered_batches
    from mars_dist.sharding.accelerate_setup import make_accelerator

    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is not one of train, val, test")
    cfg = eval_config(target, list(overrides))
    accelerator = make_accelerator(1, "no", None)
    exported = load_export(target, device=accelerator.device)
    ds, data_names, skipped = eval_dataset(cfg, split)
    if len(ds) == 0:
        raise ValueError(f"data '{cfg.data.name}' ({cfg.data.path or ''}): the {split} split has no images")
    if not exported.labelled and len(data_names) == len(exported.class_names):
        print(f"mars-dist eval: {exported.path} records no class names; taking the data's {len(data_names)} classes "
              f"in label order ({', '.join(data_names[:5])}...)", file=sys.stderr)
        exported.class_names = list(data_names)
    mapping = torch.tensor(label_map(data_names, exported.class_names))
    loader = build_loader(ImageClassificationDataset(ds, build_transforms(exported.data_config, train=False)),
                          cfg.data, cfg.train.batch_size, cfg.seed, device=accelerator.device, say=accelerator.print)
    loader = accelerator.prepare_data_loader(loader)  # the loader alone (also under DeepSpeed): shards
    all_logits, all_labels, loss_sum = [], [], 0.0
    batches = tqdm(loader, desc="eval", disable=not accelerator.is_main_process)
    for logits, y, loss in gathered_batches(exported.model, batches, accelerator,
                                            labels=lambda y: mapping.to(y.device)[y]):  # the trainer's own pass
        loss_sum += float(loss.sum())
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    result = metrics(torch.cat(all_logits), torch.cat(all_labels), exported.class_names, loss_sum)
    result.update({"export": str(exported.path.resolve()), "data": {"name": cfg.data.name, "path": cfg.data.path,
                                                                  "split": split, "skipped_images": skipped},
                   "processes": accelerator.num_processes})
    if accelerator.is_main_process:
        run_dir = exported.path.parent if (exported.path.parent / "config.yaml").is_file() else None
        out = Path(output_dir) if output_dir else (run_dir or exported.path) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        tag = _tag(cfg, split)
        (out / f"eval_{tag}.json").write_text(json.dumps(result, indent=1))
        plot_confusion(result, out / f"confusion_{tag}.png",
                       f"{tag}: accuracy {result['accuracy']:.4f} on {result['n']} images")
        result["files"] = [str(out / f"eval_{tag}.json"), str(out / f"confusion_{tag}.png")]
        print(f"{tag}: accuracy {result['accuracy']:.4f} ({round(result['accuracy'] * result['n'])}/{result['n']}), "
              f"loss {result['loss']:.4f}, top-5 {result['top5_accuracy']:.4f}, ECE {result['ece']:.4f}; "
              f"wrote {out / f'eval_{tag}.json'} and {out / f'confusion_{tag}.png'}")
    accelerator.wait_for_everyone()
    return result
