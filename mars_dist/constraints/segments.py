"""How one packed chunk is visited per update: in place where its rows are contiguous in memory, gathered otherwise.

A chunk (constraints/packed.py) is a list of blocks of whole rows of length L, in the order its anchors are stored.
Under ZeRO and FSDP2 the fp32 masters are views of flat buffers, so consecutive blocks are often adjacent in memory:
a run of them is one (rows, L) matrix that the kernels (constraints/kernels.py) read, and rescale, where it lies —
no copy into a scratch and back. Runs too small to be worth a kernel call of their own (one tensor per parameter,
e.g. one process or DDP with many small layers) are gathered with `cat` into a scratch of at most GATHER_ELEMS
elements (small enough to stay in the L2 cache on a CPU) and written back with one `_foreach_copy_`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mars_dist.constraints.packed import _Chunk

INPLACE_MIN = 1 << 16    # elements: a run at least this large is processed where it lies
GATHER_ELEMS = 1 << 18   # elements: gathered runs are flushed to the kernels in batches of at most this


@dataclass
class Segment:
    start: int                       # first row of the segment within the chunk
    stop: int
    view: torch.Tensor | None        # (rows, L) view of the master memory, or None: gathered
    blocks: list[torch.Tensor]       # gathered: the blocks' (rows, L) views, in chunk order
    # set by BoundViews.all_segments, once per layout and memory (a view op costs ~1 us; Lite0 has ~30 segments
    # and the per-update work on its small tensors is only a few hundred us):
    anchor: torch.Tensor | None = None   # the chunk's anchor rows of this segment
    rows: slice | None = None            # this segment's rows in `block_rows` order
    sizes: list[int] | None = None       # gathered: the blocks' row counts (to split the scratch back)


def _adjacent(prev: torch.Tensor, nxt: torch.Tensor) -> bool:
    return (prev.device == nxt.device and prev.dtype == nxt.dtype == torch.float32
            and prev.untyped_storage().data_ptr() == nxt.untyped_storage().data_ptr()
            and nxt.storage_offset() == prev.storage_offset() + prev.numel())


def _runs(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[first, last) indices of maximal runs of views that follow each other in one fp32 storage."""
    runs, first = [], 0
    for k in range(1, len(views) + 1):
        if k == len(views) or not _adjacent(views[k - 1], views[k]):
            runs.append((first, k))
            first = k
    return runs


def plan(views: list[torch.Tensor], length: int) -> list[Segment]:
    """Segments covering the chunk's rows in order (`views`: its blocks' contiguous (rows, L) views)."""
    out: list[Segment] = []
    pending: list[torch.Tensor] = []
    row, pending_start = 0, 0

    def flush():
        nonlocal pending
        if pending:
            out.append(Segment(pending_start, row, None, pending))
            pending = []

    for first, last in _runs(views):
        run = views[first:last]
        rows = sum(v.shape[0] for v in run)
        if rows * length >= INPLACE_MIN and run[0].dtype == torch.float32 and run[0].is_contiguous():
            flush()
            head = run[0]
            view = head if len(run) == 1 else head.as_strided((rows, length), (length, 1), head.storage_offset())
            out.append(Segment(row, row + rows, view, []))
            row += rows
            continue
        for v in run:
            if pending and (row - pending_start + v.shape[0]) * length > GATHER_ELEMS:
                flush()
            if not pending:
                pending_start = row
            pending.append(v)
            row += v.shape[0]
    flush()
    return out


def gathered(seg: Segment, scratch, length: int) -> torch.Tensor:
    """The segment's rows copied into `scratch(numel)` (a tensor of at least numel elements) as a (rows, L)
    matrix."""
    rows = seg.stop - seg.start
    return torch.cat(seg.blocks, out=scratch(rows * length)[:rows * length].view(rows, length))


