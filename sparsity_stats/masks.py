"""The mask compiler: patterns (or a policy) + sequence length + block size -> block layouts.

A `BlockSparseLayout` is one layer's mask in the form block-sparse kernels read: for every head
and query block, the sorted list of key blocks to compute, split into *full* blocks (every pair
attends, no mask needed) and *partial* blocks (apply the token predicate), as CSR index lists.

Token semantics (the contract with ``attnlab.kernels``): query ``i`` (absolute position
``qa = i + n_k - n_q``) attends key ``j`` in head ``h`` iff block ``(i // B, j // B)`` is listed
AND ``j < n_k`` AND (not causal or ``j <= qa``) AND (``window[h] == 0`` or ``j < sink[h]`` or
``qa - j < window[h]``). A block is listed as full only if every pair of its ``B x B`` tile is in
bounds and passes. Streaming heads are token-exact through ``sink``/``window``; block-granular
kinds keep whole tiles (cut only by causality).

The compiler derives the layout from each head's `Pattern` by asking it about every tile
(`Pattern.rect`), vectorised over tiles with no Python loop over blocks; stored indices are
O(kept blocks), and the transient tile grid is processed in bounded row chunks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from .errors import (
    ERR_BLOCK_SIZE,
    ERR_LAYER,
    ERR_SCORES_SHAPE,
    ERR_SEQ_LEN,
    ERR_SEQ_TOO_LONG,
    ExtrapolationWarning,
    MaskError,
)
from .kinds import BlockScores, get_kind, prior_block_scores
from .patterns import Pattern, and_masks, generate_causal, generate_sink, generate_window, or_masks

Tensor = torch.Tensor

#: Tiles evaluated at once while compiling (bounds the transient memory of a long sequence).
TILE_CHUNK = 1 << 21

#: Compiling beyond ``EXTRAPOLATION_FACTOR`` x the longest profiled length (or below the
#: shortest / factor) warns with `ExtrapolationWarning`.
EXTRAPOLATION_FACTOR = 2.0


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the setting after.

    The compiler's tensors are small (a tile list per head), so intra-op threading only adds
    synchronisation, and on a busy machine it makes compiling many times slower.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_block_size(block_size: int) -> int:
    """``block_size`` as an int if it is a power of two (>= 1), else `MaskError`."""
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1 or (int(block_size) & (int(block_size) - 1)):
        raise MaskError(ERR_BLOCK_SIZE.format(got=block_size))
    return int(block_size)


def check_seq_len(seq_len: int, model: dict[str, Any] | None = None) -> int:
    """``seq_len`` as an int if positive and within the model's context, else `MaskError`."""
    if isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1:
        raise MaskError(ERR_SEQ_LEN.format(got=seq_len))
    n_ctx = (model or {}).get("n_ctx")
    if n_ctx and seq_len > int(n_ctx):
        raise MaskError(ERR_SEQ_TOO_LONG.format(got=seq_len, n_ctx=n_ctx, model=(model or {}).get("name", "?")))
    return int(seq_len)


