"""Fine-tune ImageNet EfficientNet-Lite0 on few-shot Fashion-MNIST with an ordinary accelerate loop, every layer kept
inside its MARS ball around the pretrained weights (mars_dist.attach). Runs as one process or under any launch config:

    python examples/accelerate_loop.py --radius 0.5 --head-radius 5 --max-steps 4 --output runs/ex
    accelerate launch --config_file launch/accelerate/zero3.yaml --num_processes 2 \
        examples/accelerate_loop.py --radius 0.5 --head-radius 5 --max-steps 4 --output runs/ex --bf16

On a CPU-only machine set DS_ACCELERATOR=cpu for DeepSpeed. Writes OUTPUT/model.safetensors (the fp32 weights, timm
parameter names) and OUTPUT/metrics.jsonl; with --ema DECAY also OUTPUT/model_ema.safetensors (the EMA of the fp32
weights, inside the same balls). The mars_dist lines are marked `# <- mars_dist`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from safetensors.torch import save_file

import mars_dist
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms
from mars_dist.data.splits import build_splits
from mars_dist.models.factory import build_model, resolve_data_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--radius", type=float, required=True, help="backbone radius: ||W - W0||_MARS <= R per layer")
    p.add_argument("--head-radius", type=float, required=True, help="head radius: ||W_head||_MARS <= H")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer updates")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--method", default="mars-pgm", help="mars-pgm, l2-pgm, mars-sp, l2-sp, mars-ftp or none")
    p.add_argument("--batch-size", type=int, default=8, help="GLOBAL batch (split over the processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-per-class", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (DeepSpeed: bf16 weights, fp32 masters)")
    p.add_argument("--bn-eval", action="store_true",
                   help="frozen BatchNorm statistics: results then do not depend on how the batch is split")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="also keep an EMA of the fp32 weights (timm's decay with warm-up) and export it")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_accelerator(bf16: bool) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and several else [],  # no NCCL on CPU
        cpu=on_cpu and not deepspeed,  # cpu=True would switch DeepSpeed off
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = 0.0  # accelerate's "auto" would clip at 1.0 under DeepSpeed only
    return accelerator


def main() -> None:
    args = parse_args()
    accelerator = make_accelerator(args.bf16)
    set_seed(args.seed)
    splits = build_splits("fashion-mnist", None, args.train_per_class, 1, 0.0, 10, args.seed)
    model = build_model("tf_efficientnet_lite0", "bundled", len(splits.class_names), head_seed=args.seed)
    low_precision = accelerator.state.deepspeed_plugin is not None and args.bf16
    if low_precision:  # DeepSpeed bf16 casts the whole module and does not autocast: BatchNorm must compute in fp32
        mars_dist.batchnorm_in_fp32(model)
    transform = build_transforms(resolve_data_config(model, args.image_size), train=True)
    data = ImageClassificationDataset(splits.train, transform, seed=args.seed)
    per_process = args.batch_size // accelerator.num_processes
    loader = torch.utils.data.DataLoader(data, batch_size=per_process, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    pretrained = mars_dist.capture_pretrained(model)  # <- mars_dist: after loading, before prepare
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    constrained = mars_dist.attach(model, optimizer, method=args.method, radius=args.radius,  # <- mars_dist
                                   head_radius=args.head_radius, accelerator=accelerator, pretrained=pretrained)
    ema = constrained.ema(args.ema) if args.ema is not None else None  # <- mars_dist (optional): after attach
    accelerator.print(f"mars_dist: {len(constrained.constraints)} layers constrained, projected on the "
                      f"{constrained.backend.name} backend's fp32 weights, {accelerator.num_processes} processes")

    model.train()
    if args.bn_eval:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    args.output.mkdir(parents=True, exist_ok=True)
    log = open(args.output / "metrics.jsonl", "w") if accelerator.is_main_process else None
    step, epoch = 0, 0
    while step < args.max_steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            x = x.to(torch.bfloat16) if low_precision else x
            loss = F.cross_entropy(model(x).float(), y)
            accelerator.backward(loss)
            optimizer.step()  # the projection runs inside this update
            optimizer.zero_grad()
            step += 1
            metrics = {"loss": float(loss.detach()), **constrained.log_dict()}  # <- mars_dist (every rank)
            if log is not None:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                accelerator.print(f"update {step}: loss {metrics['loss']:.4f}, worst distance/radius "
                                  f"{metrics['bound/max_ratio']:.6f}, bound term C {metrics['bound/C']:.2f}")
            if step >= args.max_steps:
                break
        epoch += 1

    state = constrained.fp32_state_dict()  # every rank (gathers); the fp32 masters, also after bf16 training
    if ema is not None:
        with ema.applied():  # every rank: the EMA in the masters inside the block, the trained weights after it
            averaged = constrained.fp32_state_dict()
    if accelerator.is_main_process:
        log.close()
        save_file({k: v.contiguous() for k, v in state.items()}, str(args.output / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in averaged.items()}, str(args.output / "model_ema.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
