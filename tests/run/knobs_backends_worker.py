"""The recipe knobs through the trainer under every backend, in ONE launch (tests/run/test_knobs_backends.py):

    accelerate launch --config_file launch/accelerate/cpu.yaml --num_processes 2 tests/run/knobs_backends_worker.py \
        OUT HF_DIR BACKEND/CASE [BACKEND/CASE ...]
    python tests/run/knobs_backends_worker.py OUT HF_DIR single/CASE ...          # the one-process reference

BACKEND is a shipped launch config's name (cpu = DDP, zero1, zero2, zero3, zero3_init, zero3_offload) or `single`.
Before each run the worker puts the environment that `accelerate launch --config_file
launch/accelerate/BACKEND.yaml` would set (computed by accelerate's own launcher code from that file) in place of the
previous one and resets accelerate's state singleton: the process group stays (the runs' `end_training` is skipped,
the launch ends it), the DeepSpeed plugin and the engine are built anew by the trainer (test-only: accelerate's
launcher internals
`_validate_launch_command` / `prepare_*_env` give the environment). CASE picks a model (timm: the bundled
EfficientNet-Lite0, BatchNorm; hf: a tiny HF BEiT, LayerNorm, from HF_DIR) and knobs (KNOBS below). The run is the
trainer's own (`FineTune`'s phases); the one test-only addition: after every update rank 0 writes the whole fp32
weights (`full_state_dict`, a collective) to OUT/BACKEND/CASE/updates/N.safetensors, which the test checks against
the pretrained file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mars_dist import config  # noqa: E402
from mars_dist.run.train import FineTune  # noqa: E402
from mars_dist.sharding.accelerate_setup import full_state_dict  # noqa: E402
from launch_helpers import DELTA_LITE0_LAYERS, DELTA_SMALL  # noqa: E402

SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=10",
         "train.max_steps=3", "constraint.radius=0.05", "constraint.head_radius=1.0", "tracking.wandb_mode=disabled",
         "data.num_workers=0", "train.eval_every_epoch=false", "train.bn_mode=eval", "train.collective_timeout_s=120"]
# draw nothing at random per rank: a 2-process run equals the one-process run of the doubled micro-batch. SGD: the
# first update is W0 - lr * g, so equal weights after it mean equal gradients (activation checkpointing on / off),
# and a gradient that nearly cancels stays small (Adam's first step, g / |g|, would amplify its rounding)
DETERMINISTIC = ["train.optimizer=sgd", "train.lr=0.05", "train.layer_decay=0.65", "train.weight_decay=0.05",
                 "train.label_smoothing=0.1", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25",
                 "train.channels_last=true", "train.grad_checkpointing=true"]
# + drop-path and mixup / cutmix, drawn on each rank
ALL = [*DETERMINISTIC, "model.drop_path_rate=0.2", "data.mixup=0.8", "data.cutmix=1.0"]
KNOBS = {"det": DETERMINISTIC, "all": ALL,
         "all_nogc": [k for k in ALL if k != "train.grad_checkpointing=true"],
         "ftp": [*DETERMINISTIC, "constraint.method=mars-ftp"],
         "compile": [*DETERMINISTIC[:4], "train.compile=true"],
         # DELTA (a penalty, no projection): its frozen source beside the trained model, as test_delta_cli.py runs it
         "delta": [*DETERMINISTIC, *DELTA_SMALL, *DELTA_LITE0_LAYERS],
         "eager": DETERMINISTIC[:4]}
LAUNCH_KEYS = ("ACCELERATE_USE_", "ACCELERATE_DEEPSPEED", "ACCELERATE_CONFIG_DS_FIELDS", "FSDP_", "ACCELERATE_DYNAMO")


def launch_env(backend: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file launch/accelerate/BACKEND.yaml` sets for its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / f"launch/accelerate/{backend}.yaml"),
                                               "--num_processes", "2", "x.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def switch_backend(backend: str) -> None:
    for key in [k for k in os.environ if k.startswith(LAUNCH_KEYS)]:
        del os.environ[key]
    env = launch_env(backend)
    os.environ.update({k: v for k, v in env.items() if k.startswith(LAUNCH_KEYS)})
    AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays initialized
    GradientState._reset_state()


class Checked(FineTune):
    """The trainer's run, with the whole weights written after every update (rank 0)."""

    def _after_update(self, loss):
        done = super()._after_update(loss)
        state = full_state_dict(self.accelerator, self.net)
        if self.accelerator.is_main_process:
            folder = self.out / "updates"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{self.step}.safetensors"))
        return done


def run(out: Path, hf_dir: Path, backend: str, case: str, micro_batch: int) -> None:
    model, knobs = case.split("_", 1)
    models = {"timm": [], "hf": [f"model.name={hf_dir}", f"model.pretrained={hf_dir / 'pretrained.safetensors'}"]}
    cfg = config.load(None, [*SMALL, *models[model], *KNOBS[knobs], f"train.batch_size={micro_batch}",
                             f"output_dir={out / backend / case}"])
    r = Checked(cfg)
    r.start()
    r.accelerator.end_training = lambda: None  # keep the process group for the next run (destroyed at exit)
    for phase in (r.data, r.model, r.optimisation, r.attach, r.resume, r.fit, r.finish):
        phase()
    r.accelerator.print(f"done {backend}/{case}")


def main() -> None:
    out, hf_dir, *specs = sys.argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for spec in specs:
        backend, case = spec.split("/")
        if backend != "single":
            switch_backend(backend)
        run(Path(out), Path(hf_dir), backend, case, micro_batch=8 // world)


if __name__ == "__main__":
    main()