class BoundViews:
    """Packed's per-update plumbing (mixed into constraints/packed.Packed, which provides `chunks`, `device`):
    the fragments bound for this update, their cached (rows, L) views and segments, and the scratch buffers."""

    def bind(self, tensors: list[torch.Tensor]) -> None:
        """Fix the tensors (one flat fp32 view per fragment) that the next chunk_views / segments calls use. Views
        are cached while the fragments are the same memory: building thousands of views per update costs more than
        the arithmetic on small models. The same tensor objects as last time are the same memory (fragments are
        views; nothing here re-points a view with `set_`); otherwise an equal data_ptr is (a cached view keeps its
        storage alive)."""
        last = getattr(self, "_bound", None)
        if last is not None and len(last) == len(tensors) and all(map(operator.is_, last, tensors)):
            return
        key = tuple(map(torch.Tensor.data_ptr, tensors))
        cache = self.__dict__.setdefault("_views", {})
        if cache.get("key") != key:
            cache.clear()
            cache["key"] = key
        self._bound = tuple(tensors)

    def chunk_views(self, ch: _Chunk, tensors: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """(rows, L) views of the chunk's blocks: of `tensors` (not cached), or of the bound fragments."""
        if tensors is not None:
            return [tensors[i][s:s + rows * ch.length].view(rows, ch.length) for i, s, rows in ch.blocks]
        cache = self._views
        views = cache.get(id(ch))
        if views is None:
            views = cache[id(ch)] = self.chunk_views(ch, self._bound)
        return views

    def segments(self, ch: _Chunk) -> list[Segment]:
        """The chunk's segments over the bound fragments: in-place runs and gathered batches (cached with the
        views)."""
        key = ("segments", id(ch))
        hit = self._views.get(key)
        if hit is None:
            hit = self._views[key] = plan(self.chunk_views(ch), ch.length)
        return hit

    def all_segments(self) -> tuple[list[tuple[_Chunk, Segment]], torch.Tensor]:
        """Every (chunk, segment) in `block_rows` order, and the segments' row counts (cached with the views)."""
        hit = self._views.get("all")
        if hit is None:
            pairs = [(ch, sg) for ch in self.chunks for sg in self.segments(ch)]
            for ch, sg in pairs:
                sg.anchor, sg.rows = ch.anchor[sg.start:sg.stop], slice(ch.base + sg.start, ch.base + sg.stop)
                sg.sizes = [b.shape[0] for b in sg.blocks]
            lengths = torch.tensor([sg.stop - sg.start for _, sg in pairs], dtype=torch.long, device=self.device)
            hit = self._views["all"] = (pairs, lengths)
        return hit

    def gather_scratch(self, numel: int) -> torch.Tensor:
        """At least `numel` elements of scratch for gathered segments (normally GATHER_ELEMS: stays in cache; more
        only for a large block that cannot be visited in place, e.g. not fp32)."""
        if getattr(self, "_gather", None) is None or self._gather.numel() < numel:
            self._gather = torch.empty(max(numel, GATHER_ELEMS), device=self.device)
        return self._gather

    def scratch_blocks(self, ch: _Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The chunk's (rows, L) matrix in the shared scratch, and its split into the blocks (cached)."""
        scratch = self.scratch()
        cache = self.__dict__.setdefault("_scratch_views", {})
        hit = cache.get(id(ch))
        if hit is None or hit[0].data_ptr() != scratch.data_ptr():
            m = scratch[:ch.anchor.numel()].view_as(ch.anchor)
            hit = cache[id(ch)] = (m, list(m.split([b[2] for b in ch.blocks])))
        return hit

    def chunk_deviation(self, ch: _Chunk) -> torch.Tensor:
        """D = W - W0 of the chunk (bound fragments) as a (rows, L) matrix in the scratch."""
        out, _ = self.scratch_blocks(ch)
        torch.cat(self.chunk_views(ch), out=out)
        return out.sub_(ch.anchor)

    def scratch(self) -> torch.Tensor:
        size = max((ch.anchor.numel() for ch in self.chunks), default=0)
        if getattr(self, "_scratch", None) is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, device=self.device)
        return self._scratch

