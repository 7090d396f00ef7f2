"""Attention patterns as small, named, composable predicates over (head, query, key).

A pattern answers one question: *may query ``q`` attend key ``k`` in head ``h``?* It is built by a
tiny ``generate_*`` function that takes the pattern's parameters and names the result
(``sink_4``, ``window_256``), and patterns compose with `and_masks` / `or_masks`, in the style
of attention-gym's ``attn_gym/masks``. Positions are absolute token positions (a query at
position ``q`` of the full sequence), so the same pattern serves prefill and decode.

Every pattern evaluates two ways, from one definition:

- **token level** — ``pattern(h, q, k) -> bool tensor``, broadcasting over integer tensors.
  It uses only elementwise ops and table lookups, so it also works under ``torch.vmap`` as a
  FlexAttention ``mask_mod`` (`Pattern.mask_mod`). `token_mask` draws it densely.
- **rectangle level** — ``pattern.rect(h, q_lo, q_hi, k_lo, k_hi) -> (any, all)``: whether
  some / every pair in the inclusive rectangle ``[q_lo, q_hi] x [k_lo, k_hi]`` passes. The block
  compiler (`attnlab.sparsity_stats.masks`) calls it on tiles, which is how a block layout is
  derived from a pattern instead of written a second time. Primitives are exact. For
  compositions, ``all`` of an `and_masks` and ``any`` of an `or_masks` stay exact; ``any`` of an
  `and_masks` may say True for a rectangle where no single pair passes, and ``all`` of an
  `or_masks` may say False where the union covers every pair. Both errors only cost compute
  (an empty tile listed, a full tile treated as partial); they never change which pairs attend.

`on_blocks` lifts a pattern to block granularity: ``on_blocks(p, 64)`` keeps token pair
``(q, k)`` iff ``p`` keeps block pair ``(q // 64, k // 64)``. MInference's vertical-slash,
block top-k and A-shape kinds are the vocabulary's own primitives lifted this way, so their
block layouts are exact.

Example::

    streaming = and_masks(generate_causal(), or_masks(generate_sink(4), generate_window(256)))
    mask = token_mask(streaming, n_q=12, n_k=12)        # bool [1, 12, 12]
    print(streaming.draw(12))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
TokenFn = Callable[[Tensor, Tensor, Tensor], Tensor]
RectFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

_ERR_NEGATIVE = "{what} must be >= 0, got {got}: positions and sizes are token (or block) counts"


@dataclass(frozen=True, eq=False)
class Pattern:
    """A named predicate over (head, query position, key position).

    Build one with a ``generate_*`` function, `on_blocks`, `and_masks`, `or_masks` or
    `per_head`; call it like a function for the token-level mask; ask `rect` about rectangles.
    ``params`` records what it was generated from (for display and tests).
    """

    name: str
    token_fn: TokenFn
    rect_fn: RectFn
    params: tuple = ()

    def __call__(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Token-level mask: bool, the broadcast shape of ``h``, ``q``, ``k`` (or of ``q``, ``k``)."""
        return self.token_fn(h, q, k)

    def rect(self, h: Tensor, q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor) -> tuple[Tensor, Tensor]:
        """(any, all) over inclusive rectangles; all arguments broadcast (see the module docstring)."""
        return self.rect_fn(h, q_lo, q_hi, k_lo, k_hi)

    def mask_mod(self, q_offset: int = 0) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """This pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.

        ``q_offset`` turns FlexAttention's query index (relative to the query tensor) into the
        absolute position this pattern reads: ``n_k - n_q`` when queries are the last ones.
        """

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.token_fn(h, q_idx + q_offset, kv_idx)

        mask_mod.__name__ = self.name
        return mask_mod

    def draw(self, n: int = 12, head: int = 0) -> str:
        """An ``n x n`` picture of the token mask of one head (rows = queries), like attention-gym's demos."""
        mask = token_mask(self, n, n, n_heads=head + 1)[head]
        rows = ["".join("█" if v else "·" for v in row.tolist()) for row in mask]
        return f"{self.name}\n" + "\n".join(rows)

    def __and__(self, other: Pattern) -> Pattern:
        return and_masks(self, other)

    def __or__(self, other: Pattern) -> Pattern:
        return or_masks(self, other)

    def __repr__(self) -> str:
        return f"Pattern({self.name})"


