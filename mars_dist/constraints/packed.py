"""The constraint math on ALL of a rank's fragments at once: a layout computed once, a handful of tensor ops per update.

A rank holds fragments (flat fp32 views) of many parameters. Looping over them costs per tensor — Python, and on a
GPU a kernel launch — so the layout sorts every fragment once into:
- row blocks: runs of whole rows, bucketed by row length L and packed into chunks of at most `chunk_elems`
  elements, in memory order, with the chunk's anchor matrix stored here in the same order. Per update a chunk is
  visited in segments (constraints/segments.py): runs of blocks adjacent in one flat buffer as (rows, L) views of
  the master itself, small blocks gathered into a cached scratch; two one-pass kernels each (constraints/kernels.py).
- pieces: the partial rows where a sharded optimizer cut a row (at most two per fragment), summed with one
  `segment_reduce`;
- diagonal elements (BatchNorm effective scales, LayerNorm, embeddings), clipped elementwise on one concatenation.
Row values land in one vector over the GLOBAL rows of all row constraints; that vector (plus the BatchNorm running
variances when they can differ across ranks) is the one buffer the caller reduces across ranks. So the number of
ops per update depends on the number of chunks and row lengths, not on the number of tensors.

Row sums are float32 (in-place abs + row sum: ~2e-7 relative error); the bound is checked to the relative tolerance
the tests use (5e-5) on every backend. Rows inside their ball are bit-exact no-ops: the rescale is `lerp(W0, W, s)`,
which returns W exactly when s = 1 (engine.rescale_rows).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from mars_dist.constraints.fragments import row_segments
from mars_dist.constraints.kernels import compile_wanted
from mars_dist.constraints.segments import BoundViews

CHUNK_ELEMS = 1 << 22  # 16 MB of fp32 scratch per chunk


_RADIUS = operator.attrgetter("radius")


def _radius(c) -> float:
    return c.radius if c.action == "project" and c.radius is not None else math.inf


def _anchor_of(f) -> torch.Tensor:
    """The fragment's anchor, flat; zeros for the head (anchored at zero). A centred constraint without one is a
    caller error: a backend's fragments carry no anchors (they live in its `packing`), pass that layout instead."""
    if f.anchor is not None:
        return f.anchor.reshape(-1)
    if f.constraint.centered:
        raise ValueError(f"fragment of {f.constraint.name!r} has no anchor: pass the backend's `packing` (the "
                         f"layout that holds the anchors) to project / measure / add_penalty_grads")
    return torch.zeros_like(f.w)


def _address(w: torch.Tensor, start: int) -> tuple[int, int]:
    return w.untyped_storage().data_ptr(), w.storage_offset() + start


@dataclass
class _Chunk:
    length: int                          # row length L
    blocks: list[tuple[int, int, int]]   # (fragment, first element, rows)
    rows: torch.Tensor                   # global row index of each row (int64)
    anchor: torch.Tensor                 # (rows, L)
    base: int = 0                        # first row of this chunk in `Packed.block_rows`


