"""Fine-tune ImageNet EfficientNet-Lite0 on few-shot Fashion-MNIST with the Hugging Face Trainer, every layer kept
inside its MARS ball around the pretrained weights (mars_dist.integrations.hf_trainer). One process, or under a
launcher with the Trainer's own DeepSpeed (the accelerate config's, or --deepspeed FILE):

    python examples/hf_trainer.py --radius 0.5 --head-radius 5 --max-steps 4 --output runs/hf
    accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes 2 \
        examples/hf_trainer.py --radius 0.5 --head-radius 5 --max-steps 4 --output runs/hf --bf16

On a CPU-only machine set DS_ACCELERATOR=cpu for DeepSpeed. Writes OUTPUT/model.safetensors (the fp32 weights, timm
parameter names) and OUTPUT/metrics.jsonl (what the Trainer's loggers received, constraint stats included).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import mars_dist
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
from mars_dist.data.splits import build_splits
from mars_dist.integrations.hf_trainer import MarsConstraintCallback
from mars_dist.models.factory import build_model, resolve_data_config


class TimmForTrainer(nn.Module):
    """What the Trainer expects of a model: forward(pixel_values, labels) -> {"loss", "logits"}."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values.to(next(self.model.parameters()).dtype))  # DeepSpeed bf16: no autocast
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


class AsDicts(torch.utils.data.Dataset):
    """(image, label) items as the Trainer's collator wants them."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        x, y = self.ds[i]
        return {"pixel_values": x, "labels": y}


class JsonlLogger(TrainerCallback):
    """A Trainer logger (main process): each log as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def deepspeed_bf16_without_gpu(training_args: TrainingArguments) -> None:
    """CPU-only machines (tests): transformers refuses bf16=True without a bf16 GPU, and use_cpu=True would switch
    DeepSpeed off; DeepSpeed's own bf16 (bf16 weights, fp32 masters) runs on its CPU accelerator. Turn it on in the
    DeepSpeed config the arguments already processed. Not needed (nor taken) on a GPU."""
    training_args.bf16, training_args.mixed_precision = True, "bf16"
    training_args.hf_deepspeed_config.config.setdefault("bf16", {})["enabled"] = True
    training_args.hf_deepspeed_config._dtype = torch.bfloat16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--radius", type=float, required=True)
    p.add_argument("--head-radius", type=float, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config file (default: the accelerate launch's)")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch (split over the processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = args.deepspeed
    if deepspeed is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # set by `accelerate launch` from its config
    configured = {}
    if deepspeed and world > 1 and not torch.cuda.is_available():
        # CPU only (tests): the Trainer starts DeepSpeed without naming a process-group backend, which accelerate
        # reads as "no distributed training" without a GPU; start the state with gloo and let the Trainer use it
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        configured = {"accelerator_config": {"use_configured_state": True}}
    cpu_bf16 = args.bf16 and deepspeed and not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(args.output / "trainer"), max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size // world, learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, bf16=args.bf16 and not cpu_bf16, deepspeed=deepspeed, logging_steps=1,
        save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, **configured)
    if cpu_bf16:
        deepspeed_bf16_without_gpu(training_args)

    splits = build_splits("fashion-mnist", None, args.train_per_class, 1, 0.0, 10, args.seed)
    timm_model = build_model("tf_efficientnet_lite0", "bundled", len(splits.class_names), head_seed=args.seed)
    if deepspeed and args.bf16:  # DeepSpeed bf16 casts the whole module and does not autocast: BatchNorm in fp32
        mars_dist.batchnorm_in_fp32(timm_model)
    transform = build_transforms(resolve_data_config(timm_model, args.image_size), train=True)
    train = AsDicts(ImageClassificationDataset(splits.train, transform, seed=args.seed))

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(model=TimmForTrainer(timm_model), args=training_args, train_dataset=train,
                      callbacks=[JsonlLogger(args.output / "metrics.jsonl")])
    constraint = MarsConstraintCallback.install(trainer, radius=args.radius, head_radius=args.head_radius)
    trainer.train()

    state = constraint.constrained.fp32_state_dict()  # every rank; the fp32 masters, also after bf16 training
    if trainer.is_world_process_zero():
        timm_names = {k.removeprefix("model."): v.contiguous() for k, v in state.items()}
        save_file(timm_names, str(args.output / "model.safetensors"))


if __name__ == "__main__":
    main()
