"""Row arithmetic on a flat FRAGMENT of a parameter.

A fragment is a contiguous 1-D slice `flat[offset : offset + n]` of a parameter flattened in row-major order, where
a "row" is one output unit (dim 0) of `row_len` elements. Sharded optimizers (ZeRO-1/2/3) cut parameters at arbitrary
points, so a fragment may start or end in the middle of a row: it is processed as an optional partial leading row,
a block of whole rows, and an optional partial trailing row. A whole tensor is the case offset=0, n=numel.

Pure torch: nothing here knows about processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def row_segments(offset: int, n: int, row_len: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (start, stop, first_row, rows) covering the fragment [offset, offset+n).

    A segment is either part of one row (rows=1, stop-start < row_len possible) or a block of whole rows.
    """
    row = offset // row_len
    start = 0
    lead = min(n, (-offset) % row_len)
    if lead:
        yield 0, lead, row, 1
        start, row = lead, row + 1
    full = (n - start) // row_len
    if full:
        yield start, start + full * row_len, row, full
        start, row = start + full * row_len, row + full
    if start < n:
        yield start, n, row, 1


def row_sums(values: torch.Tensor, offset: int, row_len: int, num_rows: int) -> torch.Tensor:
    """Partial row sums of a flat fragment: a length-`num_rows` vector, zero for rows the fragment misses.

    Summing these vectors over all fragments of a parameter (one all-reduce) gives the full row sums. Sums are
    accumulated in float64 so that the result hardly depends on where the fragments were cut.
    """
    out = torch.zeros(num_rows, dtype=torch.float64, device=values.device)
    for start, stop, row, rows in row_segments(offset, values.numel(), row_len):
        seg = values[start:stop]
        if rows == 1:
            out[row] += seg.sum(dtype=torch.float64)
        else:
            out[row:row + rows] += seg.view(rows, row_len).sum(dim=1, dtype=torch.float64)
    return out


def rescale_rows_(w: torch.Tensor, w0: torch.Tensor | None, offset: int, row_len: int,
                  scales: torch.Tensor) -> None:
    """In place: w <- w0 + (w - w0) * scales[row] on the rows of this fragment whose scale is < 1.

    Rows with scale 1 are not touched at all, so the projection is bit-exactly a no-op inside the ball
    (w0 + (w - w0) would round differently). `w0=None` means the anchor is zero.
    """
    for start, stop, row, rows in row_segments(offset, w.numel(), row_len):
        s = scales[row:row + rows]
        clipped = torch.nonzero(s < 1).flatten()
        if clipped.numel() == 0:
            continue
        width = (stop - start) // rows
        seg = w[start:stop].view(rows, width)
        factor = s[clipped].unsqueeze(1).to(w.dtype)
        if w0 is None:
            seg[clipped] = seg[clipped] * factor
        else:
            anchor = w0[start:stop].view(rows, width)[clipped]
            seg[clipped] = anchor + (seg[clipped] - anchor) * factor


def row_values(per_row: torch.Tensor, offset: int, n: int, row_len: int) -> torch.Tensor:
    """Expand a per-row vector to the elements of a fragment (used for penalty gradients)."""
    out = per_row.new_empty(n)
    for start, stop, row, rows in row_segments(offset, n, row_len):
        out[start:stop] = per_row[row:row + rows].repeat_interleave((stop - start) // rows)
    return out


# Rows whose norm exceeds the radius by less than this (relative) count as inside: after a rescale, fp32 rounding
# of the scaled elements leaves the row sum within ~1e-7 of the radius, and the packed engine (constraints/packed.py)
# sums rows in float32 (relative error up to ~2e-6 measured on rows of 768-1152 elements); re-scaling such rows
# again and again would make the projection drift instead of being idempotent. The tests check the bound to 5e-5.
RELATIVE_TOLERANCE = 1e-5


def radial_scales(norms: torch.Tensor, radius: float | torch.Tensor,
                  threshold: float | torch.Tensor | None = None) -> torch.Tensor:
    """min(1, radius / norm) per entry (`radius` a number or one per entry); exactly 1 where
    norm <= radius * (1 + RELATIVE_TOLERANCE) (`threshold`: that product, when the caller keeps it)."""
    over = norms > (radius * (1 + RELATIVE_TOLERANCE) if threshold is None else threshold)
    return torch.where(over, radius / norms, 1.0)  # radius / 0 (inf) is never selected: over is False there
