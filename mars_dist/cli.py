"""`mars-dist train CONFIG [key=value ...]`, `mars-dist sweep CONFIG [key=value ...] --trials N`,
`mars-dist prepare NAME SOURCE OUT`, `mars-dist config [CONFIG]`; after training: `mars-dist eval EXPORT_OR_RUN_DIR
[key=value ...]`, `mars-dist predict EXPORT_DIR IMAGE_OR_FOLDER ... [--top-k K] [--output predictions.csv]`,
`mars-dist report RUN_DIR`, `mars-dist certify RUN_DIR_OR_EXPORT [--pretrained SOURCE] [--json FILE]`,
`mars-dist interpolate RUN_DIR --alpha A [B ...] [--split val] [--no-eval]` (WiSE-FT exports; alias `wise`).

The same entry point runs under `accelerate launch -m mars_dist train CONFIG ...` and SLURM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mars_dist import config as config_mod


def _train(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    from mars_dist.run.train import train  # heavy imports only when training

    from mars_dist.run import elastic

    try:
        result = train(cfg)
    except Exception as err:  # a lost rank: requeue (mars_dist/run/elastic.py); anything else as before
        if not elastic.is_lost_rank(err):
            raise
        return elastic.report_lost_rank(cfg.output_dir, err)
    return 0 if result else 1


def _show_config(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    import yaml

    print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), end="")
    return 0


def _sweep(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    from mars_dist.commands.sweep import sweep

    print(json.dumps(sweep(cfg, trials=args.trials, launcher=args.launcher), indent=1))
    return 0


def _prepare(args) -> int:
    from mars_dist.data.prepare import prepare_dataset, prepare_from_hub

    if args.from_hub:
        report = prepare_from_hub(args.name, args.out_dir, val_fraction=args.val_fraction, seed=args.seed,
                                  overwrite=args.overwrite)
    else:
        if args.source_dir is None:
            raise SystemExit("mars-dist prepare: SOURCE_DIR is required unless --from-hub is given")
        report = prepare_dataset(args.name, args.source_dir, args.out_dir, val_fraction=args.val_fraction,
                                 seed=args.seed, link=args.link, overwrite=args.overwrite,
                                 crop_banner=not args.keep_banner, split_id=args.split_id)
    print(report)
    return 0


def _eval(args) -> int:
    from mars_dist.commands.evaluate import run_eval

    run_eval(args.target, args.overrides, split=args.split, output_dir=args.output_dir)
    return 0


def _predict(args) -> int:
    from mars_dist.commands.predict import predict

    predict(args.export, args.images, top_k=args.top_k, output=args.output, batch_size=args.batch_size,
            num_workers=args.workers)
    return 0


def _report(args) -> int:
    from mars_dist.commands.report import write_report

    print(f"mars-dist report: wrote {write_report(args.run_dir, args.output)}")
    return 0


def _certify(args) -> int:
    from mars_dist.commands.certify import certify_export

    report = certify_export(args.target, pretrained=args.pretrained)
    print("\n".join(report.lines()))
    if args.json:
        rows = [{"name": c.name, "role": c.role, "distance": c.distance, "radius": c.radius, "ratio": c.ratio,
                 "over": c.over} for c in report.layers]
        with open(args.json, "w") as f:
            json.dump({**report.summary(), "per_layer": rows}, f, indent=1)
    return 1 if report.passed is False else 0


def _wise(args) -> int:
    from mars_dist.commands.wise import wise

    rows = wise(args.run_dir, args.alpha, evaluate=not args.no_eval, split=args.split, pretrained=args.pretrained)
    return 1 if any(r["certificate"]["passed"] is False or r["bound"]["holds"] is False for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mars-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with a YAML config and dotted.key=value overrides")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.lr=1e-4 constraint.radius=3")
    p.set_defaults(func=_train)
    p = sub.add_parser("sweep", help="radius / penalty search (Optuna TPE, persistent study in output_dir)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--trials", type=int, default=None,
                   help="trials THIS worker runs (default: until the study has sweep.trials finished trials)")
    p.add_argument("--launcher", default="", help='e.g. "accelerate launch --config_file launch/accelerate/cpu.yaml"')
    p.set_defaults(func=_sweep)
    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_show_config)
    p = sub.add_parser("prepare", help="turn an official dataset release into train/ val/ test/ image folders")
    p.add_argument("name", help="flowers102, aircraft, dtd or pets")
    p.add_argument("source_dir", nargs="?", help="directory with the downloaded archives")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--from-hub", action="store_true", help="load the Hugging Face hub copy instead (online)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link", action="store_true", help="link images instead of copying")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-banner", action="store_true", help="aircraft: keep the bottom 20-pixel banner")
    p.add_argument("--split-id", type=int, default=1, help="dtd: which of the 10 official splits (1..10)")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("eval", help="evaluate an export (or a run's) on the test split or any data set (data.* "
                                    "overrides): accuracy, loss, per-class accuracy, ECE, confusion matrix")
    p.add_argument("target", help="an export folder or a run directory (OUTPUT_DIR)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value on the run's config, e.g. data.name=imagefolder "
                                                "data.path=other/ data.test_limit=null train.batch_size=64")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--output-dir", default=None, help="where the JSON and the PNG go (default RUN_DIR/eval)")
    p.set_defaults(func=_eval)
    p = sub.add_parser("predict", help="classify images and folders of images with an export; CSV out")
    p.add_argument("export", help="an export folder or a run directory")
    p.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=1, help="labels per image, most probable first")
    p.add_argument("--output", default=None, help="CSV file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.set_defaults(func=_predict)
    p = sub.add_parser("report", help="one self-contained HTML page of a run (curves, per-layer distances over "
                                      "time, radii, bound term C, config)")
    p.add_argument("run_dir")
    p.add_argument("--output", default=None, help="HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=_report)
    p = sub.add_parser("certify", help="check every constrained layer of an export against its radius around the "
                                       "pretrained weights from their source (float64); exit 1 when one is over")
    p.add_argument("target", help="a run directory or an export folder")
    p.add_argument("--pretrained", default=None, help="'bundled', 'hub', a weights file or a save_pretrained "
                                                      "directory (default: the run's model.pretrained)")
    p.add_argument("--json", default=None, help="also write the certificate and the per-layer rows to this file")
    p.set_defaults(func=_certify)
    p = sub.add_parser("interpolate", aliases=["wise"], help="WiSE-FT: RUN_DIR/export_wise_A/ exports interpolated "
                       "towards the pretrained weights, certified within alpha x the radii (and the bound term "
                       "against the bound they give), evaluated; exit 1 when a check fails")
    p.add_argument("run_dir", help="a finished run directory (config.yaml + export/)")
    p.add_argument("--alpha", type=float, action="extend", nargs="+", required=True,
                   help="interpolation weights in [0, 1] (0: pretrained, 1: the export); repeat or list several")
    p.add_argument("--split", default="test", choices=("test", "val"), help="evaluate on (val: to choose alpha)")
    p.add_argument("--no-eval", action="store_true", help="write and certify only")
    p.add_argument("--pretrained", default=None, help="as for certify (default: the run's model.pretrained)")
    p.set_defaults(func=_wise)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `mars-dist train x.yaml a=b` : argparse would take the first override as CONFIG when no file is given
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        code = args.func(args)
    except config_mod.ConfigError as err:
        print(f"mars-dist: config error: {err}", file=sys.stderr)
        code = 2
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        # Bad input (data path, model name, checkpoint, diverged loss) carries a message naming the problem: print
        # that one line, not a traceback. MARS_DIST_DEBUG=1 re-raises for the full trace.
        if os.environ.get("MARS_DIST_DEBUG") or type(err) is RuntimeError:
            raise
        print(f"mars-dist {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        code = 3 if type(err).__name__ == "TrainingDiverged" else 2
    sys.exit(code)
