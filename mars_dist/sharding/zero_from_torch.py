"""A one-process / DDP checkpoint resumed under DeepSpeed ZeRO-1/2/3 (issue #16), through DeepSpeed's own universal
checkpoint.

A torch checkpoint holds the model (`model.safetensors`) and Adam's state (`optimizer.bin`) whole; DeepSpeed loads
its own ZeRO partitions or a universal checkpoint (`zero/<param>/fp32.pt, exp_avg.pt, exp_avg_sq.pt`, plus its
global optimizer state and model-states files). Nothing here writes those metadata or cuts partitions: the engine
of this run saves its own (fresh) checkpoint, `ds_to_universal` converts that, and only the VALUES of each
parameter's universal files are replaced by the torch checkpoint's (same shape, same dtype, same container), with
Adam's update count and the learning rate the schedule had set. The engine then loads it with `load_universal`
(sharding/zero_universal.py `enable`), cutting its partitions itself, and the buffers (BatchNorm statistics, which
a universal load skips) are copied from the torch checkpoint. The checkpoint itself is only read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mars_dist.sharding.zero_universal import MODEL_DIR, convert


def _replace(path: Path, value: torch.Tensor) -> None:
    """Overwrite the tensor of a universal file with `value`, keeping its container ({"param": t} or bare), shape
    and dtype."""
    old = torch.load(path, map_location="cpu", weights_only=False)
    tensor = old["param"] if isinstance(old, dict) else old
    if value.numel() != tensor.numel():
        raise ValueError(f"{path}: {tensor.numel()} elements in DeepSpeed's layout, {value.numel()} in the checkpoint")
    new = value.detach().reshape(tensor.shape).to(tensor.dtype).clone()
    torch.save({**old, "param": new} if isinstance(old, dict) else new, path)


def _set_step_and_groups(zero: Path, step, groups: list[dict]) -> None:
    """Adam's update count and the param-group values (lr, betas, ...) in the universal global optimizer state,
    and in each parameter's `step.pt` where ZeRO-1/2 keep it."""
    path = zero / "optimizer_state.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    inner = state.get("optimizer_state_dict")
    for saved_groups in (state.get("param_groups"), (inner or {}).get("param_groups")):
        for group, mine in zip(saved_groups or [], groups):
            group.update({k: v for k, v in mine.items() if k in group and k != "params"})
    if inner and 0 in inner.get("state", {}) and "step" in inner["state"][0]:  # ZeRO-3: one per flat group
        for flat in inner["state"].values():
            flat["step"] = torch.as_tensor(step, dtype=torch.as_tensor(flat["step"]).dtype)
    torch.save(state, path)
    for per_param in zero.glob("*/step.pt"):
        old = torch.load(per_param, map_location="cpu", weights_only=False)
        torch.save(torch.as_tensor(step, dtype=old.dtype) if torch.is_tensor(old) else type(old)(step), per_param)


def write_universal(ckpt: Path, universal_dir: Path, names: list[str]) -> None:
    """Put the torch checkpoint's fp32 weights and Adam state into the universal checkpoint `universal_dir`, made
    from this run's own engine. `names`: the trainable parameters in the order the saving run's optimizer had them
    (the model's order: optim.build_optimizer)."""
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=False)
    zero = universal_dir / "zero"
    if len(optim["state"]) != len(names):
        raise ValueError(f"{ckpt / 'optimizer.bin'} holds state for {len(optim['state'])} parameters, this model has "
                         f"{len(names)} trainable ones")
    steps = set()
    for index, name in enumerate(names):
        state = optim["state"][index]
        _replace(zero / name / "fp32.pt", weights[name].float())
        for key in ("exp_avg", "exp_avg_sq"):
            _replace(zero / name / f"{key}.pt", state[key])
        steps.add(float(state["step"]))
    if len(steps) != 1:
        raise ValueError(f"{ckpt / 'optimizer.bin'}: parameters at different Adam steps {sorted(steps)[:4]}")
    _set_step_and_groups(zero, steps.pop(), optim["param_groups"])


def _init_adam_state(engine) -> None:
    """The Adam state torch creates at an optimizer's first step (`step` 0, zero moments), for each of this rank's
    flat fp32 partitions, so that the fresh engine's checkpoint has the entries ds_to_universal converts (torch
    creates them lazily; every value is replaced by the loaded checkpoint's)."""
    zero = engine.optimizer
    base = zero.optimizer  # the trainer's torch Adam over DeepSpeed's flat fp32 partitions
    # ZeRO-3 hands its flat partitions to the torch optimizer only during a step (and a save); ZeRO-1/2 keep them
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    for flat in flats:
        if not base.state.get(flat):
            base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}


def load_state(accelerator, engine, ckpt: Path) -> None:
    """Every rank calls this instead of `accelerator.load_state(ckpt)` when `ckpt` was written by one process / DDP
    and this run is DeepSpeed (whose config has `load_universal`: zero_universal.enable before prepare)."""
    from safetensors.torch import load_file

    from mars_dist.run.checkpoint import CheckpointError, agree_across_ranks

    template, work = ckpt.parent / f".zero_template_{ckpt.name}", ckpt.parent / f".zero_{ckpt.name}"
    if accelerator.is_main_process:
        shutil.rmtree(template, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = ""
    try:
        _init_adam_state(engine)
        engine.save_checkpoint(str(template), tag=MODEL_DIR)  # every rank: DeepSpeed's own files for this layout
        if accelerator.is_main_process:
            convert(template, work)
            for entry in ckpt.iterdir():  # RNG states, LR schedule, trainer state: the checkpoint's own
                if entry.name not in (MODEL_DIR, "model.safetensors", "optimizer.bin"):
                    link = work / entry.name
                    if link.is_symlink() or link.exists():
                        link.unlink()
                    os.symlink(entry.resolve(), link)
            names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
            write_universal(ckpt, work / MODEL_DIR, names)
    except Exception as err:  # DeepSpeed's own errors, a shape that does not match: name the checkpoint
        error = f"{type(err).__name__}: {err}"[:800]
    error = agree_across_ranks(accelerator, error)
    try:
        if error:
            raise CheckpointError(f"resume: could not convert checkpoint {ckpt} for DeepSpeed: {error}")
        accelerator.load_state(str(work))
        buffers = load_file(str(ckpt / "model.safetensors"))
        with torch.no_grad():  # a universal load restores parameters and optimizer state only
            for name, buf in engine.module.named_buffers():
                buf.copy_(buffers[name].to(buf.device, buf.dtype))
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(template, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
