"""`mars-dist interpolate RUN_DIR --alpha A [B ...]` (alias `wise`): WiSE-FT exports of a finished run,
RUN_DIR/export_wise_A/, each W_a = W0 + a (W - W0) (mars_dist/models/interpolate.py: anchors, the head, BatchNorm),
in the export's format (timm / transformers load it alone), certified within the run's radii scaled by a, evaluated
unless --no-eval, with a model card; RUN_DIR/wise.json holds the curve (alpha, accuracy, certificate, bound) for
choosing a on validation, and `mars-dist report RUN_DIR` draws it.

The bound scaled by a: with every distance D_j <= a r_j, the bound term C = sum_j log(2 B_j) + log(sum_j D_j / B_j)
is at most C_r(a) = sum_j log(2 B_j) + log(sum_j a r_j / B_j) (B_j = ||W_a||_MARS of this export): the guarantee
the scaled radii give, log(a) below the same sum with the run's radii. Each export's measured C is checked against
it (within the certificate's float32 allowance) and both are written into wise.json and the card.

The certificate comes for free: every anchor of the interpolation is the constraint's anchor, so a layer within r
of it lands within a r. It is not taken on trust: the interpolated fp32 export is certified like any export
(commands/certify.py, float64, against the pretrained weights from their source) with every radius multiplied by
a, with the same float32 tolerance. a = 0 has radius 0: nothing is certified (the export is W0 and a zero head).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mars_dist.commands.certify import CertifyReport, certify, read_export_weights, reference
from mars_dist.constraints.engine import LayerStats


def wise_dir(run_dir: str | Path, alpha: float) -> Path:
    """RUN_DIR/export_wise_<alpha> (alpha as written by `:g`, e.g. export_wise_0.5)."""
    return Path(run_dir) / f"export_wise_{alpha:g}"


def wise(run_dir: str | Path, alphas: list[float], evaluate: bool = True, split: str = "test",
         pretrained: str | None = None) -> list[dict]:
    """One interpolated, certified (and evaluated) export per alpha; returns and writes RUN_DIR/wise.json."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file() or not (run / "export" / "config.json").is_file():
        raise FileNotFoundError(f"{run}: not a finished run directory (config.yaml and export/ are needed)")
    for a in alphas:
        if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
            raise ValueError(f"--alpha {a!r}: choose values in [0, 1] (0: pretrained, 1: the fine-tuned export)")
    ref = reference(run, pretrained)
    if ref is None:
        raise ValueError(f"{run}: model.pretrained is 'none' (no pretrained weights to interpolate towards); "
                         f"name them with --pretrained")
    fine = read_export_weights(ref.export)
    rows = []
    for a in alphas:
        out, certificate = _write(ref, fine, float(a))
        row = {"alpha": a, "export": str(out), "certificate": certificate.summary(),
               "bound": scaled_bound(certificate)}
        if evaluate:
            from mars_dist.commands.evaluate import run_eval

            result = run_eval(out, split=split, output_dir=out / "eval")
            row[f"{split}_accuracy"], row[f"{split}_loss"] = result["accuracy"], result["loss"]
        _card(ref, out, a, certificate, row)
        rows.append(row)
        bound = row["bound"]
        print(f"interpolate alpha {a:g}: {out}; certify: {certificate.lines()[-1]}; bound term C "
              f"{bound['C']:.4f} <= {bound['C_radii']:.4f} (radii x {a:g}): {_verdict(bound['holds'])}"
              + (f"; {split} accuracy {row[f'{split}_accuracy']:.4f}" if evaluate else ""))
    curve = [*_previous(run, {r["alpha"] for r in rows}), *rows]
    (run / "wise.json").write_text(json.dumps(sorted(curve, key=lambda r: r["alpha"]), indent=1))
    return rows


def _write(ref, fine: dict, alpha: float) -> tuple[Path, CertifyReport]:
    """The interpolated export of `alpha` and its certificate (radii scaled by alpha)."""
    from mars_dist.models.export import META_FILE, export_model
    from mars_dist.models.factory import build_model
    from mars_dist.models.interpolate import interpolate

    cfg = ref.cfg
    meta = json.loads((ref.export / META_FILE).read_text())
    num_classes = len(meta["class_names"]) if meta.get("class_names") else _head_rows(ref)
    model = build_model(cfg.model.name, "none", num_classes, source=cfg.model.source)
    model.load_state_dict(interpolate(fine, ref.weights, alpha, ref.constraints))
    out = wise_dir(ref.export.parent, alpha)
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
    export_model(model, out, cfg.model.name, num_classes, cfg.model.source, data_config=data_config,
                 class_names=meta.get("class_names"))
    radii = {c.name: alpha * (ref.radii or {}).get(c.name, c.radius) for c in ref.constraints
             if c.action == "project" and (ref.radii or {}).get(c.name, c.radius) is not None}
    note = f"WiSE-FT alpha {alpha:g}: every radius of the run multiplied by {alpha:g}"
    if alpha == 0:
        note += " (radius 0: the export is the pretrained backbone and a zero head; nothing is certified)"
    note = f"{ref.note}; {note}" if ref.note else note
    return out, certify(read_export_weights(out), ref.weights, ref.constraints, ref.against, radii, note)


