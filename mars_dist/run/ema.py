"""An exponential moving average of the fp32 master weights, on each rank's own fragments (docs/recipes.md, "EMA").

Why not timm's ModelEmaV3: it deep-copies the whole module on every rank — a full model per rank under ZeRO-3 /
FSDP2, and a copy of the low-precision forward weights, not of the fp32 masters the bound holds on. We follow its
math (decay, warm-up, buffers averaged too) on the tensors the inner optimizer steps, which the sharding backend
names (`Backend.master_tensors` / `master_layout`): one flat tensor per ZeRO group / sub-group, one per parameter
under one process / DDP / FSDP2. The EMA costs what this rank's masters cost: 1/N of the fp32 model under ZeRO
(1/2/3: the masters are partitioned at every stage) and FSDP2 with N ranks, a whole fp32 copy under one process / DDP.

When: a global step post-hook on the inner optimizer, registered after the projection's, acting only on the firing
that completes an update (`Backend.completes_update`): after the projection, never on skipped (overflow) steps.

Why the EMA export is certified: the ball around the pretrained weights is convex and every update's weights lie in
it, so their EMA does too. For BatchNorm the constrained quantity is the effective scale d = w / sqrt(var + eps_ref)
with the live running variance, which is not linear in (w, var): the EMA of a constrained BN weight is kept as the
EMA of d (the slice of the EMA holds d), and applied as w = d_ema * sqrt(var_ema + eps_ref) with the EMA of the
running variance — so the exported effective scale is the EMA of in-ball scales (the same reasoning as WiSE-FT's,
docs/constraints.md). Floating buffers (BatchNorm running statistics) are averaged like timm does; they are
replicated and small, so every rank keeps a whole copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from mars_dist.sharding import register_after_step_hook
from mars_dist.sharding.base import Backend

FILE = "ema_rank{:05d}.pt"


def timm_decay(decay: float, warmup: bool, step: int) -> float:
    """timm ModelEmaV3.get_decay(step) with update_after_step 0, min_decay 0, warmup_gamma 1, warmup_power 2/3:
    `step` is the number of updates made, this one included (the first update copies the weights)."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.0
    return min(decay, 1 - (1 + step) ** (-2 / 3)) if warmup else decay


