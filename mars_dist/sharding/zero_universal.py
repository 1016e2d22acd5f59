"""Resuming a DeepSpeed ZeRO-1/2/3 checkpoint under another data-parallel world size (issue #10), or without
DeepSpeed (one process / DDP, issue #16: `load_state_without_deepspeed`), through DeepSpeed's own universal
checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank of the saving run; DeepSpeed loads it only under the same
data-parallel world size. Its layout-free form is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal`
writes every parameter's fp32 master and optimizer state whole (`zero/<name>/fp32.pt, exp_avg.pt, ...`), and an
engine whose config has `checkpoint: {load_universal: true}` cuts its own partitions out of them. Nothing here cuts
or merges optimizer state itself.

The trainer converts on rank 0 at resume time into a sibling `.universal_step_N/` (the verified checkpoint itself
is never written), every rank loads it through accelerate's `load_state`, and rank 0 removes it again.

What DeepSpeed 0.19.8's conversion cannot carry, refused by `unsupported` before anything heavy runs:
- SGD: ds_to_universal reads exactly `exp_avg`, `exp_avg_sq` and the fp32 masters of every partition (KeyError
  'exp_avg' on an SGD checkpoint); SGD's `momentum_buffer` has no place in it.
- AMSGrad: its `max_exp_avg_sq` is not converted and would silently restart at zero.
A universal load also skips the module state dict, so buffers (BatchNorm running statistics) are not restored by
DeepSpeed: `load_state` copies them from the saving run's rank-0 model states (buffers are whole on every rank).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch

MODEL_DIR = "pytorch_model"  # accelerate's DeepSpeed checkpoint tag (MODEL_NAME) inside a save_state directory


def unsupported(optimizer: str, amsgrad: bool) -> str | None:
    """Why this run's optimizer state cannot go through DeepSpeed 0.19.8's universal checkpoint, or None."""
    if optimizer not in ("adam", "adamw"):
        return (f"train.optimizer={optimizer}: DeepSpeed 0.19.8's universal checkpoint conversion (ds_to_universal) "
                f"carries only Adam's exp_avg / exp_avg_sq, not {optimizer}'s momentum buffer")
    if amsgrad:
        return ("train.amsgrad=true: DeepSpeed 0.19.8's universal checkpoint conversion (ds_to_universal) does not "
                "carry AMSGrad's max_exp_avg_sq")
    return None


def enable(accelerator) -> None:
    """Make the engine accelerate builds load universal checkpoints (call before `accelerator.prepare`)."""
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


def convert(ckpt: Path, work: Path) -> None:
    """A copy of accelerate's checkpoint directory `ckpt` in `work` whose DeepSpeed part is universal: the other
    files (RNG states, LR schedule, trainer state) are symlinked, `pytorch_model/` is ds_to_universal's output."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(work, ignore_errors=True)  # a stale one from an interrupted resume
    work.mkdir(parents=True)
    for entry in ckpt.iterdir():
        if entry.name != MODEL_DIR:
            os.symlink(entry.resolve(), work / entry.name)
    args = Namespace(input_folder=str(ckpt / MODEL_DIR), output_folder=str(work / MODEL_DIR),
                     num_extract_workers=1, num_merge_workers=1,  # no worker processes forked from a trainer rank
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as err:
        raise RuntimeError(f"{type(err).__name__}: {err} (ds_to_universal output: "
                           f"{log.getvalue().strip()[-500:]})") from err


def restore_buffers(engine, universal_dir: Path) -> None:
    """Copy the saving run's buffers (rank 0's model states) into this engine's module: the universal load restores
    parameters and optimizer state only."""
    files = sorted(universal_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states file in {universal_dir}")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    module_state = saved["module"]
    missing = []
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name in module_state:
                buf.copy_(module_state[name].to(buf.device, buf.dtype))
            else:
                missing.append(name)
    if missing:
        raise KeyError(f"{files[0]}: buffers {missing[:5]} are not in the checkpoint's model states")


def load_state(accelerator, engine, ckpt: Path) -> None:
    """Every rank calls this instead of `accelerator.load_state(ckpt)`. Conversion errors stop every rank with one
    line naming the checkpoint."""
    from mars_dist.run.checkpoint import CheckpointError, agree_across_ranks

    work = ckpt.parent / f".universal_{ckpt.name}"
    error = ""
    if accelerator.is_main_process:
        accelerator.print(f"resume: converting {ckpt} to DeepSpeed's universal checkpoint (another world size)")
        try:
            convert(ckpt, work)
        except Exception as err:  # DeepSpeed's own errors: name the checkpoint, keep the reason
            error = str(err)[:800]
    error = agree_across_ranks(accelerator, error)
    if error:
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise CheckpointError(f"resume: could not convert {ckpt} to DeepSpeed's universal checkpoint: {error}")
    try:
        accelerator.load_state(str(work))
        restore_buffers(engine, work / MODEL_DIR)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)


# ---- a DeepSpeed checkpoint resumed without DeepSpeed (one process or DDP) ----

def _universal_tensor(path: Path) -> torch.Tensor:
    """One state of one parameter in a universal checkpoint: ds_to_universal saves ZeRO-3 states as bare tensors,
    ZeRO-1/2 ones as {"param": tensor}."""
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value


def _adam_step(zero_dir: Path, name: str) -> torch.Tensor:
    """Adam's update count: `zero/NAME/step.pt` (ZeRO-1/2), else the flat group's in `zero/optimizer_state.pt`
    (ZeRO-3 keeps one per sub-group; the trainer has one group)."""
    per_param = zero_dir / name / "step.pt"
    if per_param.is_file():
        step = torch.load(per_param, map_location="cpu", weights_only=False)
    else:
        state = torch.load(zero_dir / "optimizer_state.pt", map_location="cpu", weights_only=False)
        step = state["optimizer_state_dict"]["state"][0]["step"]
    return torch.as_tensor(step, dtype=torch.float32).reshape(())


def write_torch_state(universal_dir: Path, out: Path, model, optimizer) -> None:
    """From ds_to_universal's output, what accelerate's `load_state` reads for one process / DDP: `model.safetensors`
    (the fp32 masters, and the buffers from the saving run's rank-0 model states) and `optimizer.bin` (this run's
    torch Adam state dict with the saved exp_avg / exp_avg_sq / step and the saved param-group values: the LR the
    schedule had set is the one the next update uses)."""
    from safetensors.torch import save_file

    zero = universal_dir / "zero"
    module_state = torch.load(sorted(universal_dir.glob("*model_states.pt"))[0], map_location="cpu",
                              weights_only=False)["module"]
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {}
    for key, value in model.state_dict().items():
        source = zero / key / "fp32.pt"
        if source.is_file():
            weights[key] = _universal_tensor(source).reshape(value.shape).to(value.dtype).contiguous()
        elif key in module_state and key not in names.values():
            weights[key] = module_state[key].to(value.dtype).contiguous()
        else:
            raise KeyError(f"{universal_dir}: no {source.relative_to(universal_dir)} and no buffer {key!r} in the "
                           f"model states")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    saved_groups = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"]
    template = optimizer.state_dict()
    state, index = {}, 0
    for group, saved_group in zip(template["param_groups"], saved_groups):
        group.update({k: v for k, v in saved_group.items() if k in group and k != "params"})
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            state[index] = {"step": _adam_step(zero, name),
                            **{k: _universal_tensor(zero / name / f"{k}.pt").reshape(p.shape).to(p.dtype)
                               for k in ("exp_avg", "exp_avg_sq")}}
            index += 1
    torch.save({"state": state, "param_groups": template["param_groups"]}, out / "optimizer.bin")


def load_state_without_deepspeed(accelerator, model, optimizer, ckpt: Path) -> None:
    """Every rank calls this instead of `accelerator.load_state(ckpt)` when `ckpt` was written by DeepSpeed and
    this run has no DeepSpeed: rank 0 converts it (DeepSpeed's universal checkpoint, then the torch form of that)
    into a sibling `.torch_step_N/`, every rank loads that, rank 0 removes it. `ckpt` itself is only read."""
    from mars_dist.run.checkpoint import CheckpointError, agree_across_ranks

    work = ckpt.parent / f".torch_{ckpt.name}"
    error = ""
    if accelerator.is_main_process:
        try:
            convert(ckpt, work)
            write_torch_state(work / MODEL_DIR, work, accelerator.unwrap_model(model), optimizer)
        except Exception as err:  # DeepSpeed's own errors, a missing tensor: name the checkpoint, keep the reason
            error = f"{type(err).__name__}: {err}"[:800]
    error = agree_across_ranks(accelerator, error)
    try:
        if error:
            raise CheckpointError(f"resume: could not convert DeepSpeed checkpoint {ckpt} for a run without "
                                  f"DeepSpeed: {error}")
        accelerator.load_state(str(work))
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
