"""The constraint in a Hugging Face `Trainer` (its own DDP or DeepSpeed ZeRO, fp32 or bf16), adapting mars_dist.api:

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="zero3.json"), ...)
    constraint = MarsConstraintCallback.install(trainer, radius=2.0, head_radius=10.0)
    trainer.train()
    weights = constraint.constrained.fp32_state_dict()   # every rank; the fp32 weights the bound holds on

Where in the Trainer's life each part happens, and why there:
- the pretrained weights are captured by `install`, on the model the Trainer holds before `train()`: the Trainer
  prepares (and DeepSpeed bf16 casts) the model inside `train()`;
- `on_train_begin` attaches: by then the Trainer has created its optimizer and run `accelerator.prepare`
  (`trainer.model_wrapped` is the DeepSpeedEngine / DDP module), and no update has been made;
- the stats are measured at `on_step_end` (every rank: one collective) on logging steps and added to the Trainer's
  logs at `on_log`, so every logger the Trainer reports to (W&B, TensorBoard, ...) records them. `install` puts the
  callback first: the Trainer's loggers are callbacks too, and read the logs in list order.
Resuming with `trainer.train(resume_from_checkpoint=...)` is refused at attach: the Trainer loads the checkpoint's
weights before `on_train_begin`, so the anchors could not be read there (see docs/api.md).
"""

from __future__ import annotations

from transformers import TrainerCallback

from mars_dist.api import attach, capture_pretrained
from mars_dist.api.guards import AttachError


class MarsConstraintCallback(TrainerCallback):
    """Constrains the Trainer's model with `mars_dist.attach` (settings: a ConstraintConfig and/or its fields as
    keywords, and `head`). `self.constrained` is the handle once training has begun."""

    def __init__(self, trainer, config=None, head=None, per_layer: bool = True, **settings):
        self.trainer = trainer
        self.config, self.head, self.settings = config, head, settings
        self.per_layer = per_layer  # False: only the bound/* and constraint/* summaries reach the logs
        self.pretrained = capture_pretrained(trainer.model)  # before train(): prepare / the bf16 cast come later
        self.constrained = None
        self._pending_logs: dict = {}

    @classmethod
    def install(cls, trainer, config=None, head=None, per_layer: bool = True, **settings) -> MarsConstraintCallback:
        """Create the callback for `trainer` and put it first in its callback list (before the loggers)."""
        callback = cls(trainer, config, head, per_layer, **settings)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step > 0:
            raise AttachError(f"resuming a Trainer run (global step {state.global_step}): the Trainer has loaded the "
                              f"checkpoint's weights already, the anchors cannot be read; start a new run")
        if self.constrained is not None:  # a second train() call: the new optimizer gets the hooks
            self.constrained.detach()
        self.constrained = attach(self.trainer.model_wrapped, optimizer or self.trainer.optimizer, self.config,
                                  pretrained=self.pretrained, head=self.head, **self.settings)
        self.pretrained.weights.release()  # the fp32 masters hold the pretrained values now
        if state.is_world_process_zero:
            print(f"mars_dist: {len(self.constrained.constraints)} layers constrained, projected on the "
                  f"{self.constrained.backend.name} backend's fp32 weights, {args.world_size} processes")

    def on_step_end(self, args, state, control, **kwargs):
        every = max(1, int(args.logging_steps)) if args.logging_strategy == "steps" else None
        last = state.max_steps and state.global_step >= state.max_steps
        if self.constrained is not None and (last or (every and state.global_step % every == 0)):
            logs = self.constrained.log_dict(prefix="mars/")  # every rank: a collective
            self._pending_logs = {k: v for k, v in logs.items() if self.per_layer or not k.startswith("mars/layers/")}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending_logs and "loss" in logs:
            logs.update(self._pending_logs)
            self._pending_logs = {}
