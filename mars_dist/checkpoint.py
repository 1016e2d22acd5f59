"""Atomic checkpoints through accelerate's save_state, plus the constraint state.

Layout: output_dir/checkpoints/step_00000010/ holds accelerate's state (model, optimizer incl. fp32 masters under
ZeRO, RNG states, registered objects such as the LR scheduler) and `trainer_state.json` (position in the data,
identity of the model and anchors). It is written into a temporary sibling and renamed when complete, so a crash
while writing leaves the previous checkpoint loadable.

Anchors are not stored: they are rebuilt at every start from the pretrained weights (deterministic, including
the bf16 cast, and independent of the world size / sharding layout); the checkpoint records a checksum of them
and a resume whose rebuilt anchors differ is refused.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

CHECKSUM_RTOL = 1e-9  # float64 sums over differently-cut fragments agree far better than this


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory counts once trainer_state.json is in it)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    """Every rank calls this. Returns the final checkpoint directory."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # the same step saved twice (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"not a complete checkpoint (no trainer_state.json): {ckpt}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"unreadable checkpoint state {path}: {err}") from None


def check_identity(saved: dict, current: dict, ckpt: str | Path) -> None:
    """Refuse to resume a checkpoint of another model, head size or anchor."""
    for key in ("model", "pretrained", "num_classes", "method"):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {ckpt} was made with {key}={saved.get(key)!r}, this run has "
                                  f"{key}={current.get(key)!r}; refusing to resume (use another output_dir)")
    a, b = saved.get("anchor_checksum"), current.get("anchor_checksum")
    if a is not None and b is not None:
        if len(a) != len(b) or any(not math.isclose(x, y, rel_tol=CHECKSUM_RTOL, abs_tol=1e-6) for x, y in zip(a, b)):
            raise CheckpointError(f"checkpoint {ckpt}: anchor checksum {a} differs from the anchors rebuilt from the "
                                  f"pretrained weights {b}; refusing to resume with different anchors")


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'none' -> None; 'auto' -> latest complete checkpoint in output_dir (or None); else that directory."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume: checkpoint directory not found: {resume}")
    read_state(path)
    return path
