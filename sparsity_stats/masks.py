"""The mask compiler: patterns (or a policy) + sequence length + block size -> block layouts.

The result is one `attnlab.kernels.BlockSparseLayout` per layer: for every head and query
block, the sorted list of key blocks to compute, split into *full* blocks (every pair attends,
no mask needed) and *partial* blocks (apply the token predicate), as CSR index lists. The
layout type, its token semantics and its checks live in `attnlab.kernels.layout`; streaming
heads are token-exact through its ``sink``/``window``; block-granular kinds keep whole tiles
(cut only by causality).

The compiler derives the layout from each head's `Pattern` by asking it about every tile
(`Pattern.rect`), vectorised over tiles with no Python loop over blocks; stored indices are
O(kept blocks), and the transient tile grid is processed in bounded row chunks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from attnlab.kernels.layout import BlockSparseLayout, csr_from_counts

from .errors import (
    ERR_BLOCK_SIZE,
    ERR_LAYER,
    ERR_SCORES_SHAPE,
    ERR_SEQ_LEN,
    ERR_SEQ_TOO_LONG,
    ExtrapolationWarning,
    MaskError,
    PolicyError,
)
from .kinds import BlockScores, get_kind, prior_block_scores
from .patterns import Pattern, and_masks, generate_causal, generate_sink, generate_window, or_masks

if TYPE_CHECKING:
    from .policy import Policy

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


def layout_from_patterns(
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
    fc, fo, fi = csr_from_counts(torch.stack([e[0] for e in per_head]), torch.cat([e[1] for e in per_head]))
    pc, po, pi = csr_from_counts(torch.stack([e[2] for e in per_head]), torch.cat([e[3] for e in per_head]))
    return BlockSparseLayout(b, n_q, n_k, h_count, causal, fc, fo, fi, pc, po, pi, sink_t, window_t, head_names=tuple(names), layer=layer)


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


def head_patterns(policy: Policy, layer: int, seq_len: int, block_size: int | None = None,
                  scores: BlockScores | None = None) -> list[Pattern]:
    """Each head's `Pattern` in ``layer`` at ``seq_len`` (dynamic heads from ``scores`` or the prior)."""
    b = check_block_size(policy.block_size if block_size is None else block_size)
    return [make() for make in _pattern_factories(policy, layer, seq_len, b, scores)]


def _pattern_factories(policy: Policy, layer: int, n: int, b: int, scores: BlockScores | None) -> list[Callable[[], Pattern]]:
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


def compile_layer(policy: Policy, layer: int, seq_len: int, block_size: int | None = None, *,
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
        out = layout_from_patterns(
            pats, n, n, b, sink=[s for s, _ in streams], window=[w for _, w in streams], causal=True, layer=layer,
            trusted=True, cache_keys=keys, cache=_cache,
        )
    out.meta = {"kinds": [e.kind for e in policy.layer(layer)], "dynamic_from": "scores" if scores is not None else "prior"}
    return out


def estimate_layer_scores(policy: Policy, layer: int, q: Tensor, k: Tensor, block_size: int | None = None) -> BlockScores:
    """`estimate_block_scores` for one layer under the rule its dynamic heads carry (the
    largest ``last_q`` of its vertical-slash heads; 64 by default). ``q [H, n, d]``, ``k [H_kv, n, d]``."""
    from .kinds import estimate_block_scores

    b = check_block_size(policy.block_size if block_size is None else block_size)
    last = [int(e.params.get("estimate", {}).get("last_q", 64)) for e in policy.layer(layer) if e.kind == "vertical_slash"]
    if not last and any(e.kind == "flexprefill" for e in policy.layer(layer)):
        last = [b]  # FlexPrefill estimates from the last block of queries
    scores = estimate_block_scores(q, k, b, last_q=max(last, default=64))
    from .policy import antidiagonal_stride

    wanted = {h: s for h, e in enumerate(policy.layer(layer)) if (s := antidiagonal_stride(e.kind, e.params)) is not None}
    if wanted:  # XAttention's antidiagonal scores, each head's row at the stride it asks for
        from .dynamic import antidiagonal_block_scores

        for stride in sorted(set(wanted.values())):
            if b % stride:
                raise PolicyError(f"layer {layer}: antidiagonal stride {stride} does not divide the block size {b}: "
                                  "use a stride that divides it (params.stride, or params.estimate.stride of block_topk)")
            at = antidiagonal_block_scores(q, k, b, stride=stride)
            if scores.antidiagonal is None:
                scores.antidiagonal = at  # heads that ask for no stride get the finest (unused by them)
            else:
                heads = [h for h, s in wanted.items() if s == stride]
                scores.antidiagonal[heads] = at[heads]
    return scores


def compile_for_input(policy: Policy, layer: int, q: Tensor, k: Tensor, block_size: int | None = None) -> BlockSparseLayout:
    """One layer compiled for one input (prefill of ``n = q.shape[-2]`` tokens): dynamic heads
    choose their blocks from this input's queries and keys."""
    n = int(q.shape[-2])
    scores = None
    if any(not get_kind(e.kind).static for e in policy.layer(layer)):
        scores = estimate_layer_scores(policy, layer, q, k, block_size)
    return compile_layer(policy, layer, n, block_size, scores=scores)


def warn_if_extrapolating(policy: Policy, seq_len: int, factor: float = EXTRAPOLATION_FACTOR) -> bool:
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


def compile_policy(policy: Policy, seq_len: int, block_size: int | None = None, *,
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
