"""Public API: keep every layer of your model inside its MARS ball from your own training loop.

    pretrained = mars_dist.capture_pretrained(model)            # weights loaded, BEFORE prepare / initialize
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    constrained = mars_dist.attach(model, optimizer, radius=2.0, head_radius=10.0,
                                   accelerator=accelerator, pretrained=pretrained)
    ... your loop: every real optimizer update is followed by the projection, nothing else to call ...
    accelerator.log(constrained.log_dict(), step=step)          # on every rank: one collective

One process, DDP, DeepSpeed ZeRO-1/2/3 (whole, zero.Init, offload) and torch FSDP2 `fully_shard`; with or without
accelerate. docs/api.md says what to call where and why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from mars_dist.api import guards
from mars_dist.api import wiring
from mars_dist.config import ConstraintConfig, DeltaConfig, FtpConfig, RadiusGroup, SpdConfig

STATE_VERSION = 1


class Pretrained:
    """The pretrained weights as loaded (from `capture_pretrained`): fp32 values for DeepSpeed's masters, their
    fingerprints (api_guards) to recognise them after prepare, and the BatchNorm running variances."""

    def __init__(self, weights, fingerprints: dict[str, torch.Tensor], partitioned: set[str],
                 running_vars: dict[str, torch.Tensor], missing: set[str] = frozenset()):
        self.weights = weights  # sharding.masters.PretrainedWeights
        self.fingerprints = fingerprints
        self.partitioned = partitioned  # names whose fingerprint is this rank's part only (zero.Init)
        self.running_vars = running_vars
        self.missing = set(missing)  # partitioned by zero.Init before the capture, no fp32 values kept


def capture_pretrained(model: nn.Module) -> Pretrained:
    """Record `model`'s pretrained weights. Call after they are loaded and BEFORE `accelerator.prepare` /
    `deepspeed.initialize` / `fully_shard` (DeepSpeed bf16/fp16 casts the model there and builds its fp32 masters
    from the rounded copy). Costs one pass over the weights; holds references, not copies, of whole fp32 tensors."""
    from mars_dist.sharding import PretrainedWeights, named_parameters
    from mars_dist.sharding.masters import LOCAL_ATTR

    weights = PretrainedWeights.capture(model)
    # partitioned by someone else's zero.Init (nothing recorded): no fp32 values. A parameter recorded as rewritten
    # after creation (the seeded new head, set in the training dtype) has no pretrained value to restore: not missing
    missing = {name for name, p in named_parameters(model).items()
               if hasattr(p, "ds_id") and name not in weights and not hasattr(p, LOCAL_ATTR)}
    prints = {name: guards.fingerprint(value) for name, value in weights.whole.items()}
    prints.update({name: guards.fingerprint(values, offset) for name, (offset, values) in weights.partitions.items()})
    running = {f"{name}.running_var": m.running_var.detach().clone() for name, m in wiring.unwrap(model).named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None}
    return Pretrained(weights, prints, set(weights.partitions), running, missing)


def attach(model: nn.Module, optimizer, config: ConstraintConfig | None = None, *, accelerator=None,
           pretrained: Pretrained | None = None, head: Sequence[str] | None = None, **settings) -> Constrained:
    """Constrain `model` from now on: after every real update of `optimizer` each layer is projected into its ball
    (or, for the SP methods, penalty gradients are added before it). Returns the handle.

    Call AFTER `accelerator.prepare` / `deepspeed.initialize` / DDP wrapping / `fully_shard`, and BEFORE the first
    update. model: what prepare returned (the DeepSpeedEngine under DeepSpeed, the DDP / FSDP2 module, or the
    plain model). optimizer: the one prepare returned or the torch optimizer given to it.
    config / settings: a `ConstraintConfig`, and/or its fields as keywords (method, radius, head_radius, penalty,
    head_penalty, groups=[(pattern, radius), ...], norm_layers, embeddings, bn_eps, ftp=FtpConfig or dict,
    spd=SpdConfig or dict, mode, delta=DeltaConfig or dict: method "delta" takes its head penalty beta/2 from it;
    its loss term is run/delta.py).
    accelerator: picks the backend accelerate prepared, and registers the handle's state for save_state /
    load_state (so attach before `load_state` when resuming). pretrained: from `capture_pretrained`; required
    under DeepSpeed bf16/fp16, otherwise it adds the check that the weights are still the pretrained ones.
    head: names of the classifier head modules (constrained around zero); found from the model when omitted.
    Refuses (`AttachError`) after an update, with an optimizer that does not step the fp32 masters, and under
    DeepSpeed bf16/fp16 without `pretrained`.
    """
    from mars_dist.constraints import select_constraints
    from mars_dist.run.hook import ProjectionHook

    cfg = _config(config, settings)
    engine = wiring.deepspeed_engine(model, accelerator)
    module = wiring.unwrap(engine.module if engine is not None else model, accelerator)
    inner = wiring.inner_optimizer(optimizer, engine)
    guards.check_not_stepped(inner, engine)
    guards.check_not_attached(inner)
    if engine is not None:
        guards.check_deepspeed_optimizer(optimizer, engine)
        guards.check_low_precision_masters(engine, pretrained)
    head = list(head) if head else wiring.find_head(module)
    # DELTA's head term beta/2 ||W||^2 is the L2 penalty head_penalty ||W||^2 (no 1/2) with head_penalty = beta/2
    head_penalty = cfg.delta.beta / 2 if cfg.method == "delta" else cfg.head_penalty
    constraints = select_constraints(module, head, cfg.method, cfg.radius, cfg.head_radius, cfg.penalty,
                                     head_penalty, [(g.pattern, g.radius) for g in cfg.groups],
                                     cfg.norm_layers, cfg.embeddings, cfg.bn_eps)
    if pretrained is not None:
        if engine is not None:
            guards.check_low_precision_masters(engine, pretrained, [c.name for c in constraints])
        wiring.use_pretrained_running_vars(constraints, pretrained)
    if engine is None:
        guards.check_optimizer_steps_params(inner, wiring.constrained_params(module, constraints))
    backend = wiring.build_backend(model, engine, module, inner, constraints, cfg.mode, accelerator, pretrained)
    try:
        if pretrained is not None:
            wiring.check_pretrained(backend, pretrained)
        hook = ProjectionHook(backend, cfg.ftp, cfg.spd)
    except Exception:
        getattr(backend, "remove", lambda: None)()
        raise
    return Constrained(cfg, constraints, backend, hook, module, engine, accelerator)


class Constrained:
    """The handle `attach` returns. `stats()` / `log_dict()` / `fp32_state_dict()` are collectives (call them on
    every rank); `state_dict()` is this rank's state."""

    def __init__(self, config: ConstraintConfig, constraints, backend, hook, module: nn.Module, engine=None,
                 accelerator=None):
        self.config, self.constraints, self.backend, self.hook = config, constraints, backend, hook
        self.module, self._engine = module, engine  # the unwrapped model; the DeepSpeedEngine if any
        self.anchor_checksum = backend.anchor_checksum()  # layout-free: the anchors' identity in checkpoints
        self._optimizer = backend.hook_optimizer()
        setattr(self._optimizer, guards.ATTACHED_ATTR, True)
        self._accelerator, self._handles, self._emas = accelerator, [], []
        if accelerator is not None:
            from mars_dist.run import learned_radii

            accelerator.register_for_checkpointing(self)
            self._handles = learned_radii.attach(accelerator, hook, backend, register=False) or []

    @property
    def updates(self) -> int:
        """Updates projected (or penalised) since attach, counted on this rank."""
        return self.hook.updates

    def stats(self) -> list:
        """Per-layer `LayerStats` (name, role, radius, distance ||W - W0||_MARS, layer_norm ||W||_MARS,
        frac_at_bound, frobenius, ratio). Learned radii (mars-ftp) are their current values."""
        return self.hook.stats()

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics for `wandb.log` / `accelerator.log`: `layers/<name>/{distance,radius,ratio,frac_at_bound,
        layer_norm}`, `bound/C` (the log-domain bound term), `bound/max_ratio`, `bound/layers_at_radius`,
        `constraint/rows_clipped` (at the last update; SPD: `constraint/layers_decayed`) and `constraint/penalty`
        (SP methods)."""
        from mars_dist.run.tracking import layer_metrics

        out = layer_metrics(self.stats())
        out[self.hook.count_metric] = self.hook.last_clipped
        out["constraint/penalty"] = self.hook.last_penalty
        return {prefix + k: v for k, v in out.items()}

    def state_dict(self) -> dict:
        """What a resume needs besides the model and optimizer: the anchors' identity (checksum, constrained names)
        and, for learned radii, the radii with their Adam state (the same on every rank). Registered with accelerate's
        checkpointing when attached with an accelerator (each rank's learned-radius direction buffer is written
        next to it, learned_radii_rank{r}.pt); otherwise save it yourself, with `direction_state()` per rank."""
        learned = self.hook.learned
        return {"version": STATE_VERSION, "method": self.config.method, "anchor_checksum": self.anchor_checksum,
                "constraints": [c.name for c in self.constraints],
                "learned": None if learned is None else learned.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` of an earlier run; refuses a state made with other anchors or other layers."""
        names = [c.name for c in self.constraints]
        if state.get("method") != self.config.method or state.get("constraints") != names:
            raise ValueError(f"constraint state of method {state.get('method')!r} over "
                             f"{len(state.get('constraints') or [])} layers; this run is {self.config.method!r} over "
                             f"{len(names)}: not the same constraint, refusing to resume")
        saved = state.get("anchor_checksum") or []
        if len(saved) != len(self.anchor_checksum) or any(
                not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(saved, self.anchor_checksum)):
            raise ValueError(f"constraint state: anchor checksum {saved} differs from this run's "
                             f"{self.anchor_checksum}: the anchors are not the same pretrained weights")
        if state.get("learned") is not None and self.hook.learned is not None:
            self.hook.learned.load_state_dict(state["learned"])

    def direction_state(self) -> list:
        """Learned radii only: this rank's previous-update direction buffer (name, offset, values) fragments, for a
        loop without accelerate to save per rank; `load_direction_state` takes every rank's lists back."""
        return [] if self.hook.learned is None else self.hook.learned.direction_fragments()

    def load_direction_state(self, per_rank_lists) -> bool:
        return True if self.hook.learned is None else self.hook.learned.load_directions(per_rank_lists)

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict with the fp32 masters (where the bound holds exactly, also after bf16
        training), keyed as the unwrapped model names them: copies, on the CPU. A collective; complete on every
        rank, except FSDP2 (rank 0)."""
        if self._engine is not None:
            from mars_dist.sharding.precision import deepspeed_fp32_state_dict

            return deepspeed_fp32_state_dict(self._engine)
        if any(type(p).__name__ == "DTensor" for p in self.module.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.module, options=options)  # gathered: fresh CPU tensors already
            return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}
        # copies: `.cpu().float()` of a CPU fp32 parameter is the parameter itself, which a later update (or the end
        # of an `ema.applied()` block) would change under the caller
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                for k, v in self.module.state_dict().items()}

    def ema(self, decay: float, warmup: bool = True):
        """An exponential moving average of the fp32 master weights of every trainable parameter (and of the floating
        buffers), updated after each update's projection, on this rank's own fragments (1/N of the fp32 model under
        ZeRO and FSDP2 with N ranks; what run/ema.py keeps for `mars-dist train --ema`). It starts from the weights
        as they are now (attach time: the pretrained ones) and follows timm ModelEmaV3's decay (`warmup`: timm's
        warm-up). Its weights are inside every ball too (the balls are convex; docs/api.md). Use
        `with ema.applied(): ...` on every rank to evaluate or export it (`fp32_state_dict()` inside the block), and
        `ema.save(dir)` / `ema.load(dir)` on every rank for checkpoints (one file per rank; another world size is
        re-cut on load). `detach()` stops it with the projection."""
        from mars_dist.run.ema import WeightEma

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema: decay {decay!r} must be in [0, 1)")
        ema = WeightEma(self.backend, self.module, decay, warmup)
        self._emas.append(ema)
        return ema

    def detach(self) -> None:
        """Remove every hook: later updates are no longer constrained (the weights stay where they are), and no EMA
        made by `ema()` follows them any more."""
        self.hook.remove()
        for ema in self._emas:
            ema.remove()
        self._emas = []
        setattr(self._optimizer, guards.ATTACHED_ATTR, False)
        getattr(self.backend, "remove", lambda: None)()
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._accelerator is not None and self in getattr(self._accelerator, "_custom_objects", []):
            # accelerate has no public unregister; a detached handle must not be saved or loaded any more
            self._accelerator._custom_objects.remove(self)
            self._accelerator = None


# ---------------------------------------------------------------------------------------------- helpers
def _config(config: ConstraintConfig | None, settings: dict) -> ConstraintConfig:
    valid = {f.name for f in dataclasses.fields(ConstraintConfig)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise TypeError(f"attach: unknown setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
    if "groups" in settings:
        settings["groups"] = [g if isinstance(g, RadiusGroup) else RadiusGroup(**g) if isinstance(g, dict)
                              else RadiusGroup(*g) for g in settings["groups"]]
    if isinstance(settings.get("ftp"), dict):
        settings["ftp"] = FtpConfig(**settings["ftp"])
    if isinstance(settings.get("spd"), dict):
        settings["spd"] = SpdConfig(**settings["spd"])
    if isinstance(settings.get("delta"), dict):
        settings["delta"] = DeltaConfig(**settings["delta"])
    return dataclasses.replace(config or ConstraintConfig(), **settings)
