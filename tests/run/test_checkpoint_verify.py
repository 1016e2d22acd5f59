"""Verified checkpoints (issue #10 part 1): a manifest of sizes and sha256 written last; `resume: auto` skips a
truncated, corrupt or incomplete newest checkpoint and takes the newest good one; a failing write (a real ENOSPC on
a tiny tmpfs, or an injected one) stops with an error naming the path and leaves the previous checkpoint intact.

The unit tests save a small model through a real single-process Accelerator; the slow ones run the real trainer."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mars_dist.run import checkpoint as ckpt


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 1, 2, 3 of a small model through accelerate's save_state."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2, 3):
        model(torch.randn(4, 64)).sum().backward()
        optimizer.step()
        ckpt.save_checkpoint(accelerator, tmp_path, step, {"step": step}, keep_last=5)
    return accelerator, tmp_path


def auto(out: Path) -> tuple[Path | None, list[str]]:
    notes: list[str] = []
    return ckpt.resolve_resume("auto", out, notes.append), notes


def test_manifest_lists_every_file_and_verifies(saved):
    _, out = saved
    for path in ckpt.list_checkpoints(out):
        files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
        on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST}
        assert set(files) == on_disk and ckpt.STATE in files and "model.safetensors" in files
        assert ckpt.verify(path) is None
    assert auto(out) == (ckpt.checkpoint_root(out) / "step_00000003", [])


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "model.safetensors has 100 bytes, the manifest says"),
    ("flip", "model.safetensors: sha256 differs from the manifest"),
    ("no_manifest", "no MANIFEST.json (incomplete"),
    ("missing_file", "is missing"),
])
def test_auto_resume_skips_a_damaged_newest_checkpoint(saved, damage, reason):
    _, out = saved
    newest = ckpt.checkpoint_root(out) / "step_00000003"
    weights = newest / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":  # same size, one byte changed: only the checksum sees it
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / ckpt.MANIFEST).unlink()
    else:
        next(p for p in newest.iterdir() if p.name.startswith("random_states")).unlink()
    found, notes = auto(out)
    assert found == ckpt.checkpoint_root(out) / "step_00000002"
    assert len(notes) == 1 and f"skipping checkpoint {newest}" in notes[0] and reason in notes[0], notes
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {newest} is not usable"):
        ckpt.resolve_resume(str(newest), out)  # an explicit path that does not verify is refused


def test_auto_resume_with_every_checkpoint_damaged_starts_fresh(saved):
    _, out = saved
    for path in ckpt.list_checkpoints(out):
        (path / ckpt.STATE).write_text("{}")  # another size than the manifest says
    found, notes = auto(out)
    assert found is None and len(notes) == 3


def _tree(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_failing_write_stops_and_keeps_the_previous_checkpoint(saved, monkeypatch):
    """save_state writes part of the checkpoint, then the disk is full: CheckpointError naming the checkpoint and
    the file, the partial directory gone, every earlier checkpoint byte for byte as it was."""
    accelerator, out = saved
    before = _tree(out)
    real = accelerator.save_state

    def full_disk(directory, **kw):
        real(directory, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "optimizer.bin"))

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save_checkpoint(accelerator, out, 4, {"step": 4}, keep_last=1)
    msg = str(err.value)
    assert f"could not write checkpoint {ckpt.checkpoint_root(out) / 'step_00000004'}" in msg
    assert "No space left on device" in msg and "optimizer.bin" in msg and "step_00000003 is intact" in msg
    assert _tree(out) == before  # keep_last=1 deleted nothing: the new one never completed
    assert auto(out)[0].name == "step_00000003"


def test_real_enospc_on_a_tiny_tmpfs(tmp_path):
    """The same with a real full disk: a tmpfs that holds one checkpoint and a half."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights
    model = accelerator.prepare(model)
    probe = tmp_path / "probe"
    ckpt.save_checkpoint(accelerator, probe, 1, {"step": 1}, keep_last=5)
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ckpt.save_checkpoint(accelerator, mnt, 1, {"step": 1}, keep_last=5)
        before = _tree(mnt)
        full = r"could not write checkpoint .*step_00000002: .*No space left on device"
        with pytest.raises(ckpt.CheckpointError, match=full):
            ckpt.save_checkpoint(accelerator, mnt, 2, {"step": 2}, keep_last=1)
        assert _tree(mnt) == before
        assert auto(mnt) == (ckpt.checkpoint_root(mnt) / "step_00000001", [])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    shutil.rmtree(probe)


