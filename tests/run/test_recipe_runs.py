"""The recipe knobs end to end through the CLI, on the bundled ImageNet EfficientNet-Lite0 and real Fashion-MNIST:
one process with every knob but torch.compile on (compile under the projection: test_recipe_knobs.py, the
inductor build takes minutes here), with and without activation checkpointing (the same export, fp32); a tiny
Hugging Face ViT with layer decay by encoder layer, activation checkpointing and mixup; resume with the knobs on;
and 2-process runs with layer-wise lr decay (dozens of param groups -> DeepSpeed sub-groups): ZeRO-2 with mixup /
cutmix and drop-path, ZeRO-3 with activation checkpointing. Every run: the bound holds on the export against the pretrained file, the trainer's certificate
passed, the projection was active."""

import json

import pytest

from launch_helpers import (assert_bound_holds, assert_same_weights, export_weights, projection_was_active,
                            run_cli)

pytestmark = pytest.mark.slow

SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=2", "constraint.radius=0.05", "constraint.head_radius=1.0", "tracking.wandb_mode=disabled",
         # frozen statistics: recomputation under activation checkpointing would update BatchNorm's running
         # statistics a second time (docs/recipes.md)
         "train.bn_mode=eval"]
KNOBS = ["model.drop_path_rate=0.2", "data.mixup=0.8", "data.cutmix=1.0", "train.label_smoothing=0.1",
         "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", "train.layer_decay=0.65",
         "train.weight_decay=0.05", "train.channels_last=true"]


def certified(run) -> bool:
    return json.loads((run / "summary.json").read_text())["certificate"]["passed"]


def test_every_knob_runs_and_activation_checkpointing_changes_nothing(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    run_cli(plain, SMALL + KNOBS + ["train.batch_size=8"])
    proc = run_cli(ckpt, SMALL + KNOBS + ["train.batch_size=8", "train.grad_checkpointing=true"])
    assert "activation checkpointing" in proc.stdout
    for run in (plain, ckpt):
        assert_bound_holds(run)
        assert certified(run) and projection_was_active(run)
    assert_same_weights(export_weights(plain), export_weights(ckpt), atol=1e-6, rtol=1e-6)
    lrs = [json.loads(line).get("train/lr") for line in (plain / "metrics.jsonl").read_text().splitlines()]
    # the logged lr is the head's, the full one: halfway down the 2-update cosine (the stem's is 0.65 ** 17 of it)
    assert [lr for lr in lrs if lr is not None][0] == pytest.approx(5e-4)


@pytest.mark.dist
def test_layer_decay_mixup_and_drop_path_under_zero2(tmp_path):
    """ZeRO-2 steps all its param groups in one call (ZeRO-3: one sub-group per call); AdamW with weight decay."""
    run = tmp_path / "run"
    run_cli(run, SMALL + ["train.batch_size=4", "train.layer_decay=0.75", "train.weight_decay=0.05",
                          "data.mixup=0.8", "data.cutmix=1.0", "model.drop_path_rate=0.1"], "zero2.yaml")
    assert_bound_holds(run)
    assert certified(run) and projection_was_active(run)


# Layer decay + weight decay + activation checkpointing under zero3.yaml / zero3_init.yaml through the shipped
# launch: recipes/lite0_full.yaml in tests/run/test_ema_runs.py (every update's bound: test_knobs_backends.py).


def test_hf_vit_with_layer_decay_checkpointing_and_mixup(tmp_path):
    from test_core_configs import write_hf_model

    model = write_hf_model(tmp_path / "vit", "vit", layers=3)
    run = tmp_path / "run"
    proc = run_cli(run, SMALL + model + ["train.batch_size=8", "train.layer_decay=0.75", "train.weight_decay=0.05",
                                         "train.grad_checkpointing=true", "data.mixup=0.8",
                                         "train.label_smoothing=0.1", "data.reprob=0.25"])
    assert "activation checkpointing" in proc.stdout
    assert_bound_holds(run)
    assert certified(run) and projection_was_active(run)


def test_resume_with_the_knobs_is_exact(tmp_path):
    """4 updates in one go == 2 updates, stop, resume (mid-epoch): mixup's and drop-path's draws come back from the
    RNG states in the checkpoint, the param groups of layer decay from the optimizer state. (RandAugment's NumPy
    draws, seeded per item, whatever process loads it: test_recipe_knobs.)"""
    import shutil

    import torch

    from mars_dist import config
    from mars_dist.run import checkpoint as ckpt
    from mars_dist.run.train import train

    def cfg(out, *extra):
        return config.load(None, [f"output_dir={out}", "train.batch_size=8", "train.max_steps=4", "data.num_workers=0",
                                  *SMALL[:4], *SMALL[5:], *KNOBS, *extra])

    whole, part = tmp_path / "whole", tmp_path / "part"
    train(cfg(whole))
    train(cfg(part, "checkpoint.every_steps=2", "checkpoint.keep_last=5"))
    for later in ckpt.list_checkpoints(part)[1:]:  # as if the job died after update 2
        shutil.rmtree(later)
    assert train(cfg(part, "resume=auto", "checkpoint.every_steps=2"))["updates"] == 4
    a, b = export_weights(whole), export_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