def _csr_from_rows(counts: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    counts = counts.to(torch.int32)
    flat = counts.reshape(-1).to(torch.int64)
    offset = (torch.cumsum(flat, 0) - flat).to(torch.int32).reshape(counts.shape)
    return counts, offset, index.to(torch.int32)


@dataclass(frozen=True)
class _TileDomain:
    """The tiles that hold at least one in-bounds (causal) pair, row-major: block indices,
    token bounds (absolute query positions) and whether the whole B x B tile is in bounds."""

    qb: Tensor
    kb: Tensor
    q_lo: Tensor
    q_hi: Tensor
    k_lo: Tensor
    k_hi: Tensor
    in_bounds: Tensor

    @property
    def size(self) -> int:
        return int(self.qb.numel())


@lru_cache(maxsize=16)
def _tile_domain(n_q: int, n_k: int, b: int, causal: bool) -> _TileDomain:
    qbn, kbn = -(-n_q // b), -(-n_k // b)
    off = n_k - n_q
    qb = torch.arange(qbn, dtype=torch.int32)
    q_hi_row = torch.clamp(qb * b + b, max=n_q) - 1 + off
    width = (q_hi_row // b + 1).clamp(max=kbn) if causal else torch.full_like(qb, kbn)
    rows = torch.repeat_interleave(qb, width.to(torch.int64))
    starts = torch.cumsum(width, 0) - width
    cols = (torch.arange(rows.numel(), dtype=torch.int32) - torch.repeat_interleave(starts, width.to(torch.int64))).to(torch.int32)
    q_lo = rows * b + off
    q_hi = torch.clamp(rows * b + b, max=n_q) - 1 + off
    k_lo = cols * b
    k_hi = torch.clamp(cols * b + b, max=n_k) - 1
    in_bounds = (rows * b + b <= n_q) & (cols * b + b <= n_k)
    return _TileDomain(rows, cols, q_lo, q_hi, k_lo, k_hi, in_bounds)


def _csr_rows(count: Tensor) -> Tensor:
    """Flattened (head * QB + qb) row id of each CSR entry."""
    flat = count.reshape(-1).to(torch.int64)
    return torch.repeat_interleave(torch.arange(flat.numel()), flat)


@dataclass
class BlockSparseLayout:
    """One layer's block-sparse mask: per head and query block, the key blocks to compute.

    CSR over flattened ``(head, q_block)`` rows, indices sorted ascending within a row:
    ``full_kv_count [H, QB]``, ``full_kv_offset [H, QB]``, ``full_kv_index [n_full]`` list the
    full blocks; ``kv_count``, ``kv_offset``, ``kv_index`` the partial ones (all int32). Row
    ``(h, qb)``'s full blocks are ``full_kv_index[full_kv_offset[h, qb] : + full_kv_count[h, qb]]``.
    ``sink [H]`` and ``window [H]`` (int32) give the token-level streaming predicate (window 0 =
    none). See the module docstring for the exact token semantics.
    """

    block_size: int
    n_q: int
    n_k: int
    n_heads: int
    causal: bool
    full_kv_count: Tensor
    full_kv_offset: Tensor
    full_kv_index: Tensor
    kv_count: Tensor
    kv_offset: Tensor
    kv_index: Tensor
    sink: Tensor
    window: Tensor
    head_names: tuple[str, ...] = ()
    layer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- geometry ------------------------------------------------------------------------
    @property
    def n_q_blocks(self) -> int:
        return -(-self.n_q // self.block_size)

    @property
    def n_k_blocks(self) -> int:
        return -(-self.n_k // self.block_size)

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0: ``n_k - n_q``."""
        return self.n_k - self.n_q

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_patterns(
        cls,
        patterns: Sequence[Pattern | Callable[[], Pattern]],
        n_q: int,
        n_k: int,
        block_size: int,
        *,
        sink: Sequence[int] | Tensor | None = None,
        window: Sequence[int] | Tensor | None = None,
        causal: bool = True,
        layer: int | None = None,
        trusted: bool = False,
        cache_keys: Sequence[Any] | None = None,
        cache: dict[Any, tuple[Tensor, ...]] | None = None,
    ) -> BlockSparseLayout:
        """Compile one pattern per head into a layout by asking each pattern about every tile.

        A tile is listed where the pattern (intersected with causal and the head's sink/window)
        may pass somewhere in it, and listed as full where it passes everywhere and lies in
        bounds. The layout reproduces the pattern token for token when the pattern lies inside
        ``causal & (sink | window)`` and, within its tiles, equals it — true of every policy
        kind (`attnlab.sparsity_stats.kinds`), whose patterns are ``trusted`` to include causal
        and their own sink/window already. Only tiles holding a causal pair are asked (the lower
        triangle), in chunks of at most `TILE_CHUNK` tiles. Heads with equal ``cache_keys``
        reuse one evaluation through ``cache`` (shared across layers by `compile_policy`); a
        pattern may be given as a factory, called only when its head is not cached.
        """
        b = check_block_size(block_size)
        if n_q < 1 or n_k < n_q:
            raise MaskError(f"need 1 <= n_q <= n_k, got n_q={n_q}, n_k={n_k}: queries are the last n_q of n_k tokens")
        h_count = len(patterns)
        sink_t = torch.as_tensor(sink if sink is not None else [0] * h_count, dtype=torch.int32).reshape(h_count)
        window_t = torch.as_tensor(window if window is not None else [0] * h_count, dtype=torch.int32).reshape(h_count)
        qbn = -(-n_q // b)
        dom = _tile_domain(n_q, n_k, b, causal)
        causal_p = generate_causal()
        cache = {} if cache is None else cache

        per_head, names = [], []
        for h, pattern in enumerate(patterns):
            key = None if cache_keys is None else cache_keys[h]
            if key is not None and key in cache:
                per_head.append(cache[key])
                names.append(cache[key][4])
                continue
            if not isinstance(pattern, Pattern):  # a factory: build the pattern only when needed
                pattern = pattern()
            names.append(pattern.name)
            checks = [pattern]
            if not trusted:
                if causal:
                    checks.append(causal_p)
                if int(window_t[h]) > 0:
                    checks.append(or_masks(generate_sink(int(sink_t[h])), generate_window(int(window_t[h]))))
            pat = and_masks(*checks) if len(checks) > 1 else pattern
            hh = torch.tensor(h)
            f_rows, f_cols, p_rows, p_cols = [], [], [], []
            for lo in range(0, dom.size, TILE_CHUNK):
                hi = min(dom.size, lo + TILE_CHUNK)
                q_lo, q_hi, k_lo, k_hi = dom.q_lo[lo:hi], dom.q_hi[lo:hi], dom.k_lo[lo:hi], dom.k_hi[lo:hi]
                any_, all_ = pat.rect(hh, q_lo, q_hi, k_lo, k_hi)
                idx = torch.nonzero(any_.expand(hi - lo)).flatten()
                full = (all_.expand(hi - lo) & dom.in_bounds[lo:hi])[idx]
                rows, cols = dom.qb[lo:hi][idx], dom.kb[lo:hi][idx]
                f_rows.append(rows[full])
                f_cols.append(cols[full])
                p_rows.append(rows[~full])
                p_cols.append(cols[~full])
            fr, pr = torch.cat(f_rows).to(torch.int64), torch.cat(p_rows).to(torch.int64)
            entry = (torch.bincount(fr, minlength=qbn), torch.cat(f_cols), torch.bincount(pr, minlength=qbn), torch.cat(p_cols),
                     pattern.name)
            if key is not None:
                cache[key] = entry
            per_head.append(entry)
        fc, fo, fi = _csr_from_rows(torch.stack([e[0] for e in per_head]), torch.cat([e[1] for e in per_head]))
        pc, po, pi = _csr_from_rows(torch.stack([e[2] for e in per_head]), torch.cat([e[3] for e in per_head]))
        return cls(b, n_q, n_k, h_count, causal, fc, fo, fi, pc, po, pi, sink_t, window_t, tuple(names), layer)

    @classmethod
    def from_block_mask(
        cls,
        block_mask: Tensor,
        n_q: int,
        n_k: int,
        block_size: int,
        *,
        sink: Sequence[int] | Tensor | None = None,
        window: Sequence[int] | Tensor | None = None,
        causal: bool = True,
        layer: int | None = None,
        head_names: Sequence[str] = (),
    ) -> BlockSparseLayout:
        """A layout from a dense bool block mask ``[H, QB, KB]`` (tiles with no attending pair
        under causal/sink/window are dropped; full/partial follows the token semantics)."""
        from .patterns import generate_blocks, on_blocks

        b = check_block_size(block_size)
        bm = torch.as_tensor(block_mask, dtype=torch.bool)
        qbn, kbn = -(-n_q // b), -(-n_k // b)
        if bm.dim() != 3 or tuple(bm.shape[1:]) != (qbn, kbn):
            raise MaskError(f"block mask has shape {tuple(bm.shape)}, expected [heads, {qbn}, {kbn}] for n_q={n_q}, n_k={n_k}, B={b}")
        off = n_k - n_q
        if off % b:
            raise MaskError(f"n_k - n_q = {off} is not a multiple of the block size {b}: block rows would not align with query blocks")
        # Block row qb holds absolute query block qb + off // B.
        pats = []
        for h in range(bm.shape[0]):
            table = torch.zeros(qbn + off // b, kbn, dtype=torch.bool)
            table[off // b :] = bm[h]
            pats.append(on_blocks(generate_blocks(table), b))
        out = cls.from_patterns(pats, n_q, n_k, b, sink=sink, window=window, causal=causal, layer=layer)
        out.head_names = tuple(head_names)
        return out

    # -- views ---------------------------------------------------------------------------
    def _dense(self, count: Tensor, index: Tensor) -> Tensor:
        out = torch.zeros(self.n_heads * self.n_q_blocks, self.n_k_blocks, dtype=torch.bool)
        rows = _csr_rows(count)
        out[rows, index.to(torch.int64)] = True
        return out.reshape(self.n_heads, self.n_q_blocks, self.n_k_blocks)

    def full_block_mask(self) -> Tensor:
        """Bool ``[H, QB, KB]``: tiles computed without a mask."""
        return self._dense(self.full_kv_count, self.full_kv_index)

    def partial_block_mask(self) -> Tensor:
        """Bool ``[H, QB, KB]``: tiles computed with the token predicate."""
        return self._dense(self.kv_count, self.kv_index)

    def block_mask(self) -> Tensor:
        """Bool ``[H, QB, KB]``: every tile computed (full or partial). Dense: small lengths, plots."""
        return self.full_block_mask() | self.partial_block_mask()

    def token_mask(self) -> Tensor:
        """Bool ``[H, n_q, n_k]``: the exact token mask of the contract (small lengths only)."""
        b = self.block_size
        bm = self.block_mask()
        i = torch.arange(self.n_q)
        j = torch.arange(self.n_k)
        listed = bm[:, i // b][:, :, j // b]
        qa = (i + self.q_offset)[:, None]
        ok = torch.ones(self.n_q, self.n_k, dtype=torch.bool)
        if self.causal:
            ok &= j[None, :] <= qa
        w = self.window.to(torch.int64)[:, None, None]
        s = self.sink.to(torch.int64)[:, None, None]
        stream = (w == 0) | (j[None, None, :] < s) | (qa[None] - j[None, None, :] < w)
        return listed & ok[None] & stream

    def kept_blocks(self) -> Tensor:
        """Tiles computed per head, int64 ``[H]``."""
        return (self.full_kv_count.to(torch.int64) + self.kv_count.to(torch.int64)).sum(-1)

    def causal_blocks(self) -> int:
        """Tiles a dense (causal) kernel computes: those holding at least one attending pair."""
        if not self.causal:
            return self.n_q_blocks * self.n_k_blocks
        b = self.block_size
        qb = torch.arange(self.n_q_blocks)
        q_hi = torch.clamp(qb * b + b, max=self.n_q) - 1 + self.q_offset
        return int((q_hi // b + 1).clamp(max=self.n_k_blocks).sum())

    @property
    def density(self) -> Tensor:
        """Per head, float64 ``[H]``: computed tiles / the tiles dense causal attention computes.

        Block-level (what a block-sparse kernel pays). `token_density` counts token pairs.
        """
        return self.kept_blocks().to(torch.float64) / max(1, self.causal_blocks())

    def token_density(self) -> Tensor:
        """Per head, float64 ``[H]``: attending token pairs / causal token pairs (small lengths)."""
        tm = self.token_mask()
        i = torch.arange(self.n_q)[:, None] + self.q_offset
        j = torch.arange(self.n_k)[None, :]
        total = int((j <= i).sum()) if self.causal else self.n_q * self.n_k
        return tm.sum((-1, -2)).to(torch.float64) / max(1, total)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays (O(kept blocks + heads x query blocks))."""
        ts = (self.full_kv_count, self.full_kv_offset, self.full_kv_index, self.kv_count, self.kv_offset, self.kv_index, self.sink, self.window)
        return sum(t.numel() * t.element_size() for t in ts)

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> BlockSparseLayout:
        """Check the CSR invariants (shapes, dtypes, offsets, sorted in-range indices, full and
        partial disjoint); `MaskError` naming the first broken one."""
        h, qb, kb = self.n_heads, self.n_q_blocks, self.n_k_blocks
        for name in ("full_kv_count", "full_kv_offset", "kv_count", "kv_offset"):
            t = getattr(self, name)
            if tuple(t.shape) != (h, qb) or t.dtype != torch.int32:
                raise MaskError(f"layout field {name} has shape {tuple(t.shape)} {t.dtype}, expected [{h}, {qb}] int32")
        for name in ("sink", "window"):
            t = getattr(self, name)
            if tuple(t.shape) != (h,) or t.dtype != torch.int32 or bool((t < 0).any()):
                raise MaskError(f"layout field {name} must be int32 [{h}] and >= 0")
        for prefix in ("full_kv", "kv"):
            count, offset, index = (getattr(self, f"{prefix}_{x}") for x in ("count", "offset", "index"))
            if index.dtype != torch.int32 or index.dim() != 1:
                raise MaskError(f"layout field {prefix}_index must be a 1-D int32 tensor")
            flat = count.reshape(-1).to(torch.int64)
            if bool((flat < 0).any()) or int(flat.sum()) != index.numel():
                raise MaskError(f"layout {prefix}_count does not add up to len({prefix}_index) = {index.numel()}")
            expect = torch.cumsum(flat, 0) - flat
            if not torch.equal(offset.reshape(-1).to(torch.int64), expect):
                raise MaskError(f"layout {prefix}_offset is not the running sum of {prefix}_count")
            if index.numel():
                if int(index.min()) < 0 or int(index.max()) >= kb:
                    raise MaskError(f"layout {prefix}_index has a block outside [0, {kb})")
                rows = _csr_rows(count)
                same_row = rows[1:] == rows[:-1]
                if bool((index[1:].to(torch.int64) <= index[:-1].to(torch.int64))[same_row].any()):
                    raise MaskError(f"layout {prefix}_index is not strictly increasing within a row")
        if bool((self.full_block_mask() & self.partial_block_mask()).any()):
            raise MaskError("a tile is listed both as full and as partial")
        return self

    def equals(self, other: BlockSparseLayout) -> bool:
        """Same geometry, same indices, same sink/window."""
        scalars = ("block_size", "n_q", "n_k", "n_heads", "causal")
        if any(getattr(self, a) != getattr(other, a) for a in scalars):
            return False
        arrays = ("full_kv_count", "full_kv_offset", "full_kv_index", "kv_count", "kv_offset", "kv_index", "sink", "window")
        return all(torch.equal(getattr(self, a).to(torch.int32), getattr(other, a).to(torch.int32)) for a in arrays)

    # -- conversions ---------------------------------------------------------------------
    def to_arrays(self) -> dict[str, Tensor]:
        """The index arrays by contract name (for exporters)."""
        names = ("full_kv_count", "full_kv_offset", "full_kv_index", "kv_count", "kv_offset", "kv_index", "sink", "window")
        return {n: getattr(self, n).contiguous() for n in names}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Tensor], *, block_size: int, n_q: int, n_k: int, causal: bool = True,
                    layer: int | None = None, head_names: Sequence[str] = ()) -> BlockSparseLayout:
        """Inverse of `to_arrays`; validates the result."""
        a = {k: torch.as_tensor(v).to(torch.int32) for k, v in arrays.items()}
        h = int(a["sink"].numel())
        out = cls(block_size, n_q, n_k, h, causal, a["full_kv_count"], a["full_kv_offset"], a["full_kv_index"],
                  a["kv_count"], a["kv_offset"], a["kv_index"], a["sink"].reshape(h), a["window"].reshape(h),
                  tuple(head_names), layer)
        return out.validate()

    def padded(self) -> dict[str, Tensor]:
        """FlexAttention's padded form: ``kv_num_blocks [1, H, QB]``, ``kv_indices [1, H, QB, KB]``
        (and ``full_*``); unused trailing slots hold 0."""
        out = {}
        for prefix, name in (("kv", "kv"), ("full_kv", "full_kv")):
            count, index = getattr(self, f"{prefix}_count"), getattr(self, f"{prefix}_index")
            rows = _csr_rows(count)
            offset = getattr(self, f"{prefix}_offset").reshape(-1).to(torch.int64)
            pos = torch.arange(index.numel()) - offset[rows] if index.numel() else torch.zeros(0, dtype=torch.int64)
            idx = torch.zeros(self.n_heads * self.n_q_blocks, self.n_k_blocks, dtype=torch.int32)
            idx[rows, pos] = index
            out[f"{name}_num_blocks"] = count[None].contiguous()
            out[f"{name}_indices"] = idx.reshape(1, self.n_heads, self.n_q_blocks, self.n_k_blocks)
        return out

    def mask_mod(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The layout's token predicate as a FlexAttention ``mask_mod`` (block membership
        included, since FlexAttention's eager path reads only the mask_mod)."""
        table = self.block_mask()
        b, off, n_k = self.block_size, self.q_offset, self.n_k
        qbn, kbn = self.n_q_blocks, self.n_k_blocks
        sink, window, causal = self.sink.to(torch.int64), self.window.to(torch.int64), self.causal

        def mask_mod(bi: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            qa = q_idx + off
            listed = table[h, (q_idx // b).clamp(0, qbn - 1), (kv_idx // b).clamp(0, kbn - 1)]
            ok = listed & (kv_idx < n_k)
            if causal:
                ok = ok & (kv_idx <= qa)
            w, s = window[h], sink[h]
            return ok & ((w == 0) | (kv_idx < s) | (qa - kv_idx < w))

        mask_mod.__name__ = f"layout_layer{self.layer}" if self.layer is not None else "layout"
        return mask_mod

    def to_flex_block_mask(self):
        """A FlexAttention ``BlockMask`` built straight from the indices (no mask evaluation)."""
        from torch.nn.attention.flex_attention import BlockMask

        p = self.padded()
        return BlockMask.from_kv_blocks(
            p["kv_num_blocks"], p["kv_indices"], p["full_kv_num_blocks"], p["full_kv_indices"],
            BLOCK_SIZE=self.block_size, mask_mod=self.mask_mod(), seq_lengths=(self.n_q, self.n_k),
        )

    def __repr__(self) -> str:
        dens = ", ".join(f"{d:.3f}" for d in self.density.tolist())
        return (f"BlockSparseLayout(layer={self.layer}, heads={self.n_heads}, n_q={self.n_q}, n_k={self.n_k}, "
                f"B={self.block_size}, density=[{dens}])")


# -- compiling policies ---------------------------------------------------------------------
def _check_scores(scores: BlockScores, layer: int, n_heads: int, n: int, b: int) -> None:
    nb = -(-n // b)
    ok = (
        scores.n == n and scores.block_size == b
        and tuple(scores.vertical.shape) == (n_heads, nb) and tuple(scores.slash.shape) == (n_heads, nb)
        and tuple(scores.blocks.shape) == (n_heads, nb, nb)
    )
    if not ok:
        got = f"vertical {tuple(scores.vertical.shape)}, blocks {tuple(scores.blocks.shape)} (n={scores.n}, B={scores.block_size})"
        raise MaskError(ERR_SCORES_SHAPE.format(layer=layer, got=got, expected=f"[{n_heads}, {nb}(, {nb})]", n=n, block=b))


def head_patterns(policy, layer: int, seq_len: int, block_size: int | None = None,
                  scores: BlockScores | None = None) -> list[Pattern]:
    """Each head's `Pattern` in ``layer`` at ``seq_len`` (dynamic heads from ``scores`` or the prior)."""
    b = check_block_size(policy.block_size if block_size is None else block_size)
    return [make() for make in _pattern_factories(policy, layer, seq_len, b, scores)]


def _pattern_factories(policy, layer: int, n: int, b: int, scores: BlockScores | None) -> list[Callable[[], Pattern]]:
    n_layers = int(policy.model["n_layers"])
    if not 0 <= layer < n_layers:
        raise MaskError(ERR_LAYER.format(layer=layer, n_layers=n_layers))
    entries = policy.layer(layer)
    if scores is not None:
        _check_scores(scores, layer, len(entries), n, b)
    prior: list[BlockScores] = []

    def factory(e) -> Callable[[], Pattern]:
        def make() -> Pattern:
            kind = get_kind(e.kind)
            hs = None
            if not kind.static:
                if scores is not None:
                    hs = scores.head(e.head)
                else:
                    if not prior:
                        prior.append(prior_block_scores(n, b))
                    hs = prior[0]
            return kind.pattern(e.params, n, b, hs)

        return make

    return [factory(e) for e in entries]


def compile_layer(policy, layer: int, seq_len: int, block_size: int | None = None, *,
                  scores: BlockScores | None = None, _cache: dict | None = None) -> BlockSparseLayout:
    """One layer of a `Policy` compiled at ``seq_len`` tokens (prefill: ``n_q = n_k = seq_len``).

    Dynamic heads choose their blocks from ``scores`` (`estimate_block_scores` on the input, or
    `scores_from_mass` on a profile); without scores they use `prior_block_scores`.
    """
    b = check_block_size(policy.block_size if block_size is None else block_size)
    n = check_seq_len(seq_len, policy.model)
    pats = _pattern_factories(policy, layer, n, b, scores)
    entries = policy.layer(layer)
    streams = [get_kind(e.kind).stream(e.params, n) for e in entries]
    # Heads with the same static pattern (or dynamic on the prior) share one evaluation.
    keys = [
        None if (scores is not None and not get_kind(e.kind).static) else (e.kind, e.candidate.key(), n, b)
        for e in entries
    ]
    with single_thread():
        out = BlockSparseLayout.from_patterns(
            pats, n, n, b, sink=[s for s, _ in streams], window=[w for _, w in streams], causal=True, layer=layer,
            trusted=True, cache_keys=keys, cache=_cache,
        )
    out.meta = {"kinds": [e.kind for e in policy.layer(layer)], "dynamic_from": "scores" if scores is not None else "prior"}
    return out


def estimate_layer_scores(policy, layer: int, q: Tensor, k: Tensor, block_size: int | None = None) -> BlockScores:
    """`estimate_block_scores` for one layer under the rule its dynamic heads carry (the
    largest ``last_q`` of its vertical-slash heads; 64 by default). ``q [H, n, d]``, ``k [H_kv, n, d]``."""
    from .kinds import estimate_block_scores

    b = check_block_size(policy.block_size if block_size is None else block_size)
    last = [int(e.params.get("estimate", {}).get("last_q", 64)) for e in policy.layer(layer) if e.kind == "vertical_slash"]
    return estimate_block_scores(q, k, b, last_q=max(last, default=64))


def compile_for_input(policy, layer: int, q: Tensor, k: Tensor, block_size: int | None = None) -> BlockSparseLayout:
    """One layer compiled for one input (prefill of ``n = q.shape[-2]`` tokens): dynamic heads
    choose their blocks from this input's queries and keys."""
    n = int(q.shape[-2])
    scores = None
    if any(not get_kind(e.kind).static for e in policy.layer(layer)):
        scores = estimate_layer_scores(policy, layer, q, k, block_size)
    return compile_layer(policy, layer, n, block_size, scores=scores)


def warn_if_extrapolating(policy, seq_len: int, factor: float = EXTRAPOLATION_FACTOR) -> bool:
    """Warn (`ExtrapolationWarning`) when ``seq_len`` is far outside the profiled lengths."""
    lengths = [int(x) for x in (getattr(policy, "profiled_lengths", None) or [])]
    if not lengths:
        return False
    lo, hi = min(lengths), max(lengths)
    if seq_len > factor * hi or seq_len * factor < lo:
        warnings.warn(
            f"compiling at {seq_len} tokens, far outside the profiled lengths {lo}..{hi}: elastic sizes "
            f"extrapolate and expected recall is unverified there; profile at this length (attnlab profile) to check",
            ExtrapolationWarning,
            stacklevel=3,
        )
        return True
    return False


def compile_policy(policy, seq_len: int, block_size: int | None = None, *,
                   scores: Sequence[BlockScores | None] | Callable[[int], BlockScores | None] | None = None,
                   layers: Sequence[int] | None = None, progress: bool = False) -> list[BlockSparseLayout]:
    """Compile every layer (or ``layers``) of a policy at ``seq_len``; one layout per layer.

    ``scores`` gives dynamic heads their per-layer `BlockScores` (a list indexed by layer, or a
    function of the layer). Warns when ``seq_len`` is far outside the profiled lengths.
    """
    b = check_block_size(policy.block_size if block_size is None else block_size)
    n = check_seq_len(seq_len, policy.model)
    warn_if_extrapolating(policy, n)
    todo = list(layers) if layers is not None else list(range(int(policy.model["n_layers"])))
    it = todo
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"compiling {n} tokens", unit="layer", disable=None)
    out = []
    cache: dict = {}
    with single_thread():
        for layer in it:
            sc = None
            if scores is not None:
                sc = scores(layer) if callable(scores) else scores[layer]
            out.append(compile_layer(policy, layer, n, b, scores=sc, _cache=cache))
    return out


def density_summary(layouts: Sequence[BlockSparseLayout]) -> dict[str, float]:
    """Mean, min and max achieved block density over all heads of ``layouts``."""
    d = torch.cat([lay.density for lay in layouts])
    return {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())}


def index_nbytes(layouts: Sequence[BlockSparseLayout]) -> int:
    """Total bytes of index memory over ``layouts``."""
    return sum(lay.nbytes for lay in layouts)
