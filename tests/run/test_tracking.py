"""W&B mode resolution and the layer metrics / plot written at the end of a run."""

import json
import time

from mars_dist.constraints import LayerStats
from mars_dist.run.tracking import Tracker, layer_metrics, resolve_wandb_mode


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def stats():
    return [LayerStats("a.weight", "matrix", 2.0, 2.0, 4.0, 0.5, 1.0),
            LayerStats("b.weight", "head", 1.0, 0.5, 0.5, 0.0, 0.3)]


def test_layer_metrics_and_bound_term():
    m = layer_metrics(stats())
    assert m["layers/a.weight/ratio"] == 1.0 and m["layers/b.weight/ratio"] == 0.5
    assert m["layers/a.weight/frac_at_bound"] == 0.5 and m["bound/layers_at_radius"] == 1
    import math

    assert math.isclose(m["bound/C"], math.log(8) + math.log(1.0) + math.log(2.0 / 4.0 + 0.5 / 0.5))


def test_offline_run_files_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(tmp_path, {"x": 1}, mode="offline", project="p")
    t.log({"train/loss": 1.0, **layer_metrics(stats())}, step=1)
    t.finish(stats(), {"test_accuracy": 0.5})
    assert (tmp_path / "layers.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == 0.5
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["layers/a.weight/distance"] == 2.0
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_files and run_files[0].stat().st_size > 0
    # the per-layer series is in the W&B run file itself (its records hold the metric keys); W&B's service process
    # writes it, and on a loaded machine it may land a moment after finish() returned (seen once in a full run)
    deadline = time.monotonic() + 30
    while b"layers/a.weight/distance" not in run_files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"layers/a.weight/distance" in run_files[0].read_bytes()
