"""The two memory-bound passes of the projection, each ONE pass over the weights.

- `row_l1(w, w0)`: per row sum |w - w0| of a (rows, L) matrix: reads W and W0 once (8 bytes per element). Eager torch
  needs three passes and a temporary (sub, abs, sum); `torch.compile` fuses them into one vectorised reduction
  (inductor: C++ on the CPU, Triton on a GPU). Both sizes are marked unbacked, so ONE graph serves every
  (rows, L) — no recompilation per chunk, per update, or for sizes 0 and 1.
- `rescale_(w, w0, s)`: w <- lerp(w0, w, s[row]) in place: reads W and W0 and writes W once (12 bytes). Eager already
  does this in one pass (`out=` aliasing the input is allowed for elementwise ops), so it is never compiled. torch's
  lerp returns w bit-exactly where s = 1 and computes 1 - s exactly where s >= 0.5 (engine.rescale_rows).

When to compile (`MARS_DIST_COMPILE`): `1` always, `0` never, `auto` (the default) when one rank's constrained
fragments hold at least AUTO_MIN_ELEMENTS: compiling costs ~2 s per process with inductor's on-disk cache warm and
~15 s cold on one CPU core, which only pays back on models where the projection itself is large (the fused pass saves
~1 ns per element and update on one CPU core). Short runs on small models (the test suite) therefore stay eager.
Any failure to compile or to run the compiled kernel falls back to eager for the rest of the process, with a
warning.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

AUTO_MIN_ELEMENTS = 8_000_000
BLOCK_ELEMS = 1 << 18    # elements per block of an eager row sum over master memory (1 MiB: stays in L2)
COMPILED_MIN = 1 << 15  # elements: below this a compiled call (~30 us through dynamo) costs more than it saves
ENV = "MARS_DIST_COMPILE"

_state = {"fn": None, "failed": False, "compile_s": 0.0}


def compile_wanted(numel: int) -> bool:
    """Whether the fused row-sum kernel should be compiled for fragments holding `numel` elements."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        return True
    if mode != "auto":
        raise ValueError(f"{ENV}={mode!r}: use 1, 0 or auto")
    return numel >= AUTO_MIN_ELEMENTS


def compile_seconds() -> float:
    """Seconds spent compiling (the first call of the compiled kernel) in this process so far."""
    return _state["compile_s"]


def _row_l1_eager(w: torch.Tensor, w0: torch.Tensor, out: torch.Tensor | None = None,
                  scratch: bool = False, work=None) -> torch.Tensor:
    # in-place abs + row sum: ~2e-7 relative error (vector_norm(ord=1): 1e-6, slower); a scratch `w` (a gathered
    # copy) takes the deviation itself: no temporary, whose fresh pages cost as much as the arithmetic
    if scratch or work is None or out is None:
        d = w.sub_(w0) if scratch else w - w0
        d = d.abs_()
        return torch.sum(d, 1, out=out) if out is not None else d.sum(1)
    # `w` is the master memory itself: the deviation goes through a small reused buffer, a block of rows at a time
    # (`work(n)`: at least n elements, sized to stay in cache), instead of a temporary the size of `w`
    rows, length = w.shape
    step = max(1, BLOCK_ELEMS // max(length, 1))
    for r in range(0, rows, step):
        stop = min(rows, r + step)
        d = work((stop - r) * length)[:(stop - r) * length].view(stop - r, length)
        torch.sub(w[r:stop], w0[r:stop], out=d).abs_()
        torch.sum(d, 1, out=out[r:stop])
    return out


def _row_l1_math(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    return (w - w0).abs().sum(1)


def _compiled():
    if _state["fn"] is None:
        _state["fn"] = torch.compile(_row_l1_math, dynamic=False, fullgraph=True)
    return _state["fn"]


def row_l1(w: torch.Tensor, w0: torch.Tensor, compiled: bool, out: torch.Tensor | None = None,
           scratch: bool = False, work=None) -> torch.Tensor:
    """Per row sum |w - w0| (float32) of two (rows, L) matrices, into `out` if given. `scratch`: `w` is a copy the
    caller no longer needs (the eager path then overwrites it instead of allocating a temporary). `work(n)`: a
    reusable buffer of at least n elements for the eager path's deviation (with `out`)."""
    if not compiled or _state["failed"] or w.numel() < COMPILED_MIN:
        return _row_l1_eager(w, w0, out, scratch, work)
    from torch._dynamo.decorators import mark_unbacked

    first = _state["fn"] is None
    t0 = time.perf_counter()
    try:
        for t in (w, w0):
            mark_unbacked(t, 0)
            mark_unbacked(t, 1)
        got = _compiled()(w, w0)
    except Exception as e:  # noqa: BLE001 - any compiler / toolchain failure: the eager path computes the same
        _state["failed"] = True
        log.warning("torch.compile of the projection's row-sum kernel failed (%s: %s); using eager torch",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return _row_l1_eager(w, w0, out, scratch, work)
    if first:
        _state["compile_s"] += time.perf_counter() - t0
    return out.copy_(got) if out is not None else got


def rescale_(w: torch.Tensor, w0: torch.Tensor, scale: torch.Tensor) -> None:
    """In place, one pass: w <- lerp(w0, w, scale) with `scale` (rows, 1)."""
    torch.lerp(w0, w, scale, out=w)