class Packed(BoundViews):
    """Layout of a list of fragments (one per constraint and rank; the same constraint may appear more than once
    only when the caller simulates several ranks). `fragments[i].anchor` is read once here and stored packed."""

    def __init__(self, fragments, chunk_elems: int = CHUNK_ELEMS, average_running_vars: bool = True):
        self.n = len(fragments)
        self.device = next((f.w.device for f in fragments), torch.device("cpu"))
        self.average_running_vars = average_running_vars
        self.offsets = [f.offset for f in fragments]
        self.numels = [f.w.numel() for f in fragments]
        self.cons = []
        con_index: dict[int, int] = {}
        for f in fragments:
            if id(f.constraint) not in con_index:
                con_index[id(f.constraint)] = len(self.cons)
                self.cons.append(f.constraint)
        self.con_of = [con_index[id(f.constraint)] for f in fragments]
        self._layout_rows(fragments, chunk_elems)
        self._layout_diag(fragments)
        self.compiled = compile_wanted(sum(ch.anchor.numel() for ch in self.chunks))
        """Whether the row sums use the compiled one-pass kernel (constraints/kernels.py; decided once here)."""

    # ---- layout (once) ----------------------------------------------------------------------------------------
    def _layout_rows(self, fragments, chunk_elems: int) -> None:
        base, total, per_con = {}, 0, []
        for k, c in enumerate(self.cons):
            if c.kind == "rows":
                base[k], total = total, total + c.num_rows
                per_con.append(k)
        self.row_cons = per_con
        self.num_rows = total
        dev = self.device
        self.row_lengths = torch.tensor([self.cons[k].num_rows for k in per_con], dtype=torch.long, device=dev)
        self.row_con = torch.repeat_interleave(torch.arange(len(per_con), device=dev), self.row_lengths) \
            if per_con else torch.zeros(0, dtype=torch.long, device=dev)
        blocks: dict[int, list] = {}
        pieces, piece_rows, piece_anchor = [], [], []
        for i, f in enumerate(fragments):
            c, k = f.constraint, self.con_of[i]
            if c.kind != "rows" or not f.w.numel():
                continue
            a = _anchor_of(f)
            for start, stop, row, rows in row_segments(f.offset, f.w.numel(), c.row_len):
                if stop - start == rows * c.row_len:
                    blocks.setdefault(c.row_len, []).append((i, start, rows, base[k] + row, a))
                else:
                    pieces.append((i, start, stop))
                    piece_rows.append(base[k] + row)
                    piece_anchor.append(a[start:stop])
        self.chunks = []
        for length, items in sorted(blocks.items()):
            # in memory order: blocks that are adjacent in one flat buffer (ZeRO, FSDP2) end up in one chunk, in
            # order, so that they are visited in place as one matrix (constraints/segments.py)
            items.sort(key=lambda it: _address(fragments[it[0]].w, it[1]))
            per = max(1, chunk_elems // length)
            cur, cur_rows, cur_anchor, filled = [], [], [], 0
            for i, start, rows, row0, a in items:
                done = 0
                while done < rows:
                    take = min(rows - done, per - filled)
                    s = start + done * length
                    cur.append((i, s, take))
                    cur_rows.append(torch.arange(row0 + done, row0 + done + take))
                    cur_anchor.append(a[s:s + take * length].view(take, length))
                    done, filled = done + take, filled + take
                    if filled == per:
                        self._add_chunk(length, cur, cur_rows, cur_anchor)
                        cur, cur_rows, cur_anchor, filled = [], [], [], 0
            if cur:
                self._add_chunk(length, cur, cur_rows, cur_anchor)
        at = 0
        for ch in self.chunks:
            ch.base, at = at, at + ch.rows.numel()
        self.block_rows = torch.cat([ch.rows for ch in self.chunks]) if self.chunks else \
            torch.zeros(0, dtype=torch.long, device=dev)
        """The global row of every row of every chunk, chunk after chunk (each row once per rank)."""
        self.rows_in_order = self.block_rows.numel() == total and bool(
            torch.equal(self.block_rows, torch.arange(total, device=dev)))
        """Whether block order IS the global row order (e.g. ZeRO-3 layers of one row length in parameter order):
        then the per-update scatter of row sums into global order and the gather of scales back are skipped."""
        self.pieces = pieces
        self.piece_rows = torch.tensor(piece_rows, dtype=torch.long, device=dev)
        self.piece_lengths = torch.tensor([b - a for _, a, b in pieces], dtype=torch.long, device=dev)
        self.piece_anchor = torch.cat(piece_anchor).to(dev, torch.float32) if pieces else \
            torch.zeros(0, device=dev)
        self.piece_elem_row = torch.repeat_interleave(self.piece_rows, self.piece_lengths)

    def _add_chunk(self, length, blocks, rows, anchors) -> None:
        self.chunks.append(_Chunk(length, list(blocks), torch.cat(rows).to(self.device),
                                  torch.cat(anchors).to(self.device, torch.float32).contiguous()))

    def _layout_diag(self, fragments) -> None:
        dev = self.device
        self.diag = [i for i, f in enumerate(fragments) if f.constraint.kind == "diag" and f.w.numel()]
        base, total = {}, 0
        for k, c in enumerate(self.cons):
            if c.kind == "diag":
                base[k], total = total, total + c.numel
        self.diag_total = total
        self.diag_cons = [k for k in range(len(self.cons)) if self.cons[k].kind == "diag"]
        self.diag_lengths = torch.tensor([self.cons[k].numel for k in self.diag_cons], dtype=torch.long, device=dev)
        idx, anchor, con = [], [], []
        for i in self.diag:
            f, k = fragments[i], self.con_of[i]
            n = f.w.numel()
            idx.append(torch.arange(base[k] + f.offset, base[k] + f.offset + n))
            anchor.append(_anchor_of(f).float())
            con.append(torch.full((n,), self.diag_cons.index(k)))
        cat = lambda xs, dt: torch.cat(xs).to(dev, dt) if xs else torch.zeros(0, dtype=dt, device=dev)  # noqa
        self.diag_index, self.diag_anchor = cat(idx, torch.long), cat(anchor, torch.float32)
        self.diag_con = cat(con, torch.long)
        self.bn_vars = []  # distinct live running-variance buffers (averaged across ranks when they can differ)
        for c in self.cons:
            if c.role == "bn" and c.running_var is not None and all(v is not c.running_var for v in self.bn_vars):
                self.bn_vars.append(c.running_var)

    # ---- anchors (checkpoints, checksums) -----------------------------------------------------------------
    def anchor(self, i: int) -> torch.Tensor | None:
        """Fragment i's anchor as one flat tensor (a copy), None for the head (anchored at zero)."""
        c = self.cons[self.con_of[i]]
        if not c.centered:
            return None
        return self.read_fragment(i)

    def set_anchor(self, i: int, value: torch.Tensor) -> None:
        """Overwrite fragment i's stored anchor (restoring a checkpoint under the same layout)."""
        self.write_fragment(i, value)
        self._diag_bounds = None  # derived from the anchors and cached by engine.clip_diag: recomputed at its next call

    def stores(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The packed anchor storage: per-chunk (rows, L) matrices, the pieces, the diagonal elements. A buffer of
        the same structure (e.g. the learned radii's direction) is read / written with read_fragment /
        write_fragment by passing its own stores."""
        return [ch.anchor for ch in self.chunks], self.piece_anchor, self.diag_anchor

    def read_fragment(self, i: int, stores=None) -> torch.Tensor:
        """Fragment i's values in packed `stores` (default: the anchors) as one flat tensor (a copy)."""
        out = torch.zeros(self.numels[i], device=self.device)
        self._parts(i, lambda part, packed: part.copy_(packed.reshape(-1)), out, stores or self.stores())
        return out

    def write_fragment(self, i: int, value: torch.Tensor, stores=None) -> None:
        value = value.reshape(-1).to(self.device, torch.float32)
        self._parts(i, lambda part, packed: packed.copy_(part.view_as(packed)), value, stores or self.stores())

    def _parts(self, i: int, fn, flat: torch.Tensor, stores) -> None:
        chunk_stores, piece_store, diag_store = stores
        for ch, store in zip(self.chunks, chunk_stores):
            at = 0
            for j, s, rows in ch.blocks:
                if j == i:
                    fn(flat[s:s + rows * ch.length], store[at:at + rows])
                at += rows
        at = 0
        for j, s, e in self.pieces:
            if j == i:
                fn(flat[s:e], piece_store[at:at + e - s])
            at += e - s
        at = 0
        for j in self.diag:
            n = self.numels[j]
            if j == i:
                fn(flat, diag_store[at:at + n])
            at += n

    # ---- per-update building blocks (views, segments, scratch: segments.BoundViews) --------------------------
    def piece_views(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[i][s:e] for i, s, e in self.pieces]

    def piece_deviation(self, ws: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(self.piece_views(ws)) - self.piece_anchor if self.pieces else self.piece_anchor

    def piece_sums(self, values: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(values, "sum", lengths=self.piece_lengths) if self.pieces else values

    def diag_values(self, ws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, d = W / denominator, denominator) of all diagonal elements; denominator 1 except for BatchNorm."""
        if not self.diag:
            z = torch.zeros(0, device=self.device)
            return z, z, z
        w = torch.cat([ws[i] for i in self.diag])
        if getattr(self, "_diag_eps", None) is None:  # per element: the BN eps, 0 elsewhere (denominator 1)
            self._diag_eps = torch.cat([torch.full((self.numels[i],), self.cons[self.con_of[i]].bn_eps
                                                   if self.cons[self.con_of[i]].role == "bn" else 0.0)
                                        for i in self.diag]).to(self.device)
            self._diag_ones = torch.ones(max(self.numels[i] for i in self.diag), device=self.device)
        denom = torch.cat(self._diag_denominator_parts()).add_(self._diag_eps).sqrt_()
        return w, w / denom, denom

    def _diag_denominator_parts(self) -> list[torch.Tensor]:
        """Per diagonal fragment: its slice of the live BatchNorm running variance (they change during training:
        read at every call, through views cached once where they are views), ones elsewhere."""
        key = tuple(v.data_ptr() for v in self.bn_vars)
        hit = getattr(self, "_diag_parts", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        parts, live = [], True
        for i in self.diag:
            c, n = self.cons[self.con_of[i]], self.numels[i]
            if c.role == "bn":
                v = c.running_var.detach().reshape(-1)[self.offsets[i]:self.offsets[i] + n]
                live &= v.dtype == torch.float32 and v.device == self.device  # else .to() copies: not cacheable
                parts.append(v.to(self.device, torch.float32))
            else:
                parts.append(self._diag_ones[:n])
        if live:
            self._diag_parts = (key, parts)
        return parts

    def running_vars(self) -> torch.Tensor:
        if not (self.average_running_vars and self.bn_vars):
            return torch.zeros(0, device=self.device)
        return torch.cat([v.detach().reshape(-1).to(self.device, torch.float32) for v in self.bn_vars])

    def write_running_vars(self, averaged: torch.Tensor) -> None:
        if not (self.average_running_vars and self.bn_vars):
            return
        with torch.no_grad():
            for v, mean in zip(self.bn_vars, torch.split(averaged, [v.numel() for v in self.bn_vars])):
                v.copy_(mean.view_as(v).to(v.dtype))

    def _radii(self, cons: list[int], index: torch.Tensor) -> torch.Tensor:
        # read at every call: radii may change during training (a caller's schedule, learned radii); the tensor is
        # rebuilt only when one changed (one C-level pass and a list compare per call; a constraint's action is
        # fixed when it is selected: the hook registers its pre / post step hooks from it)
        cache = self.__dict__.setdefault("_radii_cache", {})
        key = (id(cons), id(index))
        hit = cache.get(key)
        objs = hit[0] if hit is not None else [self.cons[k] for k in cons]
        radii = list(map(_RADIUS, objs))
        if hit is None or hit[1] != radii:
            r = [_radius(c) for c in objs]
            t = torch.tensor(r, device=self.device)[index] if r else torch.zeros(0, device=self.device)
            hit = cache[key] = (objs, radii, t)
        return hit[2]

    def row_selection(self, action: str) -> tuple[bool, bool]:
        """Whether any row constraint with this action and a radius (project) / non-zero weight (penalty) set is
        MARS, and whether any is L2. Cached for projections while no radius is None (the common case)."""
        objs = [self.cons[k] for k in self.row_cons] if getattr(self, "_row_objs", None) is None else self._row_objs
        self._row_objs = objs
        cache = self.__dict__.setdefault("_selection", {})
        fixed = action == "project" and None not in map(_RADIUS, objs)
        if fixed and action in cache:
            return cache[action]
        on = [c.action == action and (c.radius is not None if action == "project" else c.weight != 0) for c in objs]
        l2 = [c.norm == "l2" for c in objs]
        hit = (any(o and not x for o, x in zip(on, l2)), any(o and x for o, x in zip(on, l2)))
        if fixed:
            cache[action] = hit
        return hit

    def row_radius(self) -> torch.Tensor:
        """Per global row: the radius of a projected row constraint, inf otherwise."""
        return self._radii(self.row_cons, self.row_con)

    def row_constraint_is_l2(self) -> torch.Tensor:
        """Per row constraint (in `row_cons` order): True where its norm is L2 (one scale per tensor)."""
        if getattr(self, "_is_l2", None) is None:  # a constraint's norm never changes
            self._is_l2 = torch.tensor([self.cons[k].norm == "l2" for k in self.row_cons], dtype=torch.bool,
                                       device=self.device)
        return self._is_l2

    def row_constraint_radius(self) -> torch.Tensor:
        """Per row constraint (in `row_cons` order): its radius if projected, inf otherwise."""
        return self._radii(self.row_cons, torch.arange(len(self.row_cons), device=self.device))

    def diag_radius(self) -> torch.Tensor:
        """Per local diagonal element: the radius of a projected diagonal constraint, inf otherwise."""
        return self._radii(self.diag_cons, self.diag_con)

