"""DeepSpeed ZeRO-1/2/3: project this rank's fragments of the fp32 masters inside the inner optimizer step.

Where the fp32 master of a parameter lives (docs/sharding.md, 'DeepSpeed and FSDP2 internals we rely on'):
- ZeRO-3: `safe_get_local_fp32_param(p)`, a view into the flat fp32 buffer of p's sub-group. Rank r holds
  flatten(p)[r*P : r*P+P] with P = ceil(numel / world); the tail beyond numel is padding and is masked off.
- ZeRO-1/2 (and DeepSpeed's BF16_Optimizer for ZeRO-1 + bf16): `p._hp_mapping.hp_fragment`, a view into the flat
  fp32 partition of p's param group, covering flatten(p)[start : start+numel] with start =
  `lp_fragment_address.start`; None where this rank owns nothing of p (partitions cut rows anywhere).

The hook sits on the INNER torch optimizer. DeepSpeed calls its step once per param group (ZeRO-1/2) or per
sub-group (ZeRO-3), and copies that group's fp32 partition to the low-precision weights right after each call; the
all-gather (ZeRO-1/2) / re-gather of persistent parameters (ZeRO-3) comes after the loop. So:
- PGM: project on the LAST firing (all fp32 updates done; one all-reduce), then re-copy the groups whose copy was
  already made (a local copy; only when there is more than one group). Forward then sees projected weights.
- SP: add penalty gradients on the FIRST firing (all weights still pre-update; one all-reduce). With more than one
  group the later groups' fp32 gradients only exist at their own firing: they get theirs there (one more
  all-reduce per extra group).
Skipped (overflow) steps never call the inner step, so they never project.
ZeRO-Offload (`offload_optimizer: {device: cpu}`) changes nothing of this: the flat fp32 masters and the inner
optimizer's step live on the CPU, the hook projects them there, DeepSpeed copies them to the forward weights after
(`check_offload` says what is refused).

This is the only module of mars_dist that imports deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param,
                             safe_set_local_fp32_param)
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mars_dist.constraints import Constraint, Fragment, add_penalty_grads, full_shape
from mars_dist.constraints.selection import rebind_running_vars
from mars_dist.sharding import (named_parameters, register_after_step_hook,
                                weak_callable)
from mars_dist.sharding.base import Backend
from mars_dist.sharding.masters import LOCAL_ATTR, PretrainedWeights


def check_offload(engine, optimizer: torch.optim.Optimizer) -> bool:
    """True under ZeRO-Offload (`offload_optimizer: {device: cpu}`, ZeRO-1/2/3): DeepSpeed keeps the flat fp32
    masters and the optimizer state on the CPU and steps the inner optimizer there, so those CPU tensors are the
    real masters and the in-step projection works on them unchanged (then DeepSpeed copies them to the forward
    weights). Refused, each with what to change: NVMe offload, SuperOffload, and an inner optimizer that is not
    the trainer's torch optimizer (accelerate swaps it for DeepSpeedCPUAdam - SGD included, betas/eps dropped -
    unless `zero_force_ds_cpu_optimizer: false`, which the trainer sets)."""
    cfg = engine.zero_offload_optimizer()
    device = str(getattr(getattr(cfg, "device", "none"), "value", getattr(cfg, "device", "none")))
    if device == "none":
        return False
    if device != "cpu":
        raise NotImplementedError(f"zero_optimization.offload_optimizer.device={device!r} is not supported (the "
                                  f"projection is tested with the fp32 masters on the CPU); use device: cpu")
    if getattr(cfg, "super_offload", False):
        raise NotImplementedError("zero_optimization.offload_optimizer.super_offload is not supported (its own "
                                  "optimizer path); remove super_offload")
    if type(optimizer).__module__.startswith("deepspeed"):
        raise NotImplementedError(
            f"ZeRO-Offload stepped {type(optimizer).__name__}, not the configured torch optimizer: accelerate "
            f"replaces a torch optimizer under offload unless the DeepSpeed config has "
            f"\"zero_force_ds_cpu_optimizer\": false (the trainer sets it when the key is absent); remove "
            f"\"zero_force_ds_cpu_optimizer\": true")
    return True


def restore_masters(engine, pretrained: PretrainedWeights) -> dict:
    """Write the pretrained values into this rank's fp32 masters of every trainable parameter, through DeepSpeed's
    own setters (ZeRO-3: the local partition; ZeRO-1/2 and bf16_optimizer: the fragment of the full value this rank
    owns; both local copies, no collective). The low-precision forward copies need no refresh: they were cast from
    these same values. Returns counts: parameters written, elements that differed from what DeepSpeed had built."""
    written = differed = 0
    for name, p in named_parameters(engine.module).items():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3
            part = p.ds_tensor.numel()
            start = dist.get_rank(p.ds_process_group) * part
            numel = max(0, min(part, p.ds_numel - start))
            values = pretrained.fragment(name, start, numel)
            if values is None:
                continue
            master = safe_get_local_fp32_param(p).detach()
            current = master.to("cpu", torch.float32)
            new = current.clone()
            new[:numel] = values  # the padding tail keeps what it holds
            differed += int((new != current).sum())
            safe_set_local_fp32_param(p, new.to(master.device))
        else:
            if name not in pretrained.whole:
                continue
            full = pretrained.whole[name].float().reshape(p.shape)
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                frag = mapping.hp_fragment
                address = mapping.lp_fragment_address
                differed += int((frag.detach().cpu() != full.reshape(-1).narrow(0, address.start, address.numel)
                                 ).sum())
            safe_set_full_fp32_param(p, full.to(p.device))  # writes only the fragment this rank owns
        written += 1
        if hasattr(p, LOCAL_ATTR):
            delattr(p, LOCAL_ATTR)
    pretrained.release()
    return {"parameters": written, "elements_changed": differed}


@dataclass
class _Slot:
    """Where this rank's fragment of one constrained parameter is: flat fp32 tensor `group`, elements
    [start, start+numel) of it, holding flatten(param)[offset : offset+numel]."""
    param: torch.nn.Parameter
    group: int
    start: int
    numel: int
    offset: int


class ZeroBackend(Backend):
    """Fragments of the fp32 masters of a DeepSpeedEngine (ZeRO stage 1, 2 or 3; fp32 or bf16)."""

    name = "zero"

    def __init__(self, constraints: list[Constraint], engine, pretrained: PretrainedWeights | None = None):
        super().__init__(constraints)
        self.engine = engine
        self.zero = engine.optimizer
        self.optimizer: torch.optim.Optimizer = self.zero.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self.kind = ("stage3" if self.stage == 3 else
                     "bf16_optimizer" if hasattr(self.zero, "fp32_groups_flat_partition") else "stage12")
        if self.stage == 0 or not isinstance(self.optimizer, torch.optim.Optimizer):
            raise NotImplementedError(f"ZeroBackend needs ZeRO stage 1-3 over a torch optimizer; got stage "
                                      f"{self.stage} with {type(self.optimizer).__name__}")
        self.offload = check_offload(engine, self.optimizer)
        self.process_group = self.zero.dp_process_group
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        module = engine.module
        rebind_running_vars(constraints, module)  # DeepSpeed's dtype cast may have replaced the buffers
        params = named_parameters(module)
        missing = [c.name for c in constraints if c.name not in params]
        if missing:
            raise KeyError(f"constrained parameters not found in the DeepSpeed module: {missing[:5]}")
        group_of = {id(p): k for k, ps in enumerate(self._param_lists()) for p in ps}
        self.slots = [self._slot(params[c.name], group_of[id(params[c.name])], c) for c in constraints]
        self.low_precision = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
        if pretrained is not None:
            self.masters_restored = restore_masters(engine, pretrained)
        elif self.low_precision:
            raise ValueError(
                "DeepSpeed bf16/fp16 built the fp32 masters from the low-precision copy of the model: anchors read "
                "from them would be a rounded copy of the pretrained weights, and the bound would not hold around "
                "the weights you started from. Capture them before prepare (PretrainedWeights.capture(model)) and "
                "pass them as `pretrained`")
        # Anchors: read from the masters, which now hold the pretrained weights exactly. Same layout as the fragments.
        self.pack(self.fragments())
        actions = {c.action for c in constraints}
        self.phase = "pre" if "penalty" in actions else "post"
        if self.num_groups > 1 and {"penalty", "project"} <= actions:
            raise NotImplementedError("penalties and projections together need one param group / sub-group")
        self.finishers: list = []  # run after the projection of an update, before the low-precision re-copy
        self._finish_pending = False
        self._stale: list[int] = []
        self._handles = [register_after_step_hook(self.optimizer, self._after_projection)]
        if self.num_groups > 1 and self.phase == "pre":
            self._handles.append(register_optimizer_step_pre_hook(weak_callable(self._penalty_for_group)))

    # ---- layout ----------------------------------------------------------------------------------------------
    def _param_lists(self) -> list[list[torch.nn.Parameter]]:
        """Model parameters per flat fp32 tensor (param group, or sub-group for ZeRO-3)."""
        z = self.zero
        return z.fp16_groups if self.kind == "stage3" else z.bf16_groups if self.kind == "bf16_optimizer" \
            else z.bit16_groups

    def flats(self) -> list[torch.Tensor]:
        """The flat fp32 master tensors the inner optimizer steps, one per group / sub-group."""
        z = self.zero
        return z.fp32_partitioned_groups_flat if self.kind == "stage3" else z.fp32_groups_flat_partition \
            if self.kind == "bf16_optimizer" else z.single_partition_of_fp32_groups

    @property
    def num_groups(self) -> int:
        return len(self.flats())

    def _slot(self, p: torch.nn.Parameter, group: int, c: Constraint) -> _Slot:
        flats = self.flats()
        if self.kind == "stage3":
            _, start, part = self.zero.grad_position[self.zero.get_param_id(p)]
            rank = dist.get_rank(p.ds_process_group)
            numel = max(0, min(part, c.numel - rank * part))  # mask the padding tail of the last rank(s)
            # with offload on an accelerator safe_get_local_fp32_param returns a device COPY of the CPU master;
            # the flat CPU tensor the inner optimizer steps is the master itself (grad_position says where)
            if not self.offload and safe_get_local_fp32_param(p).data_ptr() != \
                    flats[group].narrow(0, start, part).data_ptr():
                raise RuntimeError(f"{c.name}: safe_get_local_fp32_param is not a view of the fp32 master; the "
                                   f"sharded projection cannot edit it in place")
            return _Slot(p, group, start, numel, rank * part)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this rank owns nothing of p
            return _Slot(p, group, 0, 0, 0)
        start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        if mapping.hp_fragment.data_ptr() != flats[group].narrow(0, start, numel).data_ptr():
            raise RuntimeError(f"{c.name}: _hp_mapping.hp_fragment is not a view of the flat fp32 partition")
        return _Slot(p, group, start, numel, mapping.lp_fragment_address.start)

    def master_tensors(self) -> list[torch.Tensor]:
        return [f.detach() for f in self.flats()]

    def master_layout(self) -> dict[str, tuple[int, int, int, int]]:
        """Every parameter of every flat fp32 tensor (the trainable ones: DeepSpeed's groups hold nothing else)."""
        names = {id(p): n for n, p in named_parameters(self.engine.module).items()}
        out = {}
        for k, ps in enumerate(self._param_lists()):
            for p in ps:
                if self.kind == "stage3":
                    _, start, part = self.zero.grad_position[self.zero.get_param_id(p)]
                    rank = dist.get_rank(p.ds_process_group)
                    out[names[id(p)]] = (k, start, max(0, min(part, p.ds_numel - rank * part)), rank * part)
                    continue
                mapping = getattr(p, "_hp_mapping", None)
                out[names[id(p)]] = (k, 0, 0, 0) if mapping is None else (
                    k, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel,
                    mapping.lp_fragment_address.start)
        return out

    def completes_update(self) -> bool:
        return self.num_groups - 1 in self.stepping_groups()

    def full_shapes(self) -> list[tuple[int, ...]]:
        return [full_shape(s.param) for s in self.slots]  # the engine's parameters, not self.params

    def hook_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def fragments(self) -> list[Fragment]:
        """One fragment per constraint on every rank (empty where this rank owns nothing), so the partial-sum
        buffers line up across ranks. Cached while the flat tensors and their grads are the same memory (a cached
        view keeps its storage alive, so an equal address is the same memory): building thousands of views costs
        more per update than the penalty itself (5 ms at 2,000 tensors); loading a checkpoint, or a step that
        hands the optimizer new grad tensors, rebuilds them."""
        flats = self.flats()
        key = tuple((f.data_ptr(), None if f.grad is None else (f.grad.data_ptr(), f.grad.numel())) for f in flats)
        if key != getattr(self, "_fragments_key", None):
            self._fragments_key, self._fragments = key, self._build_fragments(flats)
        return self._fragments

    def _build_fragments(self, flats: list[torch.Tensor]) -> list[Fragment]:
        out = []
        for c, s in zip(self.constraints, self.slots):
            flat = flats[s.group]
            grad = flat.grad.narrow(0, s.start, s.numel) if flat.grad is not None else None
            out.append(Fragment(c, flat.detach().narrow(0, s.start, s.numel), None, s.offset, grad))
        return out

    def weight_fragments(self) -> list[Fragment]:
        """fragments() without grads, cached while the flat tensors are the same memory (building thousands of
        views per update costs more than projecting them; the grads are new tensors at every step)."""
        key = tuple(f.data_ptr() for f in self.flats())
        if key != getattr(self, "_weights_key", None):
            self._weights_key = key
            self._weights = [Fragment(f.constraint, f.w, None, f.offset) for f in self.fragments()]
        return self._weights

    def reduce(self, to_sum: torch.Tensor, to_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the collective runs on the engine's device (NCCL refuses CPU tensors, and offloaded masters are on the
        # CPU); results go back to where the partial sums were computed
        home = to_sum.device
        buf = torch.cat([to_sum.to(self.engine.device), to_average.to(self.engine.device) / self.world_size])
        if buf.numel():
            dist.all_reduce(buf, group=self.process_group)
        return buf[:to_sum.numel()].to(home), buf[to_sum.numel():].to(home)

    # ---- where in the DeepSpeed step we are ------------------------------------------------------------------
    def stepping_groups(self) -> list[int]:
        """Indices of the flat fp32 tensors the inner optimizer is stepping right now (DeepSpeed narrows its
        param_groups to one group / sub-group per call)."""
        current = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [k for k, flat in enumerate(self.flats()) if id(flat) in current]

    def stepping_mask(self) -> list[bool]:
        steps = set(self.stepping_groups())
        return [s.group in steps for s in self.slots]

    def begin_hook(self) -> bool:
        steps = self.stepping_groups()
        if not steps:
            return False
        if self.phase == "pre":
            return 0 in steps  # first firing: no group has moved yet, every weight is pre-update
        if self.num_groups - 1 not in steps:
            return False
        self._stale = list(range(min(steps)))  # groups already stepped AND copied to low precision
        self._finish_pending = True
        return True

    def _after_projection(self) -> None:
        if not self._finish_pending:
            return
        self._finish_pending = False
        for fn in self.finishers:
            fn()
        self._copy_to_low_precision(self._stale)

    def _penalty_for_group(self, opt, _args, _kwargs) -> None:
        """Global pre hook (runs before the ProjectionHook's): penalty gradients of a group past the first."""
        if opt is not self.optimizer:
            return
        steps = self.stepping_groups()
        if not steps or 0 in steps:
            return
        # all fragments through the layout, grads only where this firing steps (a parameter lives in one group,
        # so the penalty of those constraints depends on their own, still pre-update, weights only)
        frags = [f if s.group in steps else Fragment(f.constraint, f.w, None, f.offset, None)
                 for f, s in zip(self.fragments(), self.slots)]
        add_penalty_grads(frags, self.reduce, self.packing)

    def _copy_to_low_precision(self, groups: list[int]) -> None:
        z = self.zero
        for k in groups:
            if self.kind == "stage3":
                z.fp16_partitioned_groups_flat[k].data.copy_(z.fp32_partitioned_groups_flat[k].data)
            else:
                lp = z.bf16_partitioned_groups if self.kind == "bf16_optimizer" else z.parallel_partitioned_bit16_groups
                lp[k][dist.get_rank(z.real_dp_process_group[k])].data.copy_(self.flats()[k].data)

    def sync_forward_weights(self) -> None:
        """Fallback when the masters were edited after `engine.step()`: copy every group to low precision and
        all-gather / re-gather (ZeRO-3 persistent parameters stay gathered and must be refreshed)."""
        if self.kind != "stage3":
            self.zero.update_lp_params()
            return
        self._copy_to_low_precision(list(range(self.num_groups)))
        self.zero._partition_all_parameters()
        if self.zero.persistent_parameters:
            self.zero.persistent_parameters[0].all_gather(self.zero.persistent_parameters)

    # ---- gather reference support (gather.py) ----------------------------------------------------------------
    def full_param(self, i: int) -> torch.Tensor:
        """The whole fp32 master of constraint i, flattened, in a fresh buffer (a collective)."""
        return safe_get_full_fp32_param(self.slots[i].param).detach().reshape(-1)

    def write_full(self, i: int, full: torch.Tensor) -> None:
        """Write this rank's part of a whole flattened fp32 value into the master (local copy). Not
        safe_set_full_fp32_param: in 0.19.8 it fails on the last rank when numel % world != 0."""
        s = self.slots[i]
        self.flats()[s.group].narrow(0, s.start, s.numel).copy_(full[s.offset:s.offset + s.numel])

    # ---- anchors in checkpoints --------------------------------------------------------------------------------
    def layout(self) -> dict:
        return {"backend": self.name, "stage": self.stage, "world_size": self.world_size, "rank": self.rank,
                "params": {c.name: [s.offset, s.numel] for c, s in zip(self.constraints, self.slots)}}


    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
