"""What a resume may change (issue #10 part 3).

A checkpoint records the config keys that change the math of the run (`config.RESUME_MATH_KEYS`) and the batch
layout it was written under. A resume whose config differs in such a key is refused, naming each key with both
values, unless the key is listed in `checkpoint.resume_allow_changes`; the layout (world size, micro-batch,
grad_accum, global batch) may change, and the resume says what changed in one line.
"""

from __future__ import annotations

import json
from typing import Callable

from mars_dist.run.checkpoint import CheckpointError
from mars_dist.config import RESUME_MATH_KEYS, Config, to_dict


class ConfigChanged(CheckpointError):
    """A resume with a config that changes the math, not allowed by checkpoint.resume_allow_changes."""


def math_keys(cfg: Config) -> dict:
    """The values of RESUME_MATH_KEYS, as JSON gives them back (lists of dicts for constraint.groups)."""
    flat = to_dict(cfg)
    out = {}
    for key in RESUME_MATH_KEYS:
        node = flat
        for part in key.split("."):
            node = node[part]
        out[key] = node
    if cfg.train.scheduler != "cosine":  # only the cosine schedule depends on the run's length
        out.pop("train.max_steps"), out.pop("train.epochs")
    return json.loads(json.dumps(out))


def layout(cfg: Config, world_size: int) -> dict:
    return {"world_size": world_size, "micro_batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "global_batch": world_size * cfg.train.batch_size * cfg.train.grad_accum}


def check(saved: dict, cfg: Config, world_size: int, ckpt, note: Callable[[str], None]) -> None:
    """Refuse math changes not allowed; note allowed ones and layout changes (one line each)."""
    before, now = saved.get("config"), math_keys(cfg)
    if before is not None:
        changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
                   if k in before and k in now and before[k] != now[k]}
        allowed = set(cfg.checkpoint.resume_allow_changes)
        refused = {k: v for k, v in changed.items() if k not in allowed and "all" not in allowed}
        if refused:
            raise ConfigChanged(
                f"checkpoint {ckpt} was made with another config: {_describe(refused)}; refusing to resume (this "
                f"changes the math of the run). To resume anyway set checkpoint.resume_allow_changes="
                f"[{','.join(refused)}], or use another output_dir")
        if changed:
            note(f"resume: config changed (allowed by checkpoint.resume_allow_changes): {_describe(changed)}")
    old, new = saved.get("layout"), layout(cfg, world_size)
    if old is not None and old != new:
        note("resume: layout changed: " + ", ".join(
            f"{k.replace('_', ' ')} {old.get(k)} -> {new[k]}" if old.get(k) != new[k] else f"{k.replace('_', ' ')} "
            f"{new[k]}" for k in new))


def _describe(changes: dict) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


# ---- the backend a checkpoint was written by, and what another backend can resume ----

def backend_of(accelerator) -> dict:
    """How this run keeps its state, recorded in every checkpoint (`trainer_state.json`, key "backend"): a resume
    under another backend checks it before anything heavy is built, without guessing from file names."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        return {"kind": "deepspeed", "zero_stage": int(zero.get("stage", 0)), "offload": offload,
                "zero3_init": bool(getattr(plugin, "zero3_init_flag", False))}
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return {"kind": "fsdp2"}
    return {"kind": "torch"}  # one process or DDP: model and optimizer saved whole (model.safetensors, optimizer.bin)


def saved_backend(saved: dict, ckpt) -> dict:
    """The checkpoint's backend: recorded, or (checkpoints written before it was) read off the files accelerate
    wrote: DeepSpeed's `pytorch_model/*model_states.pt` (ZeRO-3 writes one per rank, `zero_pp_rank_R_...`, ZeRO-1/2
    one `mp_rank_00_...`), FSDP's `pytorch_model_fsdp_0/`, else the whole model and optimizer of one process / DDP."""
    if saved.get("backend"):
        return saved["backend"]
    from pathlib import Path

    ckpt = Path(ckpt)
    states = sorted((ckpt / "pytorch_model").glob("*model_states.pt"))
    if states:
        return {"kind": "deepspeed", "zero_stage": 3 if states[0].name.startswith("zero_pp_rank_") else None,
                "offload": None, "zero3_init": None}
    if (ckpt / "pytorch_model_fsdp_0").exists():
        return {"kind": "fsdp2"}
    return {"kind": "torch"}


