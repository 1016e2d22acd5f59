"""What a resume may change (issue #10 part 3).

A checkpoint records the config keys that change the math of the run (`config.RESUME_MATH_KEYS`) and the batch
layout it was written under. A resume whose config differs in such a key is refused, naming each key with both
values, unless the key is listed in `checkpoint.resume_allow_changes`; the layout (world size, micro-batch,
grad_accum, global batch) may change, and the resume says what changed in one line.
"""

from __future__ import annotations

import json
from typing import Callable

from mars_dist.checkpoint import CheckpointError
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
