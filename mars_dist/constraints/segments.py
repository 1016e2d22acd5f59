"""How one packed chunk is visited per update: in place where its rows are contiguous in memory, gathered otherwise.

A chunk (constraints/packed.py) is a list of blocks of whole rows of length L, in the order its anchors are stored.
Under ZeRO and FSDP2 the fp32 masters are views of flat buffers, so consecutive blocks are often adjacent in memory:
a run of them is one (rows, L) matrix that the kernels (constraints/kernels.py) read, and rescale, where it lies —
no copy into a scratch and back. Runs too small to be worth a kernel call of their own (one tensor per parameter,
e.g. one process or DDP with many small layers) are gathered with `cat` into a scratch of at most GATHER_ELEMS
elements (small enough to stay in the L2 cache on a CPU) and written back with one `_foreach_copy_`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INPLACE_MIN = 1 << 16    # elements: a run at least this large is processed where it lies
GATHER_ELEMS = 1 << 18   # elements: gathered runs are flushed to the kernels in batches of at most this


@dataclass
class Segment:
    start: int                       # first row of the segment within the chunk
    stop: int
    view: torch.Tensor | None        # (rows, L) view of the master memory, or None: gathered
    blocks: list[torch.Tensor]       # gathered: the blocks' (rows, L) views, in chunk order


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
