"""Shared by the trainer-under-launcher tests: run the CLI in one process or under `accelerate launch` with a shipped
config, and check an export against the bound (whole weights, float64 distances, pretrained anchors)."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mars_dist import config
from mars_dist.constraints import Fragment, measure, select_constraints
from mars_dist.models.factory import build_model, classifier_module_names

ROOT = Path(__file__).resolve().parent.parent
BOUND_RTOL = 5e-5  # a clipped row lands within fp32 rounding of its radius
# DELTA in the launch tests (test_delta_cli.py, the knobs launch): small weights, a small attention measurement, and on
# Lite0 two early stages (64 channels) instead of the automatic last four (496): the attention measurement is a
# forward per channel group, the largest cost of these runs (the automatic choice: tests/constraints/test_delta_math.py)
DELTA_SMALL = ["constraint.method=delta", "constraint.delta.alpha=2e-4", "constraint.delta.beta=0.1",
               "constraint.delta.attention_samples=4", "constraint.delta.attention_rows=2048"]
DELTA_LITE0_LAYERS = ["constraint.delta.layers=[blocks.1, blocks.2]"]


# Launch ports come from below the kernel's ephemeral range (32768-60999 on Linux; bind(0), gloo's pair sockets and
# every outgoing connection take ports from there) and above SLURM's 6817-6830, in a block of their own per
# pytest-xdist worker (PYTEST_XDIST_WORKER=gw0, gw1, ...): a port checked free here cannot be taken by a socket of
# another worker's launch before this launcher binds it. launch/slurm/ rendezvous ports are 20000-39999.
_PORT_BLOCK = 2000
_port_base = 10000 + _PORT_BLOCK * (int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 5)
_port_offset = itertools.count(random.randrange(_PORT_BLOCK))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, from this worker's block (the next one that binds, cycling)."""
    for _ in range(_PORT_BLOCK):
        port = _port_base + next(_port_offset) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {_port_base}-{_port_base + _PORT_BLOCK - 1}")


def run_cli(out: Path, overrides: list[str], launch_config: str | None = None, processes: int = 2,
            timeout: int = 900) -> subprocess.CompletedProcess:
    """`mars-dist train` with `overrides` (one process), or under `accelerate launch` with a shipped config."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    args = ["train", *overrides, f"output_dir={out}"]
    if launch_config is None:
        cmd = [sys.executable, "-m", "mars_dist", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch/accelerate" / launch_config), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), "-m", "mars_dist", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def resume_from_middle(run: Path, tmp: Path, launch_config: str | None, overrides: list[str]) -> Path:
    """A copy of `run` killed after its first checkpoint (the later checkpoints and the end-of-run outputs removed),
    resumed with resume=auto. Returns the resumed copy."""
    from mars_dist.run import checkpoint as ckpt

    again = tmp / f"{run.name}_resumed"
    shutil.copytree(run, again)
    for later in ckpt.list_checkpoints(again)[1:]:
        shutil.rmtree(later)
    for late in ("export", "summary.json", "layers.json"):
        shutil.rmtree(again / late) if (again / late).is_dir() else (again / late).unlink(missing_ok=True)
    proc = run_cli(again, overrides + ["resume=auto"], launch_config)
    assert "resumed from" in proc.stdout + proc.stderr
    return again


def export_weights(run: Path) -> dict[str, torch.Tensor]:
    """The exported state dict, keyed as in the training model. A Hugging Face export is loaded by transformers
    itself (save_pretrained writes some legacy key names that from_pretrained maps back)."""
    export = run / "export"
    if "model_type" not in json.loads((export / "config.json").read_text()):
        return load_file(str(export / "model.safetensors"))
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(export))
    return {f"hf_model.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 2e-6, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=atol, rtol=rtol, msg=k)


def constrained_summary(run: Path) -> dict:
    return json.loads((run / "constraints.json").read_text())["summary"]


def projection_was_active(run: Path) -> bool:
    """Some layer of the final weights at its bound (layers.json), or rows clipped at some update (metrics.jsonl:
    with EMA on, layers.json describes the EMA weights, an average of projected weights, inside the ball)."""
    if any(layer["frac_at_bound"] > 0 for layer in json.loads((run / "layers.json").read_text())["layers"]):
        return True
    return any(json.loads(line).get("constraint/rows_clipped", 0) > 0
               for line in (run / "metrics.jsonl").read_text().splitlines())


def bound_ratios(run: Path, anchor_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """distance / radius of every projected layer of the export, over what fp32 rounding allows, against anchors
    from the pretrained weights as loaded from their source (optionally cast to `anchor_dtype` and back, to show
    what a run anchored on a rounded copy would give). BatchNorm effective scales use the exported running variance, the one the last projection
    saw. <= 1: the bound holds."""
    cfg = config.load(run / "config.yaml")
    export = export_weights(run)
    model = build_model(cfg.model.name, cfg.model.pretrained, _num_classes(run), source=cfg.model.source,
                        head_seed=cfg.seed)
    c = cfg.constraint
    constraints = select_constraints(model, classifier_module_names(model), c.method, c.radius, c.head_radius,
                                     c.penalty, c.head_penalty, [(g.pattern, g.radius) for g in c.groups],
                                     c.norm_layers, c.embeddings, c.bn_eps)
    pretrained = dict(model.named_parameters())
    frags = []
    for con in constraints:
        w0 = pretrained[con.name].detach().to(anchor_dtype).float().reshape(-1)
        if con.role == "bn":
            con.running_var = export[con.name.rsplit(".", 1)[0] + ".running_var"].float()
        frags.append(Fragment(con, export[con.name].float().reshape(-1), con.anchor_fragment(w0, 0), 0))
    out = {}
    for con, s in zip(constraints, measure(frags)):
        if con.action == "project" and con.radius is not None:
            # diagonal layers are clipped elementwise (BN: in effective-scale space, then multiplied back): the
            # clipped value is off by an ulp of the value itself, which can be large next to a small radius
            allowed = 1 + BOUND_RTOL + (8 * 2.0 ** -24 * s.layer_norm / con.radius if con.kind == "diag" else 0.0)
            dist = s.frobenius if con.norm == "l2" and con.kind == "rows" else s.distance
            out[con.name] = dist / con.radius / allowed
    return out


def _num_classes(run: Path) -> int:
    layers = json.loads((run / "constraints.json").read_text())["layers"]
    head = next(layer for layer in layers if layer["role"] == "head")
    return head["shape"][0]


def assert_bound_holds(run: Path, anchor_dtype: torch.dtype = torch.float32) -> None:
    ratios = bound_ratios(run, anchor_dtype)
    assert ratios, "no projected layer"
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1, f"{worst}: distance / radius is {ratios[worst]} x what rounding allows"
