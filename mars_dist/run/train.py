"""One fine-tuning run, as its phases: start, data, model, optimisation, attach, resume, fit, finish.

Each phase is a method of `FineTune` that reads what the earlier ones set; `train(cfg)` calls them in order. The
constraint is attached through the public API (`mars_dist.api`), as any user's loop would. Distributed details live
in accelerate and mars_dist.sharding; the loop only asks `accelerator.is_main_process` and `sync_gradients`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mars_dist.api import attach, capture_pretrained
from mars_dist.config import Config, save, to_dict
from mars_dist.constraints import summary
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
from mars_dist.data.loader import build_loader, release_workers
from mars_dist.data.splits import build_splits, check_labels
from mars_dist.models.factory import build_model, classifier_module_names, resolve_data_config
from mars_dist.models.knobs import apply_model_knobs, model_inputs
from mars_dist.run import checkpoint as ckpt
from mars_dist.run import resume_guard
from mars_dist.run.finish import finish_run
from mars_dist.run.ema import build_ema
from mars_dist.run.lpft import LinearProbe
from mars_dist.run.loop import (EXIT_PREEMPTED, Preempted, StopFlag, TrainingDiverged, evaluate, set_train_mode,
                                updates_per_epoch)
from mars_dist.run.delta import build_regulariser
from mars_dist.run.loss import build_loss
from mars_dist.run.optim import build_optimizer, build_scheduler
from mars_dist.run.resume import ResumePlan
from mars_dist.run.tracking import Tracker, layer_metrics
from mars_dist.sharding.accelerate_setup import adapt_to_precision, input_dtype, make_accelerator, model_placement

__all__ = ["EXIT_PREEMPTED", "FineTune", "Preempted", "TrainingDiverged", "train", "updates_per_epoch"]


def train(cfg: Config) -> dict:
    """Fine-tune as `cfg` says; returns the summary (test accuracy, certificate, ...) on every process."""
    run = FineTune(cfg)
    run.setup()
    run.fit()
    return run.finish()


class FineTune:
    """The state of one run, filled phase by phase."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.last_eval: dict = {}

    def setup(self) -> None:
        """Every phase before `fit()`: a run ready to train (what benchmarks time the loop after)."""
        self.start()
        self.data()
        self.model()
        self.optimisation()
        self.attach()
        self.resume()

    # ---- start: processes, seed, what a resume will need (refused now, before any heavy work) -------------------
    def start(self) -> None:
        cfg = self.cfg
        self.accelerator = make_accelerator(cfg.train.grad_accum, cfg.train.mixed_precision, cfg.train.grad_clip,
                                            cfg.train.collective_timeout_s, micro_batch=cfg.train.batch_size)
        set_seed(cfg.seed)
        self.stop = StopFlag()
        self.plan = ResumePlan.check(cfg, self.accelerator, self.out)
        if self.accelerator.is_main_process:  # after the checks: a refused resume leaves the run directory as it was
            self.out.mkdir(parents=True, exist_ok=True)
            save(cfg, self.out / "config.yaml")

    # ---- data: the same splits on every rank, from the seed ----------------------------------------------------
    def data(self) -> None:
        d = self.cfg.data
        self.splits = build_splits(d.name, d.path, d.train_per_class, d.val_per_class, d.val_fraction, d.test_limit,
                                   self.cfg.seed, d.on_bad_image)
        self.num_classes = len(self.splits.class_names)
        check_labels(self.splits, d.name)

    # ---- model: built whole or partitioned for this launch; datasets and loaders in its preprocessing ----------
    def model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        placement = model_placement(acc)
        self.net = build_model(cfg.model.name, cfg.model.pretrained, self.num_classes, source=cfg.model.source,
                               placement=placement, head_seed=cfg.seed, drop_path_rate=cfg.model.drop_path_rate)
        acc.print(f"model {cfg.model.name}: parameters created "
                  f"{'partitioned (DeepSpeed zero.Init)' if placement.partitioned else 'whole'}")
        adapt_to_precision(acc, self.net)
        knobs = apply_model_knobs(self.net, cfg.train.grad_checkpointing, cfg.train.compile)
        if knobs:
            acc.print(f"model {cfg.model.name}: {', '.join(knobs)}")
        self.head = classifier_module_names(self.net)
        self.data_cfg = resolve_data_config(self.net, cfg.data.image_size)
        self._loaders()

    def _loaders(self) -> None:
        cfg, splits, acc = self.cfg, self.splits, self.accelerator
        evaluation = build_transforms(self.data_cfg, train=False)
        augment = build_transforms(self.data_cfg, train=True, auto_augment=cfg.data.auto_augment,
                                   reprob=cfg.data.reprob)
        self.train_ds = ImageClassificationDataset(splits.train, augment, seed=cfg.seed)
        self.sizes = (len(splits.train), len(splits.val), len(splits.test))
        make = functools.partial(build_loader, settings=cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                 device=acc.device, say=acc.print)
        self.loaders = {"train": make(self.train_ds, shuffle=True, drop_last=True, cache=True),  # read every epoch
                        "val": make(ImageClassificationDataset(splits.val, evaluation), cache=True),
                        "test": make(ImageClassificationDataset(splits.test, evaluation)),
                        # the training images with the eval transforms: how well the run fits, reported at the end
                        "fit": make(ImageClassificationDataset(splits.train, evaluation))}

    # ---- optimisation: the length in updates, the optimizer and its schedule ------------------------------------
    def optimisation(self) -> None:
        t, acc = self.cfg.train, self.accelerator
        self.per_epoch = updates_per_epoch(len(self.loaders["train"]), acc.num_processes, t.grad_accum)
        if self.per_epoch == 0:
            raise ValueError(f"train split has {self.sizes[0]} images: fewer than one update of batch_size "
                             f"{t.batch_size} x grad_accum {t.grad_accum} x {acc.num_processes} processes; lower "
                             f"train.batch_size or raise data.train_per_class")
        self.total_updates = t.max_steps or self.per_epoch * t.epochs
        self.optimizer = build_optimizer(self.net, t.optimizer, t.lr, t.weight_decay, t.momentum, t.amsgrad,
                                         t.layer_decay, t.no_weight_decay_norm_bias)
        self.probe = LinearProbe(t.linear_probe_steps, self.head)  # LP-FT: [backbone, head] groups when on
        self.probe.split(self.net, self.optimizer)
        step_size = t.step_size_epochs * self.per_epoch if t.step_size_epochs else t.step_size
        self.criterion = build_loss(self.cfg, self.num_classes)  # cross-entropy, or mixup / smoothing's
        self.scheduler = build_scheduler(self.optimizer, t.scheduler, self.total_updates, t.warmup_steps, step_size,
                                         t.step_gamma)
        self.probe.set_learning_rates(self.optimizer, 0)

    # ---- attach: prepare, then the constraint through the public API ------------------------------------------
    def attach(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.plan.before_prepare(acc)
        pretrained = capture_pretrained(self.net)  # before DeepSpeed casts the model: the fp32 masters start here
        names = list(self.loaders)
        self.net, self.optimizer, *loaders = acc.prepare(self.net, self.optimizer, *self.loaders.values())
        self.loaders = dict(zip(names, loaders))
        acc.register_for_checkpointing(self.scheduler)
        self.constrained = attach(self.net, self.optimizer, cfg.constraint, accelerator=acc, pretrained=pretrained,
                                  head=self.head)
        del pretrained
        self.ema = build_ema(cfg, self.constrained, acc.print)  # hooked after the projection; None when off
        self.regulariser = build_regulariser(self)  # a loss term (DELTA) or none
        # frozen statistics never differ across ranks: no need to average them in the collective
        self.constrained.backend.sync_batchnorm_statistics(cfg.train.bn_mode == "train")
        self.identity = {"model": cfg.model.name, "pretrained": cfg.model.pretrained,
                         "num_classes": self.num_classes, "method": cfg.constraint.method,
                         "anchor_checksum": self.constrained.anchor_checksum,
                         "config": resume_guard.math_keys(cfg), "layout": resume_guard.layout(cfg, acc.num_processes),
                         "backend": resume_guard.backend_of(acc)}

    # ---- resume: the saved state, by the plan made at start -----------------------------------------------------
    def resume(self) -> None:
        if self.plan.checkpoint is not None:
            self.step, self.epoch, self.batch_in_epoch, self.total_updates = self.plan.load(
                self.cfg, self.accelerator, self.net, self.optimizer, self.identity, self.per_epoch,
                self.total_updates)
            if self.ema is not None:
                self.ema.load(self.plan.checkpoint, self.accelerator.print)
        self.probe.set_learning_rates(self.scheduler.optimizer, self.step)  # the torch optimizer's groups
        self.tracker = Tracker(self.out, to_dict(self.cfg), self.cfg.tracking.wandb_mode, self.cfg.tracking.project,
                               self.cfg.tracking.run_name, active=self.accelerator.is_main_process)
        if self.accelerator.is_main_process:
            self._describe()

    def _describe(self) -> None:
        constraints = self.constrained.constraints
        (self.out / "constraints.json").write_text(json.dumps(
            {"summary": summary(constraints), "skipped_images": self.splits.skipped,
             "layers": [_layer_record(c) for c in constraints]}, indent=1))
        count = summary(constraints)
        self.accelerator.print(f"{self.sizes[0]} train / {self.sizes[1]} val / {self.sizes[2]} test images, "
                               f"{self.num_classes} classes; {count['count']} constrained tensors "
                               f"({count['parameters']:,} parameters); {self.total_updates} updates")

    # ---- fit: epochs of updates, evaluation, checkpoints, preemption ------------------------------------------
    def fit(self) -> None:
        acc = self.accelerator
        self.cast = input_dtype(acc)
        self.to_model = model_inputs(self.cast, self.cfg.train.channels_last)
        self.bar = tqdm(total=self.total_updates, initial=self.step, disable=not acc.is_main_process,
                        desc="fine-tune")
        self.clock, self.samples = time.perf_counter(), 0
        done = self.step >= self.total_updates
        while not done:  # every epoch makes >= 1 update (per_epoch > 0), also after a resume under another layout
            done = self._epoch()
            if self.cfg.train.eval_every_epoch or done:
                self.last_eval = evaluate(self.net, self.loaders["val"], acc, self.cast)
                self.tracker.log({"val/accuracy": self.last_eval["accuracy"], "val/loss": self.last_eval["loss"]},
                                 self.step)
                acc.print(f"update {self.step}: val accuracy {self.last_eval['accuracy']:.4f}")
        self.bar.close()
        # the position where training stopped (mid-epoch under max_steps): a longer run resumed from here goes on
        self._save()

    def _epoch(self) -> bool:
        """The rest of this epoch; True when the run has made all its updates."""
        acc, loader = self.accelerator, self.loaders["train"]
        loader.set_epoch(self.epoch)
        self.train_ds.set_epoch(self.epoch)
        if self.batch_in_epoch:
            loader = acc.skip_first_batches(loader, self.batch_in_epoch)
        set_train_mode(self.net, self.probe.bn_mode(self.cfg.train.bn_mode, self.step))
        try:
            for x, y in loader:
                self.batch_in_epoch += 1
                loss = self._micro_batch(x, y)
                if acc.sync_gradients and self._after_update(loss):
                    return True
        finally:
            if loader is not self.loaders["train"]:  # the one-epoch skipping loader of a resume: its workers end
                release_workers(loader)
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return False

    def _micro_batch(self, x, y) -> torch.Tensor:
        acc = self.accelerator
        with acc.accumulate(self.net):
            x, target = self.criterion.mix(x, y)
            inputs = self.to_model(x)
            loss = self.criterion(self.net(inputs).float(), target) + self.regulariser(inputs)
            if not torch.isfinite(acc.reduce(loss.detach(), "sum")):
                raise TrainingDiverged(f"loss is {float(loss.detach())} at update {self.step} (epoch {self.epoch}); "
                                       f"stopped, the last checkpoint in {ckpt.checkpoint_root(self.out)} is intact")
            acc.backward(loss)
            if self.cfg.train.grad_clip and acc.sync_gradients:
                acc.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()  # the projection runs inside the real update (attached to the inner optimizer)
            self.optimizer.zero_grad()
        self.samples += x.shape[0] * acc.num_processes
        return loss.detach()

    def _after_update(self, loss: torch.Tensor) -> bool:
        """Schedule, logs, checkpoint, preemption after one real update; True when it was the last one."""
        self.scheduler.step()
        self.step += 1
        self.probe.after_update(self.net, self.scheduler.optimizer, self.step, self.cfg.train.bn_mode)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(loss):.3f}")
        self._log(loss)
        done = self.step >= self.total_updates
        flag = torch.tensor([float(self.stop.raised)], device=self.accelerator.device)  # NCCL refuses CPU tensors
        stop_now = float(self.accelerator.reduce(flag, "sum")) > 0
        every = self.cfg.checkpoint.every_steps
        if stop_now or (every and self.step % every == 0 and not done):
            self._save()
        if stop_now:
            if self.accelerator.is_main_process:
                (self.out / "preempted.json").write_text(json.dumps({"step": self.step}))
            self.accelerator.print(f"preempted: checkpoint saved at update {self.step}; exiting {EXIT_PREEMPTED}")
            raise Preempted()
        return done

    def _log(self, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        hook = self.constrained.hook
        metrics = {"train/loss": float(loss), "train/lr": max(self.scheduler.get_last_lr()),  # the head's lr
                   "train/images_per_s": self.samples / max(now - self.clock, 1e-9), "train/epoch": self.epoch,
                   hook.count_metric: hook.last_clipped, "constraint/penalty": hook.last_penalty,
                   **({"constraint/delta": self.regulariser.last} if hasattr(self.regulariser, "last") else {})}
        self.clock, self.samples = now, 0
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_updates:
            metrics.update(layer_metrics(self.constrained.stats()))
        self.tracker.log(metrics, self.step)

    def _save(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self.identity}
        ckpt.save_checkpoint(self.accelerator, self.out, self.step, state, self.cfg.checkpoint.keep_last,
                             per_rank=self.ema.save if self.ema is not None else None)

    # ---- finish: test, export, certificate, card --------------------------------------------------------------
    def finish(self) -> dict:
        return finish_run(self)


def _layer_record(c) -> dict:
    """A constrained layer as constraints.json lists it: a radius only where it is projected (a penalty method has a
    weight, SPD neither: a number there would read as a bound the run never enforced)."""
    return {"name": c.name, "role": c.role, "action": c.action, "norm": c.norm,
            "radius": c.radius if c.action == "project" else None,
            **({"weight": c.weight} if c.action == "penalty" else {}), "shape": list(c.shape)}
