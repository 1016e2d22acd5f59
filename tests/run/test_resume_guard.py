"""A resume that changes the math (issue #10 part 3): refused naming the keys unless checkpoint.resume_allow_changes
lists them; the batch layout is recorded and a change of it is printed in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mars_dist.run import checkpoint as ckpt
from mars_dist import config
from mars_dist.run import resume_guard


def cfg_of(*overrides: str) -> config.Config:
    return config.load(None, list(overrides))


def test_allow_list_is_validated():
    with pytest.raises(config.ConfigError, match=r"'checkpoint.resume_allow_changes\[1\]' = 'train.lrr' is not one "
                                                 r"of the keys .*did you mean 'train.lr'"):
        cfg_of("checkpoint.resume_allow_changes=[seed, train.lrr]")
    assert cfg_of("checkpoint.resume_allow_changes=[all]").checkpoint.resume_allow_changes == ["all"]


def _state(cfg, world=1):
    return {"config": resume_guard.math_keys(cfg), "layout": resume_guard.layout(cfg, world)}


def test_math_changes_are_refused_naming_every_key():
    saved = _state(cfg_of("train.lr=0.01", "constraint.groups=[{pattern: 'blocks.0.*', radius: 2.0}]"))
    now = cfg_of("train.lr=0.02", "seed=3", "constraint.groups=[{pattern: 'blocks.0.*', radius: 3.0}]")
    with pytest.raises(ckpt.CheckpointError) as err:
        resume_guard.check(saved, now, 1, "CK", print)
    msg = str(err.value)
    assert "checkpoint CK was made with another config:" in msg
    for part in ("train.lr 0.01 -> 0.02", "seed 0 -> 3", "'radius': 2.0}] -> [{", "resume_allow_changes=["
                 "constraint.groups,seed,train.lr]"):
        assert part in msg, msg
    notes = []  # allowed: one note naming the changes
    allowed = cfg_of("train.lr=0.02", "seed=3", "constraint.groups=[{pattern: 'blocks.0.*', radius: 3.0}]",
                     "checkpoint.resume_allow_changes=[train.lr, seed, constraint.groups]")
    resume_guard.check(saved, allowed, 1, "CK", notes.append)
    assert len(notes) == 1 and "config changed" in notes[0] and "seed 0 -> 3" in notes[0]


def test_run_length_matters_only_for_cosine():
    resume_guard.check(_state(cfg_of("train.scheduler=constant", "train.max_steps=4")),
                       cfg_of("train.scheduler=constant", "train.max_steps=8"), 1, "CK", print)
    with pytest.raises(ckpt.CheckpointError, match="train.max_steps 4 -> 8"):
        resume_guard.check(_state(cfg_of("train.max_steps=4")), cfg_of("train.max_steps=8"), 1, "CK", print)


def test_layout_change_is_one_line():
    notes = []
    resume_guard.check(_state(cfg_of("train.batch_size=4", "train.grad_accum=2"), world=2),
                       cfg_of("train.batch_size=4", "train.grad_accum=4"), 1, "CK", notes.append)
    assert notes == ["resume: layout changed: world size 2 -> 1, micro batch 4, grad accum 2 -> 4, global batch 16"]


@pytest.mark.slow
def test_trainer_refuses_then_allows_a_changed_lr(tmp_path, capsys):
    from mars_dist.run.train import train

    def tiny(*overrides: str):
        return cfg_of(f"output_dir={tmp_path}", "data.image_size=32", "data.train_per_class=4",
                      "data.val_per_class=1", "data.test_limit=20", "train.batch_size=8", "train.lr=3e-3",
                      "train.scheduler=constant", "train.eval_every_epoch=false", "tracking.wandb_mode=disabled",
                      *overrides)

    train(tiny("train.max_steps=2"))
    saved = {p: p.read_bytes() for p in Path(tmp_path, "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(ckpt.CheckpointError, match=r"train.lr 0.003 -> 0.001, train.weight_decay 0.0 -> 0.1; "
                                                   r"refusing to resume"):
        train(tiny("train.max_steps=3", "resume=auto", "train.lr=1e-3", "train.weight_decay=0.1"))
    assert {p: p.read_bytes() for p in Path(tmp_path, "checkpoints").rglob("*") if p.is_file()} == saved
    capsys.readouterr()
    result = train(tiny("train.max_steps=3", "resume=auto", "train.lr=1e-3", "train.grad_accum=2",
                        "checkpoint.resume_allow_changes=[train.lr]"))
    assert result["updates"] == 3
    out = capsys.readouterr().out
    assert "resume: config changed (allowed by checkpoint.resume_allow_changes): train.lr 0.003 -> 0.001" in out
    assert "resume: layout changed: world size 1, micro batch 8, grad accum 1 -> 2, global batch 8 -> 16" in out
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path))
    assert state["layout"] == {"world_size": 1, "micro_batch": 8, "grad_accum": 2, "global_batch": 16}
    assert state["config"]["train.lr"] == 1e-3


def test_data_position_under_another_layout():
    """Samples consumed in the epoch are kept: exact when a round of the new layout divides them, else the round
    below with one note (mars_dist/run/elastic.py)."""
    from mars_dist.run.elastic import position_for_layout

    saved = {"batch_in_epoch": 3, "epoch": 1, "layout": {"world_size": 2, "micro_batch": 4}}  # 24 samples
    notes: list[str] = []
    assert position_for_layout(saved, 4, 2, notes.append) == 3  # same layout
    assert position_for_layout(saved, 4, 1, notes.append) == 6  # one process: the same global sample
    assert position_for_layout(saved, 8, 3, notes.append) == 1  # 24 samples = one round of 8 x 3
    assert notes == []
    assert position_for_layout(saved, 8, 2, notes.append) == 1  # 24 samples: one round of 16, 8 seen again
    assert notes == ["resume: 24 samples of epoch 1 were consumed, not a whole number of rounds of 8 x 2: continuing "
                     "at sample 16 of the epoch (same epoch position, 8 samples seen again)"]
    assert position_for_layout({"batch_in_epoch": 5, "epoch": 0}, 8, 2, print) == 5  # no layout recorded


def test_what_a_new_layout_can_carry_over():
    """elastic.check_world_size, before anything heavy: a changed global batch is refused where the LR schedule
    counts updates (naming it and the grad_accum that keeps it); ZeRO under another world size goes through
    DeepSpeed's universal checkpoint (True) unless its conversion cannot carry the optimizer state."""
    from types import SimpleNamespace

    from mars_dist.run.elastic import check_world_size

    saved = {"step": 5, "epoch": 1, "batch_in_epoch": 2,
             "layout": {"world_size": 2, "micro_batch": 4, "grad_accum": 2, "global_batch": 16}}

    def on(processes: int, zero: bool = False):  # what check_world_size reads of an Accelerator
        return SimpleNamespace(num_processes=processes, state=SimpleNamespace(deepspeed_plugin=object() if zero
                                                                               else None))

    for schedule in ("step", "cosine"):
        with pytest.raises(ckpt.CheckpointError, match=(
                rf"checkpoint CKPT was made with global batch 16, this run has 8 \(1 process\(es\) x micro-batch 4 x "
                rf"grad_accum 2\), and train.scheduler={schedule} counts updates: refusing to resume .* Keep the "
                rf"global batch \(train.grad_accum=4 keeps it with 1 process\(es\) x micro-batch 4\)")):
            check_world_size(saved, cfg_of("train.batch_size=4", "train.grad_accum=2", f"train.scheduler={schedule}"),
                             on(1), "CKPT")
    with pytest.raises(ckpt.CheckpointError, match=r"train.warmup_steps=10 \(at update 5\) counts updates"):
        check_world_size(saved, cfg_of("train.batch_size=4", "train.scheduler=constant", "train.warmup_steps=10"),
                         on(1), "CKPT")
    assert check_world_size(saved, cfg_of("train.batch_size=4", "train.scheduler=constant"), on(1), "CKPT") is False
    assert check_world_size(saved, cfg_of("train.batch_size=4", "train.grad_accum=4"), on(1), "CKPT") is False
    # ZeRO: the universal checkpoint for Adam / AdamW; SGD and AMSGrad refused naming why
    keep = ("train.batch_size=4", "train.grad_accum=4")
    assert check_world_size(saved, cfg_of(*keep), on(1, zero=True), "CKPT") is True
    assert check_world_size(saved, cfg_of("train.batch_size=4", "train.grad_accum=2"), on(2, zero=True), "C") is False
    with pytest.raises(ckpt.CheckpointError, match=r"partitions of 2 ranks; this run has 1: train.optimizer=sgd: "
                                                   r"DeepSpeed 0.19.8's universal checkpoint conversion"):
        check_world_size(saved, cfg_of(*keep, "train.optimizer=sgd"), on(1, zero=True), "CKPT")
    with pytest.raises(ckpt.CheckpointError, match=r"train.amsgrad=true: .* max_exp_avg_sq"):
        check_world_size(saved, cfg_of(*keep, "train.amsgrad=true"), on(1, zero=True), "CKPT")


