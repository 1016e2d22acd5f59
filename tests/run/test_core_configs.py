"""The core under the configurations users run, through the CLI and the shipped accelerate configs (2 CPU processes,
gloo, real DeepSpeed): Hugging Face image classifiers (ViT: LayerNorm; ResNet: BatchNorm) built from a local config
under ZeRO-1/2/3 and ZeRO-3 with zero.Init equal the single-process run element by element, with the same constraint
count and the projection active; bf16 under every ZeRO stage on the demo's BatchNorm model; a model with more than
1,000 constrained tensors under ZeRO-3. (timm under zero.Init: tests/run/test_train_ddp.py; HF models under FSDP2:
tests/distributed, accelerate turns FSDP off on CPU.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_helpers import (assert_bound_holds, assert_same_weights, constrained_summary, export_weights,
                            projection_was_active, run_cli)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SMALL = ["data.image_size=32", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
         "train.max_steps=3", "train.bn_mode=eval", "constraint.radius=0.05", "constraint.head_radius=1.0",
         # SGD: linear in the gradient, so a 2-rank gradient average stays at fp32 rounding (see test_train_ddp)
         "train.optimizer=sgd", "train.lr=0.05", "tracking.wandb_mode=disabled", "train.grad_accum=2"]
ZERO = ["zero1.yaml", "zero2.yaml", "zero3.yaml", "zero3_init.yaml"]


def write_hf_model(path: Path, kind: str, layers: int = 2) -> list[str]:
    """A local HF model directory (config.json) and 'pretrained' weights of it with a 3-class head (the runs have
    10 classes: a fresh head, as when fine-tuning an ImageNet model). Returns the model overrides."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

    cfg = (ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48,
                     image_size=32, patch_size=8, num_labels=3) if kind == "vit" else
           ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1], layer_type="basic", num_labels=3))
    cfg.save_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "pretrained.safetensors"))
    return [f"model.name={path}", f"model.pretrained={path / 'pretrained.safetensors'}"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Per model kind: its overrides and its single-process run (micro-batch 8 = 2 processes x 4)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in ("vit", "resnet"):
        model = write_hf_model(root / kind, kind)
        single = root / f"{kind}_single"
        run_cli(single, SMALL + model + ["train.batch_size=8"])
        out[kind] = (model, single)
    return out


@pytest.mark.parametrize("launch_config", ZERO)
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_hf_model_matches_single_process(tmp_path, hf, kind, launch_config):
    model, single = hf[kind]
    run = tmp_path / "run"
    proc = run_cli(run, SMALL + model + ["train.batch_size=4"], launch_config)
    partitioned = "partitioned (DeepSpeed zero.Init)" in proc.stdout
    assert partitioned == (launch_config == "zero3_init.yaml"), proc.stdout[-2000:]
    assert constrained_summary(run) == constrained_summary(single)  # never a partitioned shape
    assert_same_weights(export_weights(single), export_weights(run))
    assert projection_was_active(run) and projection_was_active(single)
    assert_bound_holds(run)


@pytest.mark.parametrize("launch_config,bn_mode", [("zero1.yaml", "train"), ("zero3.yaml", "eval"),
                                                   ("zero3_init.yaml", "train"), ("zero3_offload.yaml", "eval")])
def test_bf16_demo_model_under_each_zero_stage(tmp_path, launch_config, bn_mode):
    """The demo's model (ImageNet EfficientNet-Lite0, BatchNorm) in bf16: DeepSpeed keeps BN statistics fp32 and
    casts weights, so BatchNorm must compute in fp32. The export holds the fp32 masters, on which the bound holds
    around the fp32 pretrained weights read from their file (the masters start from them, not from DeepSpeed's
    bf16 cast), and the trainer's certificate says so. ZeRO-2: test_bf16_two_processes_match_one."""
    run = tmp_path / "run"
    run_cli(run, SMALL + ["train.batch_size=4", "train.mixed_precision=bf16", f"train.bn_mode={bn_mode}"],
            launch_config)
    summary = json.loads((run / "summary.json").read_text())
    assert summary.get("test_accuracy") is not None
    assert projection_was_active(run)
    assert_bound_holds(run)
    assert_certified(run, "bundled")
    # fp32 masters, not bf16 copies: some exported weight is not representable in bf16
    weights = export_weights(run)
    assert any(not torch.equal(w, w.bfloat16().float()) for k, w in weights.items() if k.endswith("weight"))


def assert_certified(run: Path, source: str) -> None:
    """The trainer's certificate (summary.json) and `mars-dist certify` run as a user would: both passed."""
    certificate = json.loads((run / "summary.json").read_text())["certificate"]
    assert certificate["passed"] and certificate["worst_ratio"] > 0.99 and source in certificate["against"], \
        certificate
    proc = subprocess.run([sys.executable, "-m", "mars_dist", "certify", str(run)], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_bf16_two_processes_match_one(tmp_path):
    """The issue's user run (demo model, bf16, shipped ZeRO-2 config): 2 processes x micro-batch 4 equal one process
    x micro-batch 8 (same global batch, same DeepSpeed config), and both are certified against the bundled fp32
    file. bf16 forward / backward round differently when the micro-batches are split otherwise: measured 3.5e-4 at
    most after 3 updates (fp32: ~1e-6), allowed 2e-3."""
    runs = {n: tmp_path / f"p{n}" for n in (2, 1)}
    for n, run in runs.items():
        run_cli(run, SMALL + [f"train.batch_size={8 // n}", "train.mixed_precision=bf16"], "zero2.yaml", processes=n)
        assert_certified(run, "bundled")
        assert_bound_holds(run)
    assert projection_was_active(runs[2])
    assert_same_weights(export_weights(runs[1]), export_weights(runs[2]), atol=2e-3, rtol=0)


def write_saved_hf_model(path: Path, kind: str, labels: int) -> Path:
    """A Hugging Face model directory as the hub and our own exports store it (save_pretrained)."""
    from transformers import AutoModelForImageClassification, ConvNextConfig, ResNetConfig, ViTConfig

    cfg = {"vit": lambda: ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                    image_size=32, patch_size=8),
           "resnet": lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),  # bottleneck
           "resnet_basic": lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1],
                                                layer_type="basic"),
           "convnext": lambda: ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)}[kind]()
    cfg.num_labels = labels
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,precision,head", [("vit", "bf16", "new"), ("resnet", "no", "new"),
                                                 ("resnet_basic", "bf16", "new"), ("convnext", "no", "new"),
                                                 ("resnet", "bf16", "kept")])