BOUND_SLACK = 1e-4
"""Nats the measured C may exceed C_r(a): each D_j may exceed a r_j by the certificate's allowance (a relative
1e-5 and float32 spacings), which moves log(sum_j D_j / B_j) by about that much."""


def scaled_bound(certificate: CertifyReport) -> dict:
    """The bound term C measured on the export and C_r(a), the same with every D_j replaced by its (scaled) radius;
    holds: C <= C_r(a) + BOUND_SLACK (None when a layer has no radius, or all radii are 0: nothing to check)."""
    used = [c for c in certificate.layers if c.layer_norm > 0]
    if not used or any(c.radius is None for c in used):
        return {"C": certificate.C, "C_radii": math.inf, "holds": None}
    rel = math.fsum(c.radius / c.layer_norm for c in used)
    if rel == 0:
        return {"C": certificate.C, "C_radii": -math.inf, "holds": None}
    c_r = math.fsum(math.log(2 * c.layer_norm) for c in used) + math.log(rel)
    return {"C": certificate.C, "C_radii": c_r, "holds": bool(certificate.C <= c_r + BOUND_SLACK)}


def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "FAILED", None: "nothing to check"}[holds]


def _head_rows(ref) -> int:
    return next(c.shape[0] for c in ref.constraints if c.role == "head")


def _card(ref, out: Path, alpha: float, certificate: CertifyReport, row: dict) -> None:
    """The export's model card: the run's facts, the interpolation, this export's certificate and accuracy."""
    from mars_dist.run.card import radii_text, write_model_card

    stats = [LayerStats(c.name, c.role, c.radius, c.distance, c.layer_norm,
                        float(c.ratio is not None and c.ratio >= 1 - 1e-4), math.nan) for c in certificate.layers]
    run = ref.export.parent
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    result = {"test_accuracy": row.get("test_accuracy"), "test_loss": row.get("test_loss"),
              "val_accuracy": row.get("val_accuracy"), "bound_C": certificate.C, "updates": summary.get("updates"),
              "test_images": summary.get("test_images"), "chance": summary.get("chance")}
    b = row["bound"]
    facts = {"Radii": f"every radius of the run x {alpha:g} (the run's: {radii_text(ref.cfg, run)}); the scaled "
                      f"values are in the table below",
             "Bound term C": f"{b['C']:.3f} on these weights; the radii x {alpha:g} bound it by C_r = "
                             f"{b['C_radii']:.3f} (Σ_j log(2 B_j) + log(Σ_j {alpha:g} r_j / B_j), B_j = ‖W_j‖_MARS "
                             f"of these weights, r_j the run's radii): checked, {_verdict(b['holds'])}"}
    extra = (f"## WiSE-FT (alpha = {alpha:g})\n\nThese weights are the fine-tuned run interpolated towards the "
             f"pretrained ones (Wortsman et al., CVPR 2022): every backbone tensor W0 + {alpha:g} (W − W0), the new "
             f"head {alpha:g} W (its anchor is zero, as in the constraint: the predictions are those of the "
             f"fine-tuned head on the interpolated features, the logits multiplied by {alpha:g}), BatchNorm scales "
             f"interpolated as effective scales d = w / sqrt(var + eps). Within the run's radii r, the interpolation "
             f"lies within {alpha:g} r: the certificate below checks exactly that, with every radius scaled, and "
             f"the bound term C of these weights against the bound C_r the scaled radii give (the facts above).")
    title = f"{Path(ref.cfg.model.name).name} WiSE-FT alpha {alpha:g} ({ref.cfg.constraint.method})"
    write_model_card(out, ref.cfg, result, stats, certificate=certificate, title=title, extra=extra, facts=facts)


def _previous(run: Path, replaced: set) -> list[dict]:
    """Rows of an earlier `mars-dist wise` on this run for other alphas: the curve grows across calls."""
    path = run / "wise.json"
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if r.get("alpha") not in replaced]
