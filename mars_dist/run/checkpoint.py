"""Atomic, verified checkpoints through accelerate's save_state, plus the constraint state.

Layout: output_dir/checkpoints/step_00000010/ holds accelerate's state (model, optimizer incl. fp32 masters under
ZeRO, RNG states, registered objects such as the LR scheduler), `trainer_state.json` (position in the data,
identity of the model and anchors) and, written LAST, `MANIFEST.json` (size and sha256 of every other file). It is
written into a temporary sibling and renamed when complete; older checkpoints are removed only after that, so a
crash or a failed write (disk full, permission) leaves the previous checkpoint loadable.

`resume: auto` takes the newest checkpoint whose files match its manifest and says, in one line each, which newer
ones it skipped and why (truncated, checksum mismatch, no manifest).

Anchors are not stored: they are rebuilt at every start from the pretrained weights (deterministic, the fp32
values also under DeepSpeed bf16, and independent of the world size / sharding layout); the checkpoint records a checksum of them
and a resume whose rebuilt anchors differ is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

CHECKSUM_RTOL = 1e-9  # float64 sums over differently-cut fragments agree far better than this
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_dirs(output_dir: str | Path) -> list[Path]:
    """Renamed checkpoint directories (not `.tmp_step_*` being written), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: a directory counts once its manifest (written last) is in it. Whether
    the files still match it is `verify`'s business (it reads every byte)."""
    return [p for p in _step_dirs(output_dir) if (p / MANIFEST).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Size and sha256 of every file, fsynced before the manifest itself is written (and fsynced): a manifest on
    disk means the bytes it describes are on disk too."""
    entries = {}
    for path in _files(directory):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        entries[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = directory / (MANIFEST + ".part")
    with open(tmp, "w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / MANIFEST)


def verify(ckpt: str | Path, hashes: bool = True) -> str | None:
    """None if every file of the manifest is there with its size (and sha256); else why not, in a few words."""
    ckpt = Path(ckpt)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete: the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST}: {err}"
    if STATE not in files:
        return f"{MANIFEST} lists no {STATE}"
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if hashes and _sha256(path) != want["sha256"]:
            return f"{rel}: sha256 differs from the manifest (corrupt)"
    return None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep_last: int,
                    per_rank: Callable[[Path], None] | None = None) -> Path:
    """Every rank calls this. Returns the final checkpoint directory. `per_rank(directory)`: each rank writes its
    own files there too (the EMA's fragments), before the manifest. A write that fails on any rank (disk full,
    permission) raises CheckpointError on every rank, naming the path; the previous checkpoints stay as they were
    and the partial one is removed."""
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    error = ""
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            error = _why(err, root)
    error = agree_across_ranks(accelerator, error)
    if not error:
        try:
            accelerator.save_state(str(tmp))
            if per_rank is not None:
                per_rank(tmp)
        except Exception as err:  # OSError, or a writer's own (safetensors raises SafetensorError on ENOSPC)
            error = _why(err, tmp)
        error = agree_across_ranks(accelerator, error)
    if not error and accelerator.is_main_process:
        try:
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            write_manifest(tmp)
            if final.exists():  # the same step saved twice (e.g. end of run right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
        except Exception as err:  # OSError, or a writer's own (safetensors raises SafetensorError on ENOSPC)
            error = _why(err, tmp)
    error = agree_across_ranks(accelerator, error)
    if error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space; the older checkpoints are untouched
        raise CheckpointError(f"could not write checkpoint {final}: {error}; the previous checkpoint "
                              f"{latest_checkpoint(output_dir) or '(none)'} is intact; stopping")
    if accelerator.is_main_process and verify(final, hashes=False) is None:  # only then drop older ones
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _why(err: Exception, where: Path) -> str:
    """The error, where, and the free space there: writers hide ENOSPC behind their own messages (torch.save:
    "unexpected pos ...", safetensors: "I/O error"), the free space shows it."""
    if isinstance(err, OSError):
        text = f"{err.strerror or err} ({err.filename or where})"
    else:
        text = f"{str(err).strip()[:300]} ({type(err).__name__}, writing into {where})"
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        text += f"; {free / 1e6:.1f} MB free there"
    except OSError:
        pass
    return text


def agree_across_ranks(accelerator, error: str) -> str:
    """Every rank learns whether any rank failed (so none waits forever in a barrier the failed one never
    reaches); the message is the local one, or a pointer to the rank that has it."""
    import torch

    if accelerator.num_processes == 1:
        return error
    failed = accelerator.reduce(torch.tensor([float(bool(error))], device=accelerator.device), "sum")
    if float(failed) > 0 and not error:
        return "the write failed on another rank (see its error line)"
    return error


def read_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise CheckpointError(f"not a complete checkpoint (no {STATE}): {ckpt}")
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


def resolve_resume(resume: str, output_dir: str | Path, note: Callable[[str], None] = print) -> Path | None:
    """'none' -> None; 'auto' -> newest verified checkpoint in output_dir (or None), telling `note` which newer ones
    it skipped and why; else that directory, which must verify."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        for path in reversed(_step_dirs(output_dir)):
            problem = verify(path)
            if problem is None:
                return path
            note(f"resume: skipping checkpoint {path}: {problem}")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume: checkpoint directory not found: {resume}")
    read_state(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"resume: checkpoint {path} is not usable: {problem}")
    return path
