"""DeepSpeed worker (2 CPU processes, gloo), one launch for several cases:

    accelerate launch --config_file launch/accelerate/zeroN.yaml --num_processes 2 tests/distributed/zero_worker.py \
        OUT_DIR [--resume CASE] CASE [CASE ...]

Per case: the fine-tune of tests/distributed/dist_common.py through accelerate + DeepSpeed exactly as the trainer drives it
(accumulate / backward / step), the projection hook on build_backend's backend; after every update it gathers the
whole fp32 masters (safe_get_full_fp32_param) and the weights forward uses (GatheredParameters, read-only) and
records how far each constrained layer is from its radius. Rank 0 writes OUT/CASE.json and OUT/CASE.pt (final fp32
masters); --resume CASE also checkpoints that case after update 2 and resumes it in a fresh engine.

Test-only workaround: several engines in one process (accelerate expects one), so before each prepare the wrapped
engine is reset, and before save/load_state accelerate's lists are narrowed to the current engine.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import dist_common as common
import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from deepspeed.utils import safe_get_full_fp32_param

from mars_dist.constraints import project
from mars_dist.run.hook import ProjectionHook
from mars_dist.sharding import AnchorLayoutError, PretrainedWeights, build_backend


def full_weights(engine, stage: int) -> tuple[dict, dict]:
    """(whole fp32 masters, whole weights forward uses), on every rank."""
    params = list(engine.module.named_parameters())
    masters = {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in params}
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            forward = {n: p.detach().float().clone() for n, p in params}
    else:
        forward = {n: p.detach().float().clone() for n, p in params}
    return masters, forward


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class Run:
    """One case: model, accelerate-prepared engine, backend and hook."""

    def __init__(self, acc: Accelerator, base_config: dict, name: str):
        self.acc, self.c = acc, common.case(name)
        cfg = acc.state.deepspeed_plugin.deepspeed_config
        cfg.clear()
        cfg.update(copy.deepcopy(base_config))
        cfg["train_micro_batch_size_per_gpu"] = common.MICRO
        cfg["gradient_clipping"] = 0.0
        cfg["bf16"] = {"enabled": self.c["bf16"]}
        if self.c["fp32_accum"]:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["zero_optimization"]["sub_group_size"] = self.c["sub_group_size"]
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = self.c["persistence"]
        if self.c["offload"]:  # as the trainer configures it (sharding/accelerate_setup.py)
            cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            cfg["zero_force_ds_cpu_optimizer"] = False
        self.stage = cfg["zero_optimization"]["stage"]
        acc.deepspeed_engine_wrapped = None
        model = common.build_model(self.c["model"])
        # the bound is checked around the fp32 weights the model was built with, also in bf16 (not DeepSpeed's cast)
        self.pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.constraints = common.constraints_for(model, self.c)
        opt = common.make_optimizer(model, self.c["groups"])
        captured = PretrainedWeights.capture(model)
        self.engine, self.opt = acc.prepare(model, opt)
        self.backend = build_backend(acc, self.engine, self.opt, self.constraints, self.c["mode"], captured)
        self.hook = ProjectionHook(self.backend)
        self.dtype = torch.bfloat16 if self.c["bf16"] else torch.float32
        self.rank = acc.process_index
        self.log: dict = {"ratio_master": [], "ratio_forward": [], "master_vs_forward": [], "clipped": []}

    def only_me(self) -> None:
        acc = self.acc
        acc._models, acc._optimizers, acc._schedulers, acc._dataloaders = [self.engine], [self.opt], [], []

    def train(self, updates: range, on_update=None) -> None:
        x, y = common.data()
        common.set_train_mode(self.engine.module, self.c["bn_mode"])
        for u in updates:
            for m in range(common.ACCUM):
                with self.acc.accumulate(self.engine):
                    loss = F.cross_entropy(self.engine(x[u, self.rank, m].to(self.dtype)).float(), y[u, self.rank, m])
                    self.acc.backward(loss)
                    self.opt.step()
                    self.opt.zero_grad()
            assert self.acc.sync_gradients
            self.record()
            if on_update:
                on_update(u)

    def record(self) -> None:
        if self.hook.learned is not None:  # mars-ftp: ratios against the radii learned so far
            self.hook.learned.sync_radii()
        masters, forward = full_weights(self.engine, self.stage)
        self.log["ratio_master"].append(max(common.max_ratios(self.constraints, masters, self.pretrained).values(),
                                             default=0.0))
        self.log["ratio_forward"].append(max(common.max_ratios(self.constraints, forward, self.pretrained).values(),
                                              default=0.0))
        self.log["master_vs_forward"].append(max_diff(masters, forward))
        self.log["clipped"].append(self.hook.last_clipped)
        if self.c["bf16"]:  # forward must be exactly bf16(projected master): no lag
            self.log.setdefault("forward_vs_bf16_master", []).append(
                max(float((forward[k] - masters[k].bfloat16().float()).abs().max()) for k in masters))
            self.log.setdefault("bf16_excess", []).append(
                common.bf16_excess(self.constraints, forward, masters, self.pretrained))
        self.masters = masters

    def summary(self) -> dict:
        stats = self.hook.stats()
        bn = [c.running_var.detach().double().sum().item() for c in self.constraints if c.role == "bn"]
        frags = self.backend.fragments()
        anchors = self.backend.anchors
        checked = [(f, a) for f, a in zip(frags, anchors)
                   if a is not None and f.constraint.role != "bn" and f.w.numel() and self.backend.name == "zero"]
        assert checked or self.backend.name != "zero", "no anchor fragment to compare"
        bf16_anchor_err = max((float((a - self.pretrained[f.constraint.name].reshape(-1)[
            f.offset:f.offset + f.w.numel()]).abs().max()) for f, a in checked), default=0.0)
        return {**self.log, "updates": self.hook.updates, "checksum": self.backend.anchor_checksum(),
                "zero_kind": getattr(self.backend, "kind", ""),
                "active_layers": sum(s.frac_at_bound > 0 for s in stats if s.radius is not None),
                "num_groups": getattr(self.backend, "sharded", self.backend).num_groups,
                "offload": bool(getattr(self.engine.optimizer, "offload_optimizer", False)
                                or getattr(self.engine.optimizer, "cpu_offload", False)),  # DeepSpeed's own flag
                "inner_optimizer": type(self.engine.optimizer.optimizer).__name__,
                "bn_var_sums": bn, "anchor_vs_pretrained": bf16_anchor_err, "backend": self.backend.name}


def fallback_sync(run: Run) -> dict:
    """Project after the step (radius halved) and sync_forward_weights: forward must see it at once."""
    for c in run.constraints:
        if c.radius is not None:
            c.radius *= 0.5
    project(run.backend.fragments(), run.backend.reduce, run.backend.packing)
    masters, forward = full_weights(run.engine, run.stage)
    stale = max_diff(masters, forward)  # the trap: edits after the step do not reach forward by themselves
    run.backend.sync_forward_weights()
    masters, forward = full_weights(run.engine, run.stage)
    return {"fallback_before_sync": stale, "fallback_master_vs_forward": max_diff(masters, forward),
            "fallback_ratio_forward": max(common.max_ratios(run.constraints, forward, run.pretrained).values())}


def skipped_step(run: Run) -> dict:
    """A non-finite gradient makes DeepSpeed skip the update: the inner step never runs, nothing is projected."""
    before = run.hook.updates
    masters, _ = full_weights(run.engine, run.stage)
    x, y = common.data()
    for m in range(common.ACCUM):
        with run.acc.accumulate(run.engine):
            loss = F.cross_entropy(run.engine(x[0, run.rank, m].to(run.dtype)).float(), y[0, run.rank, m])
            run.acc.backward(loss * float("inf"))
    after, _ = full_weights(run.engine, run.stage)
    return {"skip_hook_updates": run.hook.updates - before, "skip_weights_changed": max_diff(masters, after),
            "skip_ds_skipped": int(run.engine.skipped_steps)}


def resume_case(acc: Accelerator, base: dict, name: str, out: Path) -> tuple[dict, dict]:
    """Checkpoint after update 2, finish, then resume from the checkpoint in a fresh engine and finish again."""
    ckpt = out / f"{name}_ckpt"
    first = Run(acc, base, name)

    def save(u: int) -> None:
        if u == 1:
            first.only_me()
            acc.save_state(str(ckpt))
            torch.save(first.backend.anchor_state(), ckpt / f"anchors_rank{first.rank}.pt")
            dist.barrier()

    first.train(range(common.UPDATES), save)
    result = first.summary()
    second = Run(acc, base, name)
    for i, a in enumerate(second.backend.anchors):  # copies: perturb the packed storage itself
        if a is not None:
            second.backend.packing.set_anchor(i, a + 1.0)  # so that only a real load brings them back
    second.only_me()
    acc.load_state(str(ckpt))
    other = torch.load(ckpt / f"anchors_rank{1 - second.rank}.pt")
    try:
        second.backend.load_anchor_state(other)
        result["layout_error"] = ""
    except AnchorLayoutError as err:
        result["layout_error"] = str(err)
    second.backend.load_anchor_state(torch.load(ckpt / f"anchors_rank{second.rank}.pt"))
    result["resumed_checksum"] = second.backend.anchor_checksum()
    second.train(range(2, common.UPDATES))
    result["resumed_ratio_master"] = second.log["ratio_master"]
    if second.rank == 0:
        torch.save(second.masters, out / f"{name}_resumed.pt")
    return result, first.masters


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    resume = None
    if "--resume" in args:
        i = args.index("--resume")
        resume = args[i + 1]
        args = args[:i] + args[i + 1:]  # the case after --resume stays in the list
    acc = Accelerator(gradient_accumulation_steps=common.ACCUM,
                      kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    base = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    for name in args:
        if name == resume:
            result, final = resume_case(acc, base, name, out)
        else:
            run = Run(acc, base, name)
            run.train(range(common.UPDATES))
            result = run.summary()
            final = run.masters
            if run.c["name"] == "pgm":
                result.update(skipped_step(run))
                result.update(fallback_sync(run))
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, result)
        if acc.process_index == 0:
            (out / f"{name}.json").write_text(json.dumps(per_rank))
            if final is not None:
                torch.save(final, out / f"{name}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