def test_saved_hf_directory_under_zero_init(tmp_path, kind, precision, head):
    """save_pretrained directories built partitioned (zero3_init.yaml): with a new head (`pretrained=hub`, 3 ->
    10 classes) and with the head kept (an earlier 10-class fine-tune's weights file). Certified against the
    directory's own weights, fp32 and bf16."""
    labels = 10 if head == "kept" else 3
    saved = write_saved_hf_model(tmp_path / kind, kind, labels)
    weights = "hub" if head == "new" else str(saved / "model.safetensors")
    run = tmp_path / "run"
    proc = run_cli(run, SMALL + [f"model.name={saved}", f"model.pretrained={weights}", "train.batch_size=4",
                                 f"train.mixed_precision={precision}"], "zero3_init.yaml")
    assert "partitioned (DeepSpeed zero.Init)" in proc.stdout
    head_layer = next(x for x in json.loads((run / "constraints.json").read_text())["layers"] if x["role"] == "head")
    assert head_layer["shape"][0] == 10
    # the head it started from: the export's head is nearer to it than to another candidate (a new head seeded
    # with the run's seed, or the saved head; else a new head of another seed)
    from mars_dist.models.factory import build_model

    def head_of(pretrained: str, seed: int) -> dict:
        model = build_model(str(saved), pretrained, 10, head_seed=seed)  # whole, one process
        return {k: v for k, v in model.state_dict().items() if k.startswith("hf_model.classifier")}

    start, other = (head_of("hub", 0), head_of("hub", 1)) if head == "new" else (head_of(weights, 0), head_of("hub", 0))
    exported = export_weights(run)
    for k in start:
        assert (exported[k] - start[k]).abs().mean() < (exported[k] - other[k]).abs().mean(), k
    assert projection_was_active(run)
    assert_bound_holds(run)
    assert_certified(run, str(saved) if head == "new" else weights)


def test_over_1000_constrained_tensors_under_zero3(tmp_path):
    """A 150-layer HF ViT (width 32): 1,203 constrained tensors, built under zero.Init, 2 updates."""
    model = write_hf_model(tmp_path / "vit150", "vit", layers=150)
    run = tmp_path / "run"
    run_cli(run, SMALL + model + ["train.batch_size=4", "train.max_steps=2", "train.eval_every_epoch=false"],
            "zero3_init.yaml")
    from mars_dist.constraints import select_constraints, summary
    from mars_dist.models.factory import build_model, classifier_module_names

    whole = build_model(model[0].split("=", 1)[1], model[1].split("=", 1)[1], 10)  # one process, built whole
    want = summary(select_constraints(whole, classifier_module_names(whole), "mars-pgm", 0.05, 1.0))
    assert want["count"] > 1000
    assert constrained_summary(run) == want
    assert projection_was_active(run)
    assert_bound_holds(run)