def describe(backend: dict, world_size) -> str:
    """'DeepSpeed ZeRO-3 on 2 processes', 'one process without DeepSpeed', 'DDP on 2 processes', ..."""
    n = f"{world_size} process{'es' if world_size != 1 else ''}" if world_size else "an unknown number of processes"
    if backend["kind"] == "deepspeed":
        stage = backend.get("zero_stage") or "1/2"
        extra = (" with ZeRO-Offload" if backend.get("offload") else
                 " under zero.Init" if backend.get("zero3_init") else "")
        return f"DeepSpeed ZeRO-{stage}{extra} on {n}"
    if backend["kind"] == "fsdp2":
        return f"FSDP2 on {n}"
    return "one process without DeepSpeed" if world_size == 1 else f"DDP on {n}"


def launch_for(backend: dict, world_size) -> str:
    """The shipped launch that resumes a checkpoint of `backend` as it was written."""
    n = f" --num_processes {world_size}" if world_size else ""
    if backend["kind"] == "deepspeed":
        stage = backend.get("zero_stage")
        name = ("zero3_offload" if backend.get("offload") else "zero3_init" if backend.get("zero3_init") else
                "zero3") if stage == 3 else f"zero{stage}" if stage else "zero1.yaml or zero2"
        return f"accelerate launch --config_file launch/accelerate/{name}.yaml{n} -m mars_dist train ..."
    if backend["kind"] == "fsdp2":
        return f"accelerate launch --config_file launch/accelerate/fsdp2.yaml{n} -m mars_dist train ..."
    return ("mars-dist train ... (one process) or accelerate launch --config_file launch/accelerate/cpu.yaml "
            "--num_processes N -m mars_dist train ... (DDP, any N)")  # saved whole: any world size loads it


def check_backend(saved: dict, cfg: Config, accelerator, ckpt) -> str | None:
    """Before anything heavy is built: can this run's backend resume the checkpoint? Returns "from_zero" (a
    DeepSpeed checkpoint loaded without DeepSpeed: `sharding.zero_universal.load_state_without_deepspeed`),
    "to_zero" (a one-process / DDP checkpoint loaded under DeepSpeed: `sharding.zero_from_torch.load_state`), both
    through DeepSpeed's universal checkpoint, or None (the same kind of backend). Raises CheckpointError, in one line
    naming the checkpoint's backend and the launch that resumes it, where the state cannot carry over."""
    old, new = saved_backend(saved, ckpt), backend_of(accelerator)
    world = (saved.get("layout") or {}).get("world_size")
    written = f"checkpoint {ckpt} was written by {describe(old, world)}"
    here = describe(new, accelerator.num_processes)
    resume = f"resume it with {launch_for(old, world)}"
    if old["kind"] == new["kind"] == "deepspeed" and old.get("zero_stage") not in (None, new["zero_stage"]):
        raise CheckpointError(f"{written}; this run is {here}, which cannot load it (DeepSpeed loads ZeRO partitions "
                              f"under the stage that wrote them); {resume}")
    if old["kind"] == new["kind"]:
        return None  # another world size is elastic.check_world_size's business
    if {old["kind"], new["kind"]} == {"deepspeed", "torch"}:
        from mars_dist.sharding.zero_universal import unsupported

        saved_cfg = saved.get("config") or {}
        why = unsupported(saved_cfg.get("train.optimizer", cfg.train.optimizer),
                          saved_cfg.get("train.amsgrad", cfg.train.amsgrad))
        if why is None:
            accelerator.print(f"resume: {written}; this run is {here}: loading its fp32 weights and Adam moments "
                              f"through DeepSpeed's universal checkpoint")
            return "from_zero" if old["kind"] == "deepspeed" else "to_zero"
        raise CheckpointError(f"{written}; this run is {here}, which cannot load it: {why}; {resume}")
    raise CheckpointError(f"{written}; this run is {here}, which cannot load it (FSDP2 and DeepSpeed / DDP "
                          f"checkpoints hold the model and optimizer in different forms); {resume}")
