"""Metrics to Weights & Biases (offline by default: run files under output_dir/wandb) and to metrics.jsonl.

Only the main process writes. Per constrained layer we log distance D_j, radius, D_j / radius, the fraction of
rows at the bound and the layer norm B_j; per logging step the log-domain bound term C.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from mars_dist.constraints import LayerStats, bound_term


def layer_metrics(stats: Sequence[LayerStats]) -> dict:
    """Flat per-layer metrics ('layers/<name>/distance', ...) plus the bound term and the worst ratio."""
    out: dict[str, float] = {}
    ratios = []
    for s in stats:
        key = f"layers/{s.name}"
        out[f"{key}/distance"] = s.distance
        out[f"{key}/layer_norm"] = s.layer_norm
        if s.radius is not None:
            out[f"{key}/radius"] = s.radius
            out[f"{key}/ratio"] = s.ratio
            out[f"{key}/frac_at_bound"] = s.frac_at_bound
            ratios.append(s.ratio)
    out["bound/C"] = bound_term(stats)
    if ratios:
        out["bound/max_ratio"] = max(ratios)
        out["bound/layers_at_radius"] = sum(s.frac_at_bound > 0 for s in stats)
    return out


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> WANDB_MODE if set, 'online' when an API key is configured (env or ~/.netrc), else 'offline'."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


class Tracker:
    """W&B run + metrics.jsonl. Inactive (all methods no-ops) on non-main processes."""

    def __init__(self, output_dir: str | Path, config: dict, mode: str = "offline", project: str = "mars_dist",
                 run_name: str | None = None, active: bool = True):
        self.active = active
        self.dir = Path(output_dir)
        self.run = None
        if not active:
            return
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        mode = resolve_wandb_mode(mode)
        if mode != "disabled":
            import wandb

            # One W&B run per output_dir: a resumed fine-tune continues the same run instead of starting a new one.
            id_file = self.dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, name=run_name or self.dir.name, dir=str(self.dir), id=run_id,
                                  resume="allow", mode=mode, config=config)

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self, stats: Sequence[LayerStats], summary: dict, export_dir: str | Path | None = None) -> None:
        """Write the per-layer table (layers.json), the distance/radius plot (layers.png) and the summary; log the
        export folder (if given) as a W&B model artifact."""
        if not self.active:
            return
        rows = [{"name": s.name, "role": s.role, "radius": s.radius, "distance": s.distance,
                 "layer_norm": s.layer_norm, "ratio": s.ratio if s.radius else None,
                 "frac_at_bound": s.frac_at_bound, "frobenius": s.frobenius} for s in stats]
        (self.dir / "layers.json").write_text(json.dumps({"layers": rows, "bound_C": bound_term(stats)}, indent=1))
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot = plot_layer_ratios(stats, self.dir / "layers.png", learned_radius_series(self.dir / "metrics.jsonl"))
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=list(rows[0]) if rows else ["name"],
                                data=[list(r.values()) for r in rows])
            payload = {"final/layers": table}
            if plot is not None:
                payload["final/layers_plot"] = wandb.Image(str(plot))
            self.run.log(payload)
            for k, v in summary.items():
                self.run.summary[k] = v
            if export_dir is not None and Path(export_dir).is_dir():
                log_model_artifact(self.run, Path(export_dir), summary)
            self.run.finish()
        self.jsonl.close()


def log_model_artifact(run, export_dir: Path, summary: dict):
    """The export as a W&B artifact of type 'model' (aliases 'latest'). Its files are referenced where they are
    (policy 'immutable': no copy into W&B's staging area); offline runs record it in the run file, and a later
    `wandb sync` uploads those files, so keep OUTPUT_DIR/export until then."""
    import wandb

    clean = {k: v for k, v in summary.items() if not (isinstance(v, float) and not math.isfinite(v))}
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=clean,
                              description=f"mars_dist export of run {run.name}: weights, config, model card")
    artifact.add_dir(str(export_dir), policy="immutable")
    return run.log_artifact(artifact, aliases=["latest"])


def learned_radius_series(metrics_jsonl: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Per layer whose radius changed during the run (learned radii, mars-ftp): (updates, radii) from the log."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    if not Path(metrics_jsonl).exists():
        return series
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith("layers/") and key.endswith("/radius") and value is not None:
                steps, values = series.setdefault(key[len("layers/"):-len("/radius")], ([], []))
                steps.append(record["step"])
                values.append(value)
    return {k: v for k, v in series.items() if len(set(v[1])) > 1}


def plot_layer_ratios(stats: Sequence[LayerStats], path: Path,
                      radius_series: dict[str, tuple[list[int], list[float]]] | None = None) -> Path | None:
    """Bar chart of distance / radius per constrained layer (1.0 = at the bound); distance alone when unconstrained.
    With learned radii, a second panel: each layer's radius over the updates."""
    if not stats:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    constrained = any(s.radius for s in stats)
    values = [s.ratio if (constrained and s.radius) else s.distance for s in stats]
    colors = {"matrix": "tab:blue", "head": "tab:red", "bn": "tab:green", "norm": "tab:orange", "embed": "tab:gray"}
    width = max(6, len(stats) * 0.08)
    if radius_series:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width, 8))
        role = {s.name: s.role for s in stats}
        for name, (steps, radii) in radius_series.items():
            ax2.plot(steps, radii, color=colors.get(role.get(name, ""), "tab:purple"), linewidth=0.7, alpha=0.6)
        ax2.set(yscale="log", xlabel="update", ylabel="learned radius",
                title=f"learned radii of {len(radius_series)} layers (colour: layer kind)")
    else:
        fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(range(len(stats)), values, color=[colors.get(s.role, "tab:purple") for s in stats], width=0.9)
    if constrained:
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("constrained layer (model order)")
    ax.set_ylabel("distance / radius" if constrained else "distance ||W - W0||_MARS")
    ax.set_title(f"per-layer distance from pretrained (C = {bound_term(stats):.2f})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
