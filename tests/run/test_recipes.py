"""The shipped recipes: every file in recipes/ loads and validates with the real config loader; each *_mars /
*_plain pair is one key apart (constraint.method; output_dir differs so the twins do not write into one run); the
named timm weights exist; the knob table of docs/recipes.md matches the files; and each large recipe runs 2 updates
through the CLI with its model swapped for a tiny one of the same family (timm's test_vit / test_convnext, saved
here as the 'pretrained' file) on real Fashion-MNIST, every other knob as in the recipe, bf16 included (one
process on CPU: the same trainer as under a launcher, which tests/run/test_recipe_runs.py covers for the knobs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from launch_helpers import ROOT, assert_bound_holds, projection_was_active
from mars_dist import config

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
PAIRS = [("vit_b16_mars", "vit_b16_plain"), ("convnext_mars", "convnext_plain")]
LARGE = [name for pair in PAIRS for name in pair]
TINY = {"vit_b16": ("test_vit", 160), "convnext": ("test_convnext", 64)}  # test_vit takes 160 px only


def recipe(name: str) -> Path:
    return ROOT / "recipes" / f"{name}.yaml"


def flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_recipe_loads_and_validates(path):
    cfg = config.load(path)
    written = flat(yaml.safe_load(path.read_text()))
    resolved = flat(config.to_dict(cfg))
    for key, value in written.items():  # every value written is the value the run gets
        assert key in resolved, key
        expect = value if not isinstance(resolved[key], float) or value is None else float(value)
        assert resolved[key] == expect, (key, value, resolved[key])


@pytest.mark.parametrize("mars,plain", PAIRS)
def test_each_pair_is_one_key_apart(mars, plain):
    a, b = (flat(yaml.safe_load(recipe(n).read_text())) for n in (mars, plain))
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"constraint.method", "output_dir"}, differ
    assert (a["constraint.method"], b["constraint.method"]) == ("mars-pgm", "none")
    assert a["output_dir"] != b["output_dir"]
    ra, rb = (flat(config.to_dict(config.load(recipe(n)))) for n in (mars, plain))
    assert {k for k in ra if ra[k] != rb[k]} == {"constraint.method", "output_dir"}  # and as resolved


@pytest.mark.parametrize("name", LARGE)
def test_the_named_weights_exist_in_timm(name):
    import timm

    cfg = yaml.safe_load(recipe(name).read_text())
    assert cfg["model"]["pretrained"] == "hub"
    assert cfg["model"]["name"] in timm.list_pretrained(cfg["model"]["name"])


def docs_table() -> dict[str, tuple[str, str]]:
    """docs/recipes.md's "knob | ViT-B value | ConvNeXt value | source" rows: key -> (ViT-B value, ConvNeXt value)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    table = text.split("| knob | ViT-B value | ConvNeXt value | source |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.fullmatch(r"`([\w.]+)`", cells[0])
        if key:
            first = [re.match(r"`([^`]*)`", cell) for cell in cells[1:3]]  # the value; any words after it aside
            rows[key.group(1)] = (first[0].group(1), first[1].group(1))
    return rows


def test_the_docs_table_matches_the_recipes():
    rows = docs_table()
    assert len(rows) >= 20, sorted(rows)
    for i, name in enumerate(("vit_b16_mars", "convnext_mars")):
        values = flat(yaml.safe_load(recipe(name).read_text()))
        for key, row in rows.items():
            assert key in values, (name, key)
            assert yaml.safe_load(row[i]) == values[key], (name, key, row[i], values[key])


def save_tiny(name: str, path: Path) -> Path:
    """A tiny model of the recipe's family, seeded, saved as the run's 'pretrained' weights file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses another mixed precision once it is set; these runs are
    bf16, the in-process runs of other tests are not. Reset around them (accelerate's own tests do the same)."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_recipe_runs_two_updates_on_a_tiny_model_of_its_family(name, tmp_path, capfd, fresh_accelerate_state):
    """`mars-dist train RECIPE ...` (the CLI's entry point, in this process: a new process per run would add its
    imports, ~10 s here, four times). Every knob of the recipe on (layer decay, drop-path, mixup / cutmix,
    RandAugment, random erasing, smoothing, grad accumulation, activation checkpointing, channels-last, bf16, EMA once
    Config has it); swapped: the model (tiny, same family), the data (real Fashion-MNIST, few-shot, small), 2
    updates, and for MARS radii small enough that the projection acts within 2 warm-up updates. The bound is checked
    on the export against the saved weights file, in float64."""
    from mars_dist import cli

    family = name.rsplit("_", 1)[0]
    tiny, size = TINY[family]
    weights = save_tiny(tiny, tmp_path / f"{tiny}.safetensors")
    run = tmp_path / "run"
    swap = [f"model.name={tiny}", f"model.pretrained={weights}", "data.name=fashion-mnist", "data.path=null",
            f"data.image_size={size}", "data.train_per_class=4", "data.val_per_class=1", "data.test_limit=20",
            "data.num_workers=0", "train.batch_size=8", "train.max_steps=2", "train.log_every=1",
            "tracking.wandb_mode=disabled", f"output_dir={run}"]
    mars = name.endswith("_mars")
    if mars:
        swap += ["constraint.radius=0.005", "constraint.head_radius=0.01"]
    with pytest.raises(SystemExit) as done:
        cli.main(["train", str(recipe(name)), *swap])
    out = capfd.readouterr().out
    assert done.value.code == 0, out[-3000:]
    assert "activation checkpointing" in out
    cfg = config.load(run / "config.yaml")
    assert cfg.train.mixed_precision == "bf16" and cfg.train.grad_checkpointing and cfg.train.layer_decay
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 2, summary
    if mars:
        assert_bound_holds(run)
        assert summary["certificate"]["passed"] and projection_was_active(run)