def test_changed_global_batch_is_said_in_one_line():
    from mars_dist.run.elastic import position_for_layout

    saved = {"batch_in_epoch": 3, "epoch": 1, "layout": {"world_size": 2, "micro_batch": 4, "global_batch": 16}}
    notes: list[str] = []
    assert position_for_layout(saved, 4, 1, notes.append, global_batch=16) == 6
    assert notes == []
    assert position_for_layout(saved, 4, 1, notes.append, global_batch=8) == 6
    assert notes == ["resume: global batch 16 -> 8: continuing at the same epoch position (epoch 1, sample 24), not "
                     "at the same update"]


def test_universal_resume_restores_buffers_from_the_saved_model_states(tmp_path):
    """A universal load restores parameters and optimizer state only; zero_universal.restore_buffers copies the
    buffers (BatchNorm statistics) from the saving run's rank-0 model states, and names any it cannot find."""
    from types import SimpleNamespace

    import torch

    from mars_dist.sharding.zero_universal import restore_buffers

    saved = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    saved[1].running_mean.uniform_()
    saved[1].running_var.uniform_(1, 2)
    saved[1].num_batches_tracked += 7
    torch.save({"module": saved.state_dict()}, tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"module": {}}, tmp_path / "zero_pp_rank_1_mp_rank_00_model_states.pt")  # rank 0's is read
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    restore_buffers(SimpleNamespace(module=fresh), tmp_path)
    for name, buf in saved.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buf), name
    assert not torch.equal(fresh[0].weight, saved[0].weight)  # parameters are DeepSpeed's business
    bigger = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4))
    with pytest.raises(KeyError, match=r"buffers \['2.running_mean', '2.running_var', '2.num_batches_tracked'\]"):
        restore_buffers(SimpleNamespace(module=bigger), tmp_path)