class WeightEma:
    """The EMA of this rank's fp32 masters of every trainable parameter (+ the model's floating buffers)."""

    def __init__(self, backend: Backend, module: torch.nn.Module, decay: float, warmup: bool = True):
        self.backend, self.decay, self.warmup = backend, decay, warmup
        self.layout = backend.master_layout()
        self.shadow = [m.detach().clone() for m in backend.master_tensors()]
        self.buffers = {n: b for n, b in _named_buffers(module).items() if b.is_floating_point()}
        self.shadow_buffers = {n: b.detach().float().clone() for n, b in self.buffers.items()}
        # constrained BatchNorm weights: (slice of the EMA, constraint, offset) — their EMA is of d (module doc)
        self.bn = []
        for c in backend.constraints:
            k, start, numel, offset = self.layout.get(c.name, (0, 0, 0, 0))
            if c.running_var is not None and numel:
                self.bn.append((k, start, numel, offset, c))
        self._to_scales(self.shadow)
        self.updates = 0
        self._handle = register_after_step_hook(backend.hook_optimizer(), self._after_step)

    # ---- the update --------------------------------------------------------------------------------------------
    def _to_scales(self, tensors: list[torch.Tensor]) -> None:
        for k, start, numel, offset, c in self.bn:
            part = tensors[k].narrow(0, start, numel)
            part.div_(c.bn_denominator(c.running_var, offset, numel).to(part.device))

    @torch.no_grad()
    def _after_step(self) -> None:
        if not self.backend.completes_update():
            return
        self.updates += 1
        weight = 1.0 - timm_decay(self.decay, self.warmup, self.updates)
        masters = self.backend.master_tensors()
        before = [self.shadow[k].narrow(0, start, numel).clone() for k, start, numel, _, _ in self.bn]
        torch._foreach_lerp_(self.shadow, masters, weight)  # one kernel over all flat tensors
        for old, (k, start, numel, offset, c) in zip(before, self.bn):  # BN: the EMA of d, not of w
            d = masters[k].narrow(0, start, numel) / c.bn_denominator(c.running_var, offset, numel).to(old.device)
            self.shadow[k].narrow(0, start, numel).copy_(old.lerp_(d, weight))
        for n, b in self.buffers.items():
            self.shadow_buffers[n].lerp_(b.detach().float(), weight)

    def bytes_per_rank(self) -> int:
        """What this rank holds for the EMA (the fp32 fragments and the buffers' copies)."""
        return sum(t.numel() * t.element_size() for t in [*self.shadow, *self.shadow_buffers.values()])

    # ---- evaluation and export ---------------------------------------------------------------------------------
    @contextmanager
    def applied(self):
        """The EMA in the masters (and the forward weights, the buffers) inside the block; the trained weights back,
        bit for bit, after it. On every rank (the forward-weight refresh of ZeRO-3 is a collective)."""
        scales = [self.shadow[k].narrow(0, start, numel).clone() for k, start, numel, _, _ in self.bn]
        self._swap()
        for d, (k, start, numel, offset, c) in zip(scales, self.bn):  # w = d_ema * sqrt(var_ema + eps_ref)
            part = self.backend.master_tensors()[k].narrow(0, start, numel)
            part.copy_(d.to(part.device) * c.bn_denominator(c.running_var, offset, numel).to(part.device))
        self.backend.sync_forward_weights()
        try:
            yield self
        finally:
            self._swap()
            for d, (k, start, numel, _, _) in zip(scales, self.bn):
                self.shadow[k].narrow(0, start, numel).copy_(d)
            self.backend.sync_forward_weights()

    @torch.no_grad()
    def _swap(self) -> None:
        for m, s in zip(self.backend.master_tensors(), self.shadow):
            held = m.clone()
            m.copy_(s)
            s.copy_(held)
        for n, b in self.buffers.items():
            held = b.detach().float().clone()
            b.copy_(self.shadow_buffers[n])
            self.shadow_buffers[n].copy_(held)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """This rank's EMA into `directory` (every rank writes its own file)."""
        state = {"layout": self.layout, "world_size": self.backend.world_size, "backend": self.backend.name,
                 "updates": self.updates, "decay": self.decay, "shadow": self.shadow,
                 "buffers": self.shadow_buffers}
        torch.save(state, Path(directory) / FILE.format(_rank()))

    @torch.no_grad()
    def load(self, directory: Path, say=print) -> None:
        """The EMA saved in a checkpoint: this rank's own file when the layout is the same (bit for bit), else
        re-cut from every rank's file by (offset, numel) in each parameter (another world size or backend)."""
        directory = Path(directory)
        files = sorted(directory.glob(FILE.replace("{:05d}", "*")))
        if not files:
            self.shadow = [m.detach().clone() for m in self.backend.master_tensors()]
            self._to_scales(self.shadow)
            self.shadow_buffers = {n: b.detach().float().clone() for n, b in self.buffers.items()}
            say(f"ema: checkpoint {directory} holds no EMA (made without it); the EMA starts from the resumed weights")
            return
        own = directory / FILE.format(_rank())
        state = torch.load(own if own.is_file() else files[0], map_location="cpu", weights_only=True)
        self.updates = int(state["updates"])
        for n, b in self.shadow_buffers.items():
            if n not in state["buffers"]:
                raise KeyError(f"ema: checkpoint {directory} has no EMA of buffer {n!r} (another model?)")
            b.copy_(state["buffers"][n])
        if own.is_file() and state["layout"] == self.layout and [tuple(t.shape) for t in state["shadow"]] == \
                [tuple(t.shape) for t in self.shadow]:
            for mine, saved in zip(self.shadow, state["shadow"]):
                mine.copy_(saved)
            return
        self._recut(files, directory)
        say(f"ema: re-cut from {len(files)} rank file(s) saved under {state['backend']} x{state['world_size']}")

    def _recut(self, files: list[Path], directory: Path) -> None:
        covered = {n: 0 for n in self.layout}
        for path in files:  # one rank's file at a time: at most one saved fragment set in memory
            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, (k0, s0, n0, o0) in state["layout"].items():
                if name not in self.layout or not n0:
                    continue
                k, s, n, o = self.layout[name]
                lo, hi = max(o, o0), min(o + n, o0 + n0)
                if lo < hi:
                    piece = state["shadow"][k0].narrow(0, s0 + lo - o0, hi - lo)
                    self.shadow[k].narrow(0, s + lo - o, hi - lo).copy_(piece)
                    covered[name] += hi - lo
        short = [n for n, (_, _, numel, _) in self.layout.items() if covered[n] < numel]
        if short:
            raise ValueError(f"ema: the EMA files in {directory} do not cover this rank's fragments of {short[:3]} "
                             f"(another model, or a rank's file is missing)")

    def remove(self) -> None:
        self._handle.remove()


def _named_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, b in module.named_buffers():
        for part in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
            name = name.replace(part, "")
        out[name.removeprefix("module.")] = b
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_ema(cfg, constrained, say=print) -> WeightEma | None:
    """The run's EMA (`cfg.ema`), or None when ema.decay is null. Call right after attach (the masters hold the
    pretrained weights: the EMA starts there)."""
    if cfg.ema.decay is None:
        return None
    ema = constrained.ema(cfg.ema.decay, cfg.ema.warmup)  # the API's path: one way to build it
    say(f"ema: decay {cfg.ema.decay}{' with warm-up' if cfg.ema.warmup else ''} on this rank's fp32 master "
        f"fragments: {ema.bytes_per_rank() / 2**20:.2f} MiB per rank")
    return ema


__all__ = ["FILE", "WeightEma", "build_ema", "timm_decay"]