@pytest.mark.slow
def test_trainer_resumes_past_a_truncated_newest_checkpoint(tmp_path, capsys):
    """The real trainer: 4 updates with checkpoints at 2 and 4, step 4's weights truncated; `resume=auto` says it
    skips step 4, resumes from step 2, and ends bit-identical to an uninterrupted run."""
    from safetensors.torch import load_file

    from mars_dist import config
    from mars_dist.run.train import train

    def tiny(out: Path, *overrides: str):
        return config.load(None, [
            f"output_dir={out}", "data.image_size=32", "data.train_per_class=4", "data.val_per_class=1",
            "data.test_limit=20", "train.batch_size=8", "train.max_steps=4", "train.lr=3e-3",
            "train.eval_every_epoch=false", "constraint.radius=1.0", "constraint.head_radius=2.0",
            "tracking.wandb_mode=disabled", *overrides])

    part = tmp_path / "part"
    train(tiny(part, "checkpoint.every_steps=2", "checkpoint.keep_last=5"))  # also the uninterrupted run
    uninterrupted = load_file(str(part / "export/model.safetensors"))
    newest = ckpt.checkpoint_root(part) / "step_00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    capsys.readouterr()
    assert train(tiny(part, "resume=auto"))["updates"] == 4
    printed = capsys.readouterr().out
    assert f"resume: skipping checkpoint {newest}: model.safetensors has" in printed
    assert f"resumed from {ckpt.checkpoint_root(part) / 'step_00000002'} at update 2" in printed
    a, b = uninterrupted, load_file(str(part / "export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.verify(newest) is None  # rewritten whole by the resumed run


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_stop_together_on_a_full_disk(tmp_path):
    """Two DDP processes writing to a tmpfs that holds one checkpoint and a half: the second checkpoint fails on
    rank 0 (ENOSPC); every rank learns it and stops with one error line (no rank waits in a barrier, no requeue
    marker); the first checkpoint is intact and verifies, the partial one is gone."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_launch import PER_RANK, ROOT, accelerate_cmd, run_env

    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(out)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:  # a checkpoint of the tiny recipe: 27.3 MB (weights + SGD momentum); two do not fit in 40 MB
        proc = subprocess.run(accelerate_cmd("cpu.yaml", *PER_RANK, "checkpoint.every_steps=1",
                                             "checkpoint.keep_last=5", f"output_dir={out}"),
                              cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, text[-3000:]
        first = ckpt.checkpoint_root(out) / "step_00000001"
        # which rank and which file hit the full disk first varies (torch.save then says "unexpected pos ...",
        # safetensors "No space left on device"): every rank stops with a line naming the checkpoint
        # (ranks' lines can interleave on one line of the captured output: count occurrences, not lines)
        root = ckpt.checkpoint_root(out)
        error = f"mars-dist train: CheckpointError: could not write checkpoint {root}/step_00000002"
        assert text.count(error) == 2 and text.count(f"{first} is intact; stopping") == 2, text[-3000:]
        assert " MB free there" in text, text[-3000:]
        assert ckpt.list_checkpoints(out) == [first] and ckpt.verify(first) is None
        assert not list(ckpt.checkpoint_root(out).glob(".tmp_step_*"))
        assert not (out / "rank_lost.json").exists()
    finally:
        subprocess.run(["umount", str(out)], check=False)
