"""`mars-dist report RUN_DIR`: one self-contained HTML page of a run, viewable without a network.

Charts are matplotlib figures inlined as SVG (text as <text>, rasters as data: URIs), nothing is fetched: loss and
accuracy curves, the learning rate, every constrained layer's distance / radius over time (a heatmap, plus the worst
ratio and the layers at their radius), the bound term C over time, the final per-layer chart, the radii, the eval
results found in RUN_DIR/eval, and the run's config. Reads only the files a run writes (metrics.jsonl,
config.yaml, constraints.json, layers.json, summary.json), so it works on a run that is still going.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

MAX_COLUMNS = 300  # heatmap time columns (evenly spaced logging steps)


def load_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] sorted by step; the last record of a step wins (a resumed run logs some twice)."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        step = rec.pop("step", None)
        if not isinstance(step, int):
            continue
        for k, v in rec.items():
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                series.setdefault(k, {})[step] = math.nan if v is None else float(v)
    return {k: sorted(d.items()) for k, d in series.items()}


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
    return plt


def curves_chart(m: dict, summary: dict) -> str | None:
    if "train/loss" not in m:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    ax = axes[0]
    ax.plot(*zip(*m["train/loss"]), lw=1, label="train (per update)")
    if "val/loss" in m:
        ax.plot(*zip(*m["val/loss"]), "o-", label="val")
    if summary.get("test_loss") is not None:
        ax.axhline(summary["test_loss"], ls=":", color="k", label="test (final)")
    ax.set(title="loss", xlabel="update")
    ax.legend(fontsize=7)
    ax = axes[1]
    if "val/accuracy" in m:
        ax.plot(*zip(*m["val/accuracy"]), "o-", label="val")
    if summary.get("test_accuracy") is not None:
        ax.axhline(summary["test_accuracy"], ls=":", color="k", label="test (final)")
    if summary.get("chance") is not None:
        ax.axhline(summary["chance"], ls="--", color="gray", lw=0.8, label="chance")
    ax.set(title="accuracy", xlabel="update", ylim=(0, 1))
    ax.legend(fontsize=7)
    ax = axes[2]
    if "train/lr" in m:
        ax.plot(*zip(*m["train/lr"]), lw=1)
    ax.set(title="learning rate", xlabel="update")
    fig.tight_layout()
    return _svg(fig)


def layer_series(m: dict, order: list[str]) -> tuple[list[str], list[int], list[list[float]], str]:
    """(layer names, steps, values[layer][step], what): distance / radius when the layers have radii, else the
    distance. Steps thinned to MAX_COLUMNS."""
    what = "ratio" if any(k.startswith("layers/") and k.endswith("/ratio") for k in m) else "distance"
    names = [k[len("layers/"):-len("/" + what)] for k in m if k.startswith("layers/") and k.endswith("/" + what)]
    rank = {n: i for i, n in enumerate(order)}
    names.sort(key=lambda n: rank.get(n, len(rank)))
    steps = sorted({s for n in names for s, _ in m[f"layers/{n}/{what}"]})
    if len(steps) > MAX_COLUMNS:
        steps = [steps[round(i * (len(steps) - 1) / (MAX_COLUMNS - 1))] for i in range(MAX_COLUMNS)]
    values = []
    for n in names:
        d = dict(m[f"layers/{n}/{what}"])
        values.append([d.get(s, math.nan) for s in steps])
    return names, steps, values, what


def layers_over_time_chart(m: dict, order: list[str]) -> str | None:
    names, steps, values, what = layer_series(m, order)
    if not names:
        return None
    import numpy as np

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(13, 3 + min(len(names), 120) * 0.05), sharex=False,
                                  gridspec_kw={"height_ratios": [3, 1]})
    im = ax.imshow(np.array(values, dtype=float), aspect="auto", interpolation="nearest", cmap="viridis",
                   vmin=0, vmax=1 if what == "ratio" else None,
                   extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5))
    ticks = list(range(0, len(names), max(1, len(names) // 30)))
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=6)
    xt = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(xt, [steps[i] for i in xt])
    ax.set(xlabel="update", title="distance / radius per constrained layer over time (1 = at the radius)"
           if what == "ratio" else "distance from the pretrained weights per layer over time")
    fig.colorbar(im, ax=ax, fraction=0.02, label=what)
    for key, label in (("bound/max_ratio", "largest distance / radius"), ("bound/layers_at_radius",
                                                                          "layers at their radius")):
        if key in m:
            s = m[key]
            (ax2 if key == "bound/max_ratio" else ax2.twinx()).plot(
                *zip(*s), lw=1, color="tab:red" if key == "bound/max_ratio" else "tab:blue", label=label)
    ax2.ticklabel_format(axis="y", useOffset=False)
    ax2.set(xlabel="update", title="largest ratio (red) and layers at their radius (blue)")
    fig.tight_layout()
    return _svg(fig)


def bound_chart(m: dict) -> str | None:
    s = [(k, v) for k, v in m.get("bound/C", []) if math.isfinite(v)]
    if not s:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 2.8))
    ax.plot(*zip(*s), lw=1.2, color="tab:purple")
    ax.set(title="bound term C over time (log domain; smaller = tighter bound)", xlabel="update", ylabel="C")
    fig.tight_layout()
    return _svg(fig)


def wise_chart(rows: list[dict]) -> str | None:
    """WiSE-FT: accuracy against alpha (RUN_DIR/wise.json, written by `mars-dist interpolate`)."""
    series = {}
    for r in rows:
        for key in ("val_accuracy", "test_accuracy"):
            if r.get(key) is not None:
                series.setdefault(key, []).append((r["alpha"], r[key]))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    for key, points in series.items():
        ax.plot(*zip(*sorted(points)), marker="o", lw=1.2, label=key.replace("_", " "))
    ax.set(title="WiSE-FT: W0 + alpha (W - W0)", xlabel="alpha", ylabel="accuracy")
    ax.legend()
    fig.tight_layout()
    return _svg(fig)


def final_layers_chart(layers: list[dict]) -> str | None:
    if not layers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 3.2))
    xs = range(len(layers))
    ax.bar(xs, [l["distance"] for l in layers], width=0.9, label="distance ‖W − W0‖", color="tab:blue")
    radii = [l["radius"] if l.get("radius") else math.nan for l in layers]
    ax.plot(xs, radii, "_", color="tab:red", markersize=6, label="radius")
    ax.set(title="final distance and radius per layer (model order)", xlabel="constrained layer", yscale="symlog")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def _table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the run's HTML report (default RUN_DIR/report.html); returns its path."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run / 'metrics.jsonl'}: missing; the run has not logged an update yet")
    import yaml

    config_text = (run / "config.yaml").read_text()
    cfg = yaml.safe_load(config_text) or {}
    m = load_metrics(run / "metrics.jsonl")
    summary = _read_json(run / "summary.json") or {}
    constraints = _read_json(run / "constraints.json") or {}
    final = (_read_json(run / "layers.json") or {}).get("layers", [])
    order = [l["name"] for l in constraints.get("layers", [])]
    con = cfg.get("constraint", {})
    model, data = cfg.get("model", {}), cfg.get("data", {})
    updates = summary.get("updates") or max((s for s, _ in m.get("train/loss", [])), default=0)
    facts = [("model", f"{model.get('name')} (weights: {model.get('pretrained')})"),
             ("data", f"{data.get('name')} {data.get('path') or ''} ({data.get('train_per_class')} per class, "
                      f"{data.get('image_size')} px)"),
             ("method", con.get("method")), ("updates", updates),
             ("test accuracy", _fmt(summary.get("test_accuracy"))), ("test loss", _fmt(summary.get("test_loss"))),
             ("val accuracy", _fmt(summary.get("val_accuracy"))), ("bound term C (final)",
                                                                    _fmt(summary.get("bound_C")))]
    if not summary:
        facts.append(("status", "no summary.json yet: the run is going or stopped before the end"))
    radii = Counter((l["role"], l["action"], l.get("radius")) for l in constraints.get("layers", []))
    swept = (run / "trial_config.yaml").is_file()
    actions = sorted({l["action"] for l in constraints.get("layers", [])})
    radius_note = (f"Backbone radius {con.get('radius')}, head radius {con.get('head_radius')}"
                   f"{', groups ' + json.dumps(con.get('groups')) if con.get('groups') else ''}: "
                   f"{'drawn by mars-dist sweep for this trial' if swept else 'fixed in the config'}."
                   if "project" in actions else
                   f"No radii: method {con.get('method')} does not project (its layers: {', '.join(actions) or '-'}).")
    charts = [("curves", "Loss, accuracy and learning rate", curves_chart(m, summary)),
              ("layers-over-time", "Per-layer distance to radius over time", layers_over_time_chart(m, order)),
              ("bound", "Bound term C over time", bound_chart(m)),
              ("final-layers", "Final per-layer distance and radius", final_layers_chart(final))]
    parts = [f"<h1>mars_dist run: {html.escape(run.resolve().name)}</h1>", _table(facts)]
    for cid, title, svg in charts:
        if svg is not None:
            parts.append(f'<h2>{html.escape(title)}</h2><figure class="chart" id="chart-{cid}">{svg}</figure>')
    parts.append("<h2>Radii</h2><p>" + html.escape(radius_note) + "</p>" + _table(
        [(r, a, "-" if rad is None else rad, n) for (r, a, rad), n in sorted(radii.items(), key=str)],
        ("role", "action", "radius", "tensors")))
    evals = sorted((run / "eval").glob("eval_*.json")) if (run / "eval").is_dir() else []
    if evals:
        rows, imgs = [], []
        for f in evals:
            e = _read_json(f) or {}
            rows.append((f.stem[5:], e.get("n"), _fmt(e.get("accuracy")), _fmt(e.get("loss")), _fmt(e.get("ece"))))
            png = f.with_name("confusion_" + f.stem[5:] + ".png")
            if png.is_file():
                data_uri = base64.b64encode(png.read_bytes()).decode()
                imgs.append(f'<img alt="confusion matrix {html.escape(f.stem[5:])}" '
                            f'src="data:image/png;base64,{data_uri}">')
        parts.append("<h2>Evaluations (mars-dist eval)</h2>" +
                     _table(rows, ("data-split", "images", "accuracy", "loss", "ECE")) + "".join(imgs))
    wise = _read_json(run / "wise.json") or []
    if wise:
        svg = wise_chart(wise)
        parts.append("<h2>WiSE-FT (mars-dist interpolate)</h2>" + (
            f'<figure class="chart" id="chart-wise">{svg}</figure>' if svg else "") + _table(
            [(r["alpha"], _fmt(r.get("val_accuracy")), _fmt(r.get("test_accuracy")),
              {True: "within alpha x radii", False: "FAILED", None: "nothing certified"}[r["certificate"]["passed"]],
              _fmt(r["certificate"].get("worst_ratio")), _fmt(r.get("bound", {}).get("C")),
              _fmt(r.get("bound", {}).get("C_radii"))) for r in wise],
            ("alpha", "val accuracy", "test accuracy", "certificate", "worst distance / (alpha radius)",
             "bound term C", "C_r (alpha x radii)")))
    parts.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>mars_dist report: "
            f"{html.escape(run.resolve().name)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1300px}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
            "figure{margin:0}figure svg{max-width:100%;height:auto}img{max-width:48%;margin:4px}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    out = Path(output) if output else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
