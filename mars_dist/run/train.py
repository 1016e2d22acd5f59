"""The fine-tuning loop: reads top to bottom. Distributed details live in accelerate and mars_dist.sharding; the
loop only asks `accelerator.is_main_process` and `accelerator.sync_gradients`."""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mars_dist.run import checkpoint as ckpt
from mars_dist.run import elastic
from mars_dist.run import learned_radii
from mars_dist.run import resume_guard
from mars_dist.run.card import write_model_card
from mars_dist.commands.certify import certify_export
from mars_dist.config import Config, save, to_dict
from mars_dist.constraints import select_constraints, summary
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
from mars_dist.data.splits import build_splits
from mars_dist.run.hook import ProjectionHook
from mars_dist.data.loader import build_loader
from mars_dist.models.export import export_model
from mars_dist.models.factory import build_model, classifier_module_names, resolve_data_config
from mars_dist.run.optim import build_optimizer, build_scheduler
from mars_dist.sharding import PretrainedWeights, build_backend, zero_from_torch, zero_universal
from mars_dist.sharding.accelerate_setup import (adapt_to_precision, full_state_dict, input_dtype, make_accelerator,
                                                 model_placement)
from mars_dist.run.tracking import Tracker, layer_metrics

EXIT_PREEMPTED = 99


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stops and the last checkpoint stays as it was."""


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class _StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's preemption warning): checkpoint at the next update, then exit 99."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.raised = True


def updates_per_epoch(batches: int, processes: int, grad_accum: int) -> int:
    """Optimizer updates in one epoch of `batches` (the unsharded loader's length, drop_last): each process gets
    batches // processes of them (accelerate drops the incomplete last round), and accelerate's `accumulate` ends
    the epoch with a partial update over the remainder (sync at end_of_dataloader), hence the ceil. 0 when one
    process sees fewer micro-batches than one whole update: refused."""
    per_process = batches // processes
    return 0 if per_process < grad_accum else math.ceil(per_process / grad_accum)


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict:
    model.eval()
    cast = input_dtype(accelerator)
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        logits = model(x if cast is None else x.to(cast))
        loss = F.cross_entropy(logits.float(), y, reduction="none")  # per sample: gather_for_metrics then drops
        logits, y, loss = accelerator.gather_for_metrics((logits, y, loss))  # the samples padding the last batch
        correct += int((logits.argmax(-1) == y).sum())
        total += int(y.numel())
        loss_sum += float(loss.sum())
    return {"accuracy": correct / max(1, total), "loss": loss_sum / max(1, total), "n": total}


def _set_train_mode(model, bn_mode: str) -> None:
    model.train()
    if bn_mode == "eval":  # frozen running statistics (and no batch-size dependence between world sizes)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def train(cfg: Config) -> dict:
    accelerator = make_accelerator(cfg.train.grad_accum, cfg.train.mixed_precision, cfg.train.grad_clip,
                                   cfg.train.collective_timeout_s, micro_batch=cfg.train.batch_size)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    stop = _StopFlag()
    resume_from = ckpt.resolve_resume(cfg.resume, out, accelerator.print)  # a bad path fails now, before heavy work
    universal = False  # a ZeRO checkpoint of another world size goes through DeepSpeed's universal checkpoint
    cross = None  # ... and so does a checkpoint of another backend (DeepSpeed <-> one process / DDP)
    if resume_from is not None:
        cross = resume_guard.check_backend(ckpt.read_state(resume_from), cfg, accelerator, resume_from)
        universal = elastic.check_world_size(ckpt.read_state(resume_from), cfg, accelerator, resume_from) and not cross
    if accelerator.is_main_process:  # after the checks: a refused resume leaves the run directory as it was
        out.mkdir(parents=True, exist_ok=True)
        save(cfg, out / "config.yaml")

    # ---- data and model (every rank builds the same, from the seed) ----
    splits = build_splits(cfg.data.name, cfg.data.path, cfg.data.train_per_class, cfg.data.val_per_class,
                          cfg.data.val_fraction, cfg.data.test_limit, cfg.seed, cfg.data.on_bad_image)
    num_classes = len(splits.class_names)
    for split_name in ("train", "val", "test"):
        labels = getattr(splits, split_name)["label"]
        bad = [y for y in set(labels) if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"data '{cfg.data.name}': {split_name} split has labels {sorted(bad)[:5]} outside the "
                             f"{num_classes} classes {splits.class_names[:5]}...; the head would not match the labels")
    placement = model_placement(accelerator)
    model = build_model(cfg.model.name, cfg.model.pretrained, num_classes, source=cfg.model.source,
                        placement=placement, head_seed=cfg.seed)
    accelerator.print(f"model {cfg.model.name}: parameters created "
                      f"{'partitioned (DeepSpeed zero.Init)' if placement.partitioned else 'whole'}")
    adapt_to_precision(accelerator, model)
    constraints = select_constraints(
        model, classifier_module_names(model), cfg.constraint.method, cfg.constraint.radius,
        cfg.constraint.head_radius, cfg.constraint.penalty, cfg.constraint.head_penalty,
        [(g.pattern, g.radius) for g in cfg.constraint.groups], cfg.constraint.norm_layers,
        cfg.constraint.embeddings, cfg.constraint.bn_eps)
    data_cfg = resolve_data_config(model, cfg.data.image_size)
    train_ds = ImageClassificationDataset(splits.train, build_transforms(data_cfg, train=True), seed=cfg.seed)
    val_ds = ImageClassificationDataset(splits.val, build_transforms(data_cfg, train=False))
    test_ds = ImageClassificationDataset(splits.test, build_transforms(data_cfg, train=False))
    make_loader = functools.partial(build_loader, settings=cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                    device=accelerator.device, say=accelerator.print)
    train_loader = make_loader(train_ds, shuffle=True, drop_last=True, cache=True)  # cache: read in every epoch
    val_loader = make_loader(val_ds, cache=True)
    test_loader = make_loader(test_ds)
    # the training images with the eval transforms: the train accuracy reported at the end (how well the run fits)
    fit_ds = ImageClassificationDataset(splits.train, build_transforms(data_cfg, train=False))
    fit_loader = make_loader(fit_ds)

    per_epoch = updates_per_epoch(len(train_loader), accelerator.num_processes, cfg.train.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"train split has {len(train_ds)} images: fewer than one update of batch_size "
                         f"{cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} x {accelerator.num_processes} "
                         f"processes; lower train.batch_size or raise data.train_per_class")
    total_updates = cfg.train.max_steps or per_epoch * cfg.train.epochs

    optimizer = build_optimizer(model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay,
                                cfg.train.momentum, cfg.train.amsgrad)
    step_size = cfg.train.step_size_epochs * per_epoch if cfg.train.step_size_epochs else cfg.train.step_size
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, total_updates, cfg.train.warmup_steps,
                                step_size, cfg.train.step_gamma)
    if universal or cross == "to_zero":
        zero_universal.enable(accelerator)
    pretrained = PretrainedWeights.capture(model)  # before DeepSpeed casts it: the fp32 masters start from these
    model, optimizer, train_loader, val_loader, test_loader, fit_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader, fit_loader)
    accelerator.register_for_checkpointing(scheduler)
    backend = build_backend(accelerator, model, optimizer, constraints, cfg.constraint.mode, pretrained)
    del pretrained
    backend.sync_batchnorm_statistics(cfg.train.bn_mode == "train")  # frozen statistics never differ across ranks
    hook = ProjectionHook(backend, cfg.constraint.ftp)  # ftp: the learned radii's settings (mars-ftp)
    learned_radii.attach(accelerator, hook, backend)  # mars-ftp: the radii and their state go into checkpoints
    identity = {"model": cfg.model.name, "pretrained": cfg.model.pretrained, "num_classes": num_classes,
                "method": cfg.constraint.method, "anchor_checksum": backend.anchor_checksum(),
                "config": resume_guard.math_keys(cfg), "layout": resume_guard.layout(cfg, accelerator.num_processes),
                "backend": resume_guard.backend_of(accelerator)}

    # ---- resume ----
    step, epoch, batch_in_epoch = 0, 0, 0
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        resume_guard.check(saved, cfg, accelerator.num_processes, resume_from, accelerator.print)
        ckpt.check_identity(saved, identity, resume_from)
        if universal:  # anchors were packed above from the pretrained weights: rebuilt, checksum-checked
            zero_universal.load_state(accelerator, model, resume_from)
        elif cross == "from_zero":
            zero_universal.load_state_without_deepspeed(accelerator, model, optimizer, resume_from)
        elif cross == "to_zero":
            zero_from_torch.load_state(accelerator, model, resume_from)
        else:
            accelerator.load_state(str(resume_from))
        step, epoch = saved["step"], saved["epoch"]
        batch_in_epoch = elastic.position_for_layout(saved, cfg.train.batch_size, accelerator.num_processes,
                                                     accelerator.print, identity["layout"]["global_batch"])
        if not cfg.train.max_steps and saved.get("layout", identity["layout"]) != identity["layout"]:
            # a length in epochs, counted in this layout's updates from where the epoch stands
            total_updates = step + per_epoch * (cfg.train.epochs - epoch) - math.ceil(batch_in_epoch /
                                                                                    cfg.train.grad_accum)
        accelerator.print(f"resumed from {resume_from} at update {step}")

    tracker = Tracker(out, to_dict(cfg), cfg.tracking.wandb_mode, cfg.tracking.project, cfg.tracking.run_name,
                      active=accelerator.is_main_process)
    if accelerator.is_main_process:
        (out / "constraints.json").write_text(json.dumps(
            {"summary": summary(constraints), "skipped_images": splits.skipped,
             "layers": [{"name": c.name, "role": c.role, "action": c.action, "norm": c.norm, "radius": c.radius,
                         "shape": list(c.shape)} for c in constraints]}, indent=1))
        accelerator.print(f"{len(train_ds)} train / {len(val_ds)} val / {len(test_ds)} test images, "
                          f"{num_classes} classes; {summary(constraints)['count']} constrained tensors "
                          f"({summary(constraints)['parameters']:,} parameters); "
                          f"{total_updates} updates")

    def state(ep: int, batch: int) -> dict:
        return {"step": step, "epoch": ep, "batch_in_epoch": batch, **identity}

    cast = input_dtype(accelerator)
    bar = tqdm(total=total_updates, initial=step, disable=not accelerator.is_main_process, desc="fine-tune")
    last_eval: dict = {}
    t_last = time.perf_counter()
    samples = 0
    done = step >= total_updates
    while not done:  # every epoch makes >= 1 update (per_epoch > 0), also after a resume under another layout
        train_loader.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
        _set_train_mode(model, cfg.train.bn_mode)
        for x, y in loader:
            batch_in_epoch += 1
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x if cast is None else x.to(cast)).float(), y)
                if not torch.isfinite(accelerator.reduce(loss.detach(), "sum")):
                    raise TrainingDiverged(f"loss is {float(loss.detach())} at update {step} (epoch {epoch}); stopped, the "
                                           f"last checkpoint in {ckpt.checkpoint_root(out)} is intact")
                accelerator.backward(loss)
                if cfg.train.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
            samples += x.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            now = time.perf_counter()
            metrics = {"train/loss": float(loss.detach()), "train/lr": scheduler.get_last_lr()[0],
                       "train/images_per_s": samples / max(now - t_last, 1e-9), "train/epoch": epoch,
                       "constraint/rows_clipped": hook.last_clipped, "constraint/penalty": hook.last_penalty}
            t_last, samples = now, 0
            if step % cfg.train.log_every == 0 or step == total_updates:
                metrics.update(layer_metrics(hook.stats()))
            tracker.log(metrics, step)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step >= total_updates:
                done = True
            flag = torch.tensor([float(stop.raised)], device=accelerator.device)  # NCCL refuses CPU tensors
            stop_now = float(accelerator.reduce(flag, "sum")) > 0
            every = cfg.checkpoint.every_steps
            if stop_now or (every and step % every == 0 and not done):
                ckpt.save_checkpoint(accelerator, out, step, state(epoch, batch_in_epoch), cfg.checkpoint.keep_last)
            if stop_now:
                if accelerator.is_main_process:
                    (out / "preempted.json").write_text(json.dumps({"step": step}))
                accelerator.print(f"preempted: checkpoint saved at update {step}; exiting {EXIT_PREEMPTED}")
                raise Preempted()
            if done:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
        if cfg.train.eval_every_epoch or done:
            last_eval = evaluate(model, val_loader, accelerator)
            tracker.log({"val/accuracy": last_eval["accuracy"], "val/loss": last_eval["loss"]}, step)
            accelerator.print(f"update {step}: val accuracy {last_eval['accuracy']:.4f}")
            _set_train_mode(model, cfg.train.bn_mode)
    bar.close()

    # the position where training stopped (mid-epoch under max_steps): a longer run resumed from here goes on
    ckpt.save_checkpoint(accelerator, out, step, state(epoch, batch_in_epoch), cfg.checkpoint.keep_last)
    test = evaluate(model, test_loader, accelerator)
    fit = evaluate(model, fit_loader, accelerator)
    stats = hook.stats()
    result = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_images": test["n"],
              "train_accuracy": fit["accuracy"], "train_loss": fit["loss"], "val_accuracy": last_eval.get("accuracy"),
              "updates": step, "chance": 1.0 / num_classes,
              "bound_C": layer_metrics(stats)["bound/C"]}
    tracker.log({"test/accuracy": test["accuracy"], "test/loss": test["loss"]}, step)
    full_state = full_state_dict(accelerator, model)  # fp32 masters, also after bf16 training
    if accelerator.is_main_process:
        export = build_model(cfg.model.name, "none", num_classes, source=cfg.model.source,
                             placement=model_placement(accelerator, whole=True))
        export.load_state_dict(full_state)
        export_model(export, out / "export", cfg.model.name, num_classes, cfg.model.source, data_config=data_cfg,
                     class_names=splits.class_names)
        # against the pretrained weights from their source, with the radii the run ended with (learned: mars-ftp)
        certificate = certify_export(out / "export", radii={s.name: s.radius for s in stats},
                                     placement=model_placement(accelerator, whole=True))
        result["certificate"] = certificate.summary()
        accelerator.print(f"certify: {certificate.lines()[-1]}")
        write_model_card(out / "export", cfg, result, stats, accelerator, certificate=certificate)  # README.md
    tracker.finish(stats, result, export_dir=out / "export")  # + the export as a W&B model artifact
    accelerator.print(f"test accuracy {test['accuracy']:.4f} on {test['n']} images (chance {1 / num_classes:.3f})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
