"""The end of a run: test and train accuracy, the export (fp32 masters), its certificate against the pretrained
weights from their source, the model card, the tracker's summary. With an EMA (`ema.decay`) the same is done twice:
the trained weights into export_raw/ (summary: `raw`), then the EMA swapped into the masters into export/ (the
summary's top level: what export/ holds)."""

from __future__ import annotations

from mars_dist.commands.certify import certify_export
from mars_dist.models.export import export_model
from mars_dist.models.factory import build_model
from mars_dist.data.loader import release_workers
from mars_dist.run.card import ema_text, write_model_card
from mars_dist.run.loop import evaluate
from mars_dist.run.tracking import layer_metrics
from mars_dist.sharding.accelerate_setup import full_state_dict, model_placement

RAW_EXPORT = "export_raw"


def finish_run(run) -> dict:
    """`run`: the FineTune after `fit`. Collectives first (evaluation, the fp32 state), then the main process
    writes. Returns the summary on every process."""
    acc, ema = run.accelerator, getattr(run, "ema", None)
    if ema is None:
        result, stats = _evaluate_and_export(run, "export")
    else:
        raw, _ = _evaluate_and_export(run, RAW_EXPORT, ema=ema)
        with ema.applied():
            result, stats = _evaluate_and_export(run, "export", ema=ema, raw=raw)
        result["raw"] = {k: raw[k] for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "bound_C",
                                             "certificate") if k in raw} | {"export": RAW_EXPORT}
    run.tracker.log({"test/accuracy": result["test_accuracy"], "test/loss": result["test_loss"]}, run.step)
    run.tracker.finish(stats, result, export_dir=run.out / "export")  # + the export as a W&B model artifact
    acc.print(f"test accuracy {result['test_accuracy']:.4f} on {result['test_images']} images "
              f"(chance {1 / run.num_classes:.3f}){' (EMA weights)' if ema is not None else ''}")
    acc.wait_for_everyone()
    acc.end_training()
    release_workers(*run.loaders.values())
    return result


def _evaluate_and_export(run, folder: str, ema=None, raw: dict | None = None) -> tuple[dict, list]:
    """Evaluate the weights the model holds now, export and certify them into run.out / folder."""
    acc = run.accelerator
    test = evaluate(run.net, run.loaders["test"], acc, run.cast)
    fit = evaluate(run.net, run.loaders["fit"], acc, run.cast)
    stats = run.constrained.stats()
    result = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_images": test["n"],
              "train_accuracy": fit["accuracy"], "train_loss": fit["loss"],
              "val_accuracy": run.last_eval.get("accuracy"), "updates": run.step, "chance": 1.0 / run.num_classes,
              "bound_C": layer_metrics(stats)["bound/C"]}
    if ema is not None:
        result["ema"] = {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.updates,
                         "bytes_per_rank": ema.bytes_per_rank(), "weights": "ema" if raw is not None else "raw"}
    full_state = full_state_dict(acc, run.net)  # fp32 masters, also after bf16 training
    if acc.is_main_process:
        _export_and_certify(run, full_state, result, stats, folder, raw)
    del full_state
    return result, stats


def _export_and_certify(run, full_state: dict, result: dict, stats, folder: str, raw: dict | None) -> None:
    cfg, acc, out = run.cfg, run.accelerator, run.out
    whole = model_placement(acc, whole=True)  # one rank: never a partitioned build here
    export = build_model(cfg.model.name, "none", run.num_classes, source=cfg.model.source, placement=whole)
    export.load_state_dict(full_state)
    export_model(export, out / folder, cfg.model.name, run.num_classes, cfg.model.source,
                 data_config=run.data_cfg, class_names=run.splits.class_names)
    # against the pretrained weights from their source, with the radii the run ended with (learned: mars-ftp)
    certificate = certify_export(out / folder, radii={s.name: s.radius for s in stats}, placement=whole)
    result["certificate"] = certificate.summary()
    acc.print(f"certify {folder}/: {certificate.lines()[-1]}")
    extra = ema_text(cfg, result, raw) if "ema" in result else ""
    write_model_card(out / folder, cfg, result, stats, acc, certificate=certificate, extra=extra)  # README.md