def _as_int(x: Tensor | int) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(x)


def _true_like(*xs: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(*(x.shape for x in xs))
    return torch.ones(shape, dtype=torch.bool, device=xs[0].device)


def _check_nonneg(value: int, what: str) -> int:
    if int(value) != value or value < 0:
        raise ValueError(_ERR_NEGATIVE.format(what=what, got=value))
    return int(value)


def _sorted_unique(values: Sequence[int] | Tensor, what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.int64).flatten()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(_ERR_NEGATIVE.format(what=what, got=int(t.min())))
    return torch.unique(t)  # sorted


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` where ``0 <= idx < len(table)``, False elsewhere (vmap-safe)."""
    n = table.shape[0]
    if n == 0:
        return torch.zeros_like(idx, dtype=torch.bool)
    inside = (idx >= 0) & (idx < n)
    return inside & table[idx.clamp(0, n - 1)]


def _prefix_counts(sorted_values: Tensor) -> Tensor:
    """``prefix[i]`` = how many values are ``< i``, for ``i`` in ``[0, max + 1]`` (int32)."""
    size = int(sorted_values.max()) + 1 if sorted_values.numel() else 0
    hits = torch.zeros(size + 1, dtype=torch.int32)
    if size:
        hits[sorted_values + 1] = 1
    return hits.cumsum(0, dtype=torch.int32)


def _count_in(prefix: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """How many counted values lie in ``[lo, hi]``, elementwise (``prefix`` from `_prefix_counts`)."""
    top = prefix.shape[0] - 1
    return prefix[(hi + 1).clamp(0, top)] - prefix[lo.clamp(0, top)]


# -- primitives -----------------------------------------------------------------------------
def generate_causal() -> Pattern:
    """Causal attention: a query sees itself and earlier keys (``k <= q``)."""

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k <= q

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        return k_lo <= q_hi, k_hi <= q_lo

    return Pattern("causal", token, rect)


def generate_dense() -> Pattern:
    """Every pair: the identity of `and_masks` (compose with `generate_causal` for a decoder)."""

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return _true_like(q, k)

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        t = _true_like(q_lo, q_hi, k_lo, k_hi)
        return t, t

    return Pattern("dense", token, rect)


def generate_sink(n: int) -> Pattern:
    """Attention sinks (StreamingLLM): the first ``n`` keys, ``k < n``, for every query."""
    n = _check_nonneg(n, "sink size")

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return k < n

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        return k_lo < n, k_hi < n

    return Pattern(f"sink_{n}", token, rect, (n,))


def generate_window(w: int) -> Pattern:
    """A sliding window of the ``w`` most recent keys: ``q - k < w`` (compose with causal)."""
    w = _check_nonneg(w, "window size")

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return q - k < w

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        return q_lo - k_hi < w, q_hi - k_lo < w

    return Pattern(f"window_{w}", token, rect, (w,))


def generate_vertical(columns: Sequence[int] | Tensor) -> Pattern:
    """Vertical lines (MInference): the listed key positions, for every query."""
    cols = _sorted_unique(columns, "vertical column")
    size = int(cols.max()) + 1 if cols.numel() else 0
    table = torch.zeros(size, dtype=torch.bool)
    table[cols] = True

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return _lookup(table, k) & (q == q)

    prefix = _prefix_counts(cols)

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        cnt = _count_in(prefix, k_lo, k_hi)
        return cnt > 0, cnt == (k_hi - k_lo + 1)

    return Pattern(f"vertical_{cols.numel()}", token, rect, (tuple(cols.tolist()),))


def generate_slash(offsets: Sequence[int] | Tensor) -> Pattern:
    """Slash lines (MInference): the diagonals ``q - k = o`` for the listed offsets ``o >= 0``."""
    offs = _sorted_unique(offsets, "slash offset")
    size = int(offs.max()) + 1 if offs.numel() else 0
    table = torch.zeros(size, dtype=torch.bool)
    table[offs] = True

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return _lookup(table, q - k)

    prefix = _prefix_counts(offs)

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        d_lo, d_hi = q_lo - k_hi, q_hi - k_lo
        cnt = _count_in(prefix, d_lo, d_hi)
        return cnt > 0, cnt == (d_hi - d_lo + 1)

    return Pattern(f"slash_{offs.numel()}", token, rect, (tuple(offs.tolist()),))


def generate_blocks(pairs: Sequence[tuple[int, int]] | Tensor, shape: tuple[int, int] | None = None) -> Pattern:
    """An explicit set of (q, k) pairs — in practice block pairs, lifted with `on_blocks`.

    ``pairs`` is a list of ``(q, k)`` or a bool table ``[n_q, n_k]`` (``shape`` pads a list to a
    table of that size). Rectangle queries use a summed-area table, so they are exact and cost
    four lookups.
    """
    if isinstance(pairs, Tensor) and pairs.dtype == torch.bool:
        table = pairs.clone()
    else:
        idx = torch.as_tensor(list(pairs) if not isinstance(pairs, Tensor) else pairs, dtype=torch.int64).reshape(-1, 2)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(_ERR_NEGATIVE.format(what="block coordinate", got=int(idx.min())))
        nq = int(idx[:, 0].max()) + 1 if idx.numel() else 0
        nk = int(idx[:, 1].max()) + 1 if idx.numel() else 0
        if shape is not None:
            nq, nk = max(nq, shape[0]), max(nk, shape[1])
        table = torch.zeros(nq, nk, dtype=torch.bool)
        table[idx[:, 0], idx[:, 1]] = True
    if table.dim() != 2:
        raise ValueError(f"a block table must be 2-D [n_q, n_k], got shape {tuple(table.shape)}")
    nq, nk = table.shape
    sat = torch.zeros(nq + 1, nk + 1, dtype=torch.int32)
    if table.numel():
        sat[1:, 1:] = table.to(torch.int32).cumsum(0).cumsum(1)
    flat = table.reshape(-1)

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if nq == 0 or nk == 0:
            return torch.zeros_like(q - k, dtype=torch.bool)
        inside = (q >= 0) & (q < nq) & (k >= 0) & (k < nk)
        return inside & flat[q.clamp(0, nq - 1) * nk + k.clamp(0, nk - 1)]

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        a0, a1 = q_lo.clamp(0, nq), (q_hi + 1).clamp(0, nq)
        b0, b1 = k_lo.clamp(0, nk), (k_hi + 1).clamp(0, nk)
        a0, a1 = torch.minimum(a0, a1), a1
        b0, b1 = torch.minimum(b0, b1), b1
        cnt = sat[a1, b1] - sat[a0, b1] - sat[a1, b0] + sat[a0, b0]
        area = (q_hi - q_lo + 1) * (k_hi - k_lo + 1)
        return cnt > 0, cnt == area

    return Pattern(f"blocks_{int(table.sum())}", token, rect, (tuple(table.shape),))


# -- combinators ----------------------------------------------------------------------------
def on_blocks(inner: Pattern, block_size: int) -> Pattern:
    """Lift ``inner`` to blocks: token pair (q, k) passes iff block pair (q // B, k // B) does.

    Exact at rectangle level too: every block of the block rectangle holds a token of the token
    rectangle.
    """
    b = int(block_size)
    if b <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return inner.token_fn(h, torch.div(q, b, rounding_mode="floor"), torch.div(k, b, rounding_mode="floor"))

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        fd = lambda x: torch.div(x, b, rounding_mode="floor")  # noqa: E731
        return inner.rect_fn(h, fd(q_lo), fd(q_hi), fd(k_lo), fd(k_hi))

    return Pattern(f"{inner.name}@{b}", token, rect, (inner, b))


def and_masks(*patterns: Pattern, name: str | None = None) -> Pattern:
    """Intersection: a pair passes iff it passes every pattern."""
    if not patterns:
        raise ValueError("and_masks needs at least one pattern")

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = patterns[0].token_fn(h, q, k)
        for p in patterns[1:]:
            out = out & p.token_fn(h, q, k)
        return out

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        any_, all_ = patterns[0].rect_fn(h, q_lo, q_hi, k_lo, k_hi)
        for p in patterns[1:]:
            a, b = p.rect_fn(h, q_lo, q_hi, k_lo, k_hi)
            any_, all_ = any_ & a, all_ & b
        return any_, all_

    return Pattern(name or "and(" + ",".join(p.name for p in patterns) + ")", token, rect, patterns)


def or_masks(*patterns: Pattern, name: str | None = None) -> Pattern:
    """Union: a pair passes iff it passes some pattern."""
    if not patterns:
        raise ValueError("or_masks needs at least one pattern")

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = patterns[0].token_fn(h, q, k)
        for p in patterns[1:]:
            out = out | p.token_fn(h, q, k)
        return out

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        any_, all_ = patterns[0].rect_fn(h, q_lo, q_hi, k_lo, k_hi)
        for p in patterns[1:]:
            a, b = p.rect_fn(h, q_lo, q_hi, k_lo, k_hi)
            any_, all_ = any_ | a, all_ | b
        return any_, all_

    return Pattern(name or "or(" + ",".join(p.name for p in patterns) + ")", token, rect, patterns)


def named(pattern: Pattern, name: str) -> Pattern:
    """The same predicate under another name (``streaming_sink4_window256``)."""
    return Pattern(name, pattern.token_fn, pattern.rect_fn, pattern.params)


def per_head(patterns: Sequence[Pattern], name: str | None = None) -> Pattern:
    """One pattern per head: head ``h`` follows ``patterns[h]`` (a layer's policy as one mask_mod)."""
    pats = tuple(patterns)

    def token(h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        h = _as_int(h)
        out = torch.zeros(torch.broadcast_shapes(h.shape, q.shape, k.shape), dtype=torch.bool, device=q.device)
        for i, p in enumerate(pats):
            out = out | ((h == i) & p.token_fn(h, q, k))
        return out

    def rect(h, q_lo, q_hi, k_lo, k_hi):
        h = _as_int(h)
        shape = torch.broadcast_shapes(h.shape, q_lo.shape, q_hi.shape, k_lo.shape, k_hi.shape)
        any_ = torch.zeros(shape, dtype=torch.bool)
        all_ = torch.zeros(shape, dtype=torch.bool)
        for i, p in enumerate(pats):
            a, b = p.rect_fn(h, q_lo, q_hi, k_lo, k_hi)
            sel = h == i
            any_, all_ = any_ | (sel & a), all_ | (sel & b)
        return any_, all_

    return Pattern(name or f"per_head[{len(pats)}]", token, rect, pats)


# -- dense evaluation -----------------------------------------------------------------------
def token_mask(pattern: Pattern, n_q: int, n_k: int, n_heads: int = 1) -> Tensor:
    """The pattern's token mask, bool ``[n_heads, n_q, n_k]``; query ``i`` sits at ``i + n_k - n_q``.

    O(n_q * n_k) per head: for tests, plots and the dense reference at small lengths.
    """
    h = torch.arange(n_heads)[:, None, None]
    q = torch.arange(n_q)[None, :, None] + (n_k - n_q)
    k = torch.arange(n_k)[None, None, :]
    return pattern(h, q, k).expand(n_heads, n_q, n_k).clone()
