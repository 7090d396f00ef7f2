"""The block-sparse layout: the one data contract between attention policies and every executor.

An attention policy decides, per query head, which (query block, key block) tiles of the
attention map are computed. The policy compiler (``attnlab.sparsity_stats``), the exporters,
the dense reference, FlexAttention and the Triton kernel all read that decision as one
`BlockSparseLayout`: a *compressed* block list, one CSR row per (head, query block), split
in two lists:

- **full** blocks, where every (query, key) pair of the ``B x B`` tile is attended, so the
  kernel runs them with no masking at all;
- **partial** blocks, where some pairs are masked (the causal diagonal, the ragged last
  block, the edge of a sliding window), so the kernel evaluates the token predicate.

The exact token-level mask a layout stands for (what `BlockSparseLayout.token_mask` builds,
FlexAttention's ``mask_mod`` evaluates and the kernel reproduces): query row ``i`` sits at
absolute position ``qa = i + n_k - n_q`` (prefill over a cache of ``n_k - n_q`` earlier
tokens) and attends key ``j`` iff

1. block ``(i // B, j // B)`` is listed, full or partial, for its head ``h``;
2. ``j < n_k``;
3. not ``causal``, or ``j <= qa``;
4. ``window[h] == 0``, or ``j < sink[h]``, or ``qa - j < window[h]`` (streaming heads);
5. ``model_window == 0``, or ``qa - j < model_window`` (the model's own sliding window, one
   per layout: an AND on every head, Hugging Face's convention -- with window ``W`` a query
   sees itself and the ``W - 1`` keys before it, as ``sliding_window_overlay`` does).

Conditions 2-5 are `attends`, written once here for every PyTorch caller (the Triton kernel
carries the same lines in ``triton.language``). A block may be listed as full only if all
``B x B`` pairs are in bounds and pass 2-5; the kernel trusts that, and
`BlockSparseLayout.validate` checks it (cheaply, per listed block).

Build a layout from dense per-block booleans with `BlockSparseLayout.from_block_masks`, from
its arrays with `BlockSparseLayout.from_arrays`; the policy compiler builds it from patterns.
Any object with the attributes of `LAYOUT_ATTRIBUTES` is accepted where a layout is expected
(`BlockSparseLayout.coerce`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from attnlab.errors import AttnlabError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

#: Block sizes the Triton kernel compiles for (a layout itself takes any block size >= 1).
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128)
#: The index tensors of a layout, all int32: counts/offsets ``[H, QB]``, lists ``[n]``, per head ``[H]``.
TENSOR_FIELDS: tuple[str, ...] = (
    "full_kv_count", "full_kv_offset", "full_kv_index", "kv_count", "kv_offset", "kv_index",
    "sink", "window",
)  # fmt: skip
#: What an object needs to be read as a layout.
LAYOUT_ATTRIBUTES: tuple[str, ...] = ("block_size", "n_q", "n_k", "n_heads", "causal", *TENSOR_FIELDS)
#: `BlockSparseLayout.token_mask` materialises [H, n_q, n_k] booleans; past this it is a mistake.
MAX_TOKEN_MASK_ELEMENTS = 1 << 28
#: The token semantics in one line, as exported mask files carry it.
TOKEN_SEMANTICS = (
    "query i (absolute qa = i + n_k - n_q) attends key j iff block (i//B, j//B) is listed and j < n_k "
    "and j <= qa and (window[h] == 0 or j < sink[h] or qa - j < window[h])"
)
#: The model-window clause of the token semantics, appended to `TOKEN_SEMANTICS` by files that
#: carry layouts with ``model_window > 0`` (`token_semantics`).
MODEL_WINDOW_SEMANTICS = "and (model_window == 0 or qa - j < model_window)"
#: Arrays `BlockSparseLayout.to_arrays` adds only when they differ from their default (0-d int32);
#: `BlockSparseLayout.from_arrays` reads them when present, so older files load unchanged.
OPTIONAL_ARRAY_FIELDS: tuple[str, ...] = ("model_window",)


class KernelInputError(AttnlabError, ValueError):
    """A layout, or kernel inputs, that cannot be used; raised before any launch."""


def token_semantics(model_window: bool = False) -> str:
    """The token semantics in one line; with the model-window clause when ``model_window``."""
    return f"{TOKEN_SEMANTICS} {MODEL_WINDOW_SEMANTICS}" if model_window else TOKEN_SEMANTICS


# --- error messages: what was expected, what was got, how to fix it ----------------------
NOT_AN_INDEX = (
    "expected a BlockSparseLayout (an object with attributes {expected}); got {got} missing "
    "{missing}. Build one with attnlab.kernels.BlockSparseLayout.from_block_masks."
)
BLOCK_SIZE_UNSUPPORTED = (
    "layout.block_size is {got}; the kernel supports block sizes {supported}. Rebuild the "
    "layout with one of them."
)
INDEX_SCALAR_BAD = "layout.{name} must be {expected}; got {got!r}."
INDEX_TENSOR_NOT_TENSOR = "layout.{name} must be a torch.Tensor of int32; got {got}."
INDEX_TENSOR_DTYPE = (
    "layout.{name} must hold integers (int32); got dtype {got}. Convert it with "
    ".to(torch.int32)."
)
INDEX_TENSOR_SHAPE = (
    "layout.{name} has shape {got}; expected {expected} ({why}). The layout was built for "
    "other head/block counts: rebuild it for n_heads={n_heads}, n_q={n_q}, n_k={n_k}, "
    "block_size={block_size}."
)
INDEX_NEGATIVE = "layout.{name} has {count} negative entries (first: {first}); counts, offsets, sink and window must be >= 0."
INDEX_CSR_OUT_OF_RANGE = (
    "layout.{prefix}_offset + layout.{prefix}_count reaches {reach} but layout.{prefix}_index "
    "has only {length} entries (row head={head}, q_block={q_block}). Offsets must point "
    "inside the index array."
)
INDEX_BLOCK_OUT_OF_RANGE = (
    "layout.{prefix}_index lists key block {value} for head={head}, q_block={q_block}, but "
    "n_k={n_k} with block_size={block_size} has key blocks 0..{last} only "
    "({count} bad entries). Drop blocks past the end of the keys."
)
INDEX_UNSORTED = (
    "layout.{prefix}_index is not strictly ascending within a row: head={head}, "
    "q_block={q_block} lists key block {prev} then {value} ({count} bad rows). Sort each "
    "row's key blocks and remove duplicates."
)
INDEX_FULL_PARTIAL_OVERLAP = (
    "key block {k_block} is listed both as full and as partial for head={head}, "
    "q_block={q_block} ({count} such blocks); it would be counted twice. List each block "
    "once."
)
INDEX_FULL_NOT_FULL = (
    "layout.full_kv_index lists key block {k_block} for head={head}, q_block={q_block} as "
    "full, but some of its pairs are out of bounds or masked by the causal/sink/window/"
    "model-window predicate ({count} such blocks). The kernel skips masking in full blocks, so this would "
    "be a wrong answer: list them as partial (from_block_masks does this for you)."
)
BLOCK_MASK_SHAPE = (
    "{name} has shape {got}; expected a bool tensor [n_heads, q_blocks, k_blocks] = "
    "[H, {q_blocks}, {k_blocks}] for n_q={n_q}, n_k={n_k}, block_size={block_size}."
)
BLOCK_MASK_FULL_NOT_KEPT = (
    "full marks {count} blocks that kept does not (first: head={head}, q_block={q_block}, "
    "k_block={k_block}); full must be a subset of kept."
)
MODEL_WINDOW_BAD = (
    "model_window must be an int >= 0 (the model's own sliding window; 0 = none); got {got!r}."
)
SOFTCAP_BAD = (
    "softcap must be None or a finite float > 0 (scores become softcap * tanh(score / softcap)); "
    "got {got!r}."
)
SINKS_BAD = (
    "sinks must be None or a finite floating-point tensor [n_query_heads] = [{heads}] (one "
    "learned logit per query head); got {got}."
)
PER_HEAD_VALUE_BAD = (
    "{name} must be None, an int >= 0, or {n_heads} ints >= 0 (one per head); got {got}."
)
TOKEN_MASK_TOO_LARGE = (
    "token_mask would materialise {elements} booleans [H={n_heads}, n_q={n_q}, "
    "n_k={n_k}]; it is meant for small test lengths (at most {limit})."
)


# --- the score variants every executor takes: soft-capping and learned sinks ---------------
def check_softcap(softcap: object) -> float | None:
    """``softcap`` as a float > 0, or None; `KernelInputError` for anything else."""
    if softcap is None:
        return None
    if (
        isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
        or not math.isfinite(softcap) or softcap <= 0
    ):  # fmt: skip
        raise KernelInputError(SOFTCAP_BAD.format(got=softcap))
    return float(softcap)


def check_sinks(sinks: object, q_heads: int) -> torch.Tensor | None:
    """``sinks`` (float ``[q_heads]``, finite) as given, or None; `KernelInputError` otherwise."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise KernelInputError(SINKS_BAD.format(heads=q_heads, got=type(sinks).__name__))
    if not sinks.is_floating_point() or tuple(sinks.shape) != (q_heads,):
        got = f"shape {tuple(sinks.shape)}, dtype {sinks.dtype}"
        raise KernelInputError(SINKS_BAD.format(heads=q_heads, got=got))
    if not bool(torch.isfinite(sinks).all()):
        raise KernelInputError(SINKS_BAD.format(heads=q_heads, got="non-finite values"))
    return sinks


# --- the token predicate: conditions 2-5, the one definition ------------------------------
def attends(
    q_abs: torch.Tensor,
    key: torch.Tensor,
    *,
    n_k: int,
    sink: torch.Tensor,
    window: torch.Tensor,
    causal: bool,
    model_window: int = 0,
) -> torch.Tensor:
    """Whether query at absolute position ``q_abs`` may attend key ``key`` (conditions 2-5).

    Bounds, causality, the per-head streaming rule and the model's own sliding window
    (``model_window``, 0 = none); block membership (condition 1) is the caller's. Arguments
    broadcast together, so the same expression serves a dense ``[H, n_q, n_k]`` mask and
    FlexAttention's per-element ``mask_mod``.
    """
    keep = (key < n_k) & ((window == 0) | (key < sink) | (q_abs - key < window))
    if causal:
        keep = keep & (key <= q_abs)
    if model_window:
        keep = keep & (q_abs - key < model_window)
    return keep


# --- the same predicate, evaluated analytically per tile ----------------------------------
def _tile_bounds(
    q_block: torch.Tensor, k_block: torch.Tensor, *, block_size: int, n_q: int, n_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absolute query positions and key positions a tile spans, clipped to the sequence.

    Returns ``(qa_lo, qa_hi, j_lo, j_hi)``, inclusive, broadcast like the inputs.
    """
    offset = n_k - n_q
    qa_lo = q_block * block_size + offset
    qa_hi = torch.clamp((q_block + 1) * block_size, max=n_q) - 1 + offset
    j_lo = k_block * block_size
    j_hi = torch.clamp((k_block + 1) * block_size, max=n_k) - 1
    return qa_lo, qa_hi, j_lo, j_hi


def tile_all_attended(
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    *,
    block_size: int,
    n_q: int,
    n_k: int,
    causal: bool,
    model_window: int = 0,
) -> torch.Tensor:
    """True where every pair of the ``B x B`` tile is in bounds and passes `attends`.

    These are the tiles that may be listed as full. Arguments broadcast together (int64).
    """
    in_bounds = ((q_block + 1) * block_size <= n_q) & ((k_block + 1) * block_size <= n_k)
    qa_lo, qa_hi, j_lo, j_hi = _tile_bounds(
        q_block, k_block, block_size=block_size, n_q=n_q, n_k=n_k
    )
    ok = in_bounds
    if causal:
        # the tile's last key must precede its first query
        ok = ok & (j_hi <= qa_lo)
    # Streaming: keys below the sink always pass; for the others the farthest pair (last
    # query, first non-sink key) decides. qa - j may be negative without causal: that passes.
    first_non_sink = torch.maximum(j_lo, sink)
    all_sink = first_non_sink > j_hi
    window_ok = (window == 0) | all_sink | (qa_hi - first_non_sink < window)
    if model_window:
        # the model's window holds for every pair iff it holds for the farthest one
        window_ok = window_ok & (qa_hi - j_lo < model_window)
    return ok & window_ok


def _pair_within(
    j_lo: torch.Tensor, j_hi: torch.Tensor, qa_lo: torch.Tensor, qa_hi: torch.Tensor,
    width: torch.Tensor | int, *, causal: bool,
) -> torch.Tensor:
    """Whether some key ``j`` in ``[j_lo, j_hi]`` and query ``qa`` in ``[qa_lo, qa_hi]`` have
    ``qa - j < width`` (and ``j <= qa`` when ``causal``); an empty key range has none."""
    if causal:
        # j in [max(j_lo, qa_lo - width + 1), min(j_hi, qa_hi)], then qa = max(qa_lo, j)
        return torch.maximum(j_lo, qa_lo - width + 1) <= torch.minimum(j_hi, qa_hi)
    # without causal the closest pair is (qa_lo, j_hi)
    return (j_lo <= j_hi) & (j_hi >= qa_lo - width + 1)


def tile_any_attended(
    q_block: torch.Tensor,
    k_block: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    *,
    block_size: int,
    n_q: int,
    n_k: int,
    causal: bool,
    model_window: int = 0,
) -> torch.Tensor:
    """True where at least one in-bounds pair of the tile passes `attends`.

    Tiles where this is False contribute nothing and are never worth listing.
    """
    qa_lo, qa_hi, j_lo, j_hi = _tile_bounds(
        q_block, k_block, block_size=block_size, n_q=n_q, n_k=n_k
    )
    if model_window:
        # Every pair must be within the model's window; streaming heads add their own window
        # (the narrower one binds) except on sink keys, which only the model's window limits.
        window = torch.as_tensor(window)
        width = torch.where(window == 0, model_window, torch.clamp(window, max=model_window))
        hit = _pair_within(j_lo, j_hi, qa_lo, qa_hi, width, causal=causal)
        sink_hit = _pair_within(j_lo, torch.minimum(j_hi, sink - 1), qa_lo, qa_hi, model_window, causal=causal)
        return hit | ((window != 0) & sink_hit)
    causal_ok = (j_lo <= qa_hi) if causal else torch.ones_like(j_lo, dtype=torch.bool)
    # a sink key j_lo < sink passes the window test for every query
    sink_hit = (j_lo < sink) & causal_ok
    if causal:
        # need j in [j_lo, j_hi], j <= qa_hi, and j >= qa_lo - window + 1 (then qa = max(qa_lo, j))
        window_hit = torch.maximum(j_lo, qa_lo - window + 1) <= torch.minimum(j_hi, qa_hi)
    else:
        # without causal, qa - j < window holds for the tile's last key if it holds at all
        window_hit = j_hi >= qa_lo - window + 1
    return torch.where(window == 0, causal_ok, sink_hit | window_hit)


# --- CSR packing and unpacking ------------------------------------------------------------
def csr_entries(
    count: torch.Tensor, offset: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand a CSR block list into ``(row, position in row, k_block)``, int64 ``[n_entries]``.

    ``count``/``offset`` are ``[H, QB]`` (flattened to rows ``h * QB + qb``); offsets must
    already be known to stay inside ``index``.
    """
    count = count.reshape(-1).to(torch.int64)
    offset = offset.reshape(-1).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    starts = torch.cumsum(count, 0) - count
    within_row = torch.arange(rows.numel(), device=count.device) - starts[rows]
    k_blocks = index.to(torch.int64)[offset[rows] + within_row]
    return rows, within_row, k_blocks


def csr_from_counts(count: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, offset, index)`` int32 with offsets the running sum of ``count`` ``[H, QB]``."""
    flat = count.reshape(-1).to(torch.int64)
    offset = (torch.cumsum(flat, 0) - flat).reshape(count.shape)
    return count.to(torch.int32), offset.to(torch.int32), index.to(torch.int32).contiguous()


def _csr(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack bool ``[H, QB, KB]`` into (count ``[H, QB]``, offset ``[H, QB]``, index) int32."""
    k_blocks = blocks.shape[-1]
    # nonzero walks rows in order and columns ascending: exactly the CSR index array
    index = torch.nonzero(blocks.reshape(-1, k_blocks))[:, 1]
    return csr_from_counts(blocks.sum(-1, dtype=torch.int64), index)


def _per_head(value: int | Sequence[int] | torch.Tensor | None, name: str, n_heads: int) -> torch.Tensor:
    if value is None:
        return torch.zeros(n_heads, dtype=torch.int64)
    tensor = torch.as_tensor(value).to("cpu")
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise KernelInputError(PER_HEAD_VALUE_BAD.format(name=name, n_heads=n_heads, got=value))
    if tensor.dim() == 0:
        tensor = tensor.expand(n_heads)
    if tuple(tensor.shape) != (n_heads,) or bool((tensor < 0).any()):
        raise KernelInputError(PER_HEAD_VALUE_BAD.format(name=name, n_heads=n_heads, got=value))
    return tensor.to(torch.int64)


def _check_length(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KernelInputError(INDEX_SCALAR_BAD.format(name=name, expected="an int >= 1", got=value))


# --- the layout ---------------------------------------------------------------------------
@dataclass(eq=False)
class BlockSparseLayout:
    """One layer's block-sparse mask: per head and query block, the key blocks to compute.

    CSR over flattened ``(head, q_block)`` rows ``r = h * QB + qb`` (``QB = ceil(n_q / B)``,
    ``KB = ceil(n_k / B)``), key blocks strictly ascending within a row:

    - ``full_kv_count``, ``full_kv_offset``: int32 ``[n_heads, QB]``; row ``r`` has its full
      key blocks at ``full_kv_index[offset : offset + count]``.
    - ``full_kv_index``: int32 ``[n_full]``.
    - ``kv_count``, ``kv_offset``, ``kv_index``: the same for partial blocks.
    - ``sink``, ``window``: int32 ``[n_heads]``; the streaming predicate (``window == 0``:
      none) applied inside partial blocks.
    - ``model_window``: a plain int, the model's own sliding window for this layer (0: none),
      ANDed with every head's predicate (condition 5 of the module docstring).

    ``head_names``, ``layer`` and ``meta`` describe where it came from (the policy compiler
    fills them); executors ignore them. See the module docstring for the token semantics.
    Memory is O(listed blocks + heads x query blocks).
    """

    block_size: int
    n_q: int
    n_k: int
    n_heads: int
    causal: bool
    full_kv_count: torch.Tensor
    full_kv_offset: torch.Tensor
    full_kv_index: torch.Tensor
    kv_count: torch.Tensor
    kv_offset: torch.Tensor
    kv_index: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    head_names: tuple[str, ...] = ()
    layer: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # last, so positional construction written before it existed still lines up
    model_window: int = 0

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

    @property
    def device(self) -> torch.device:
        return self.kv_count.device

    # -- construction --------------------------------------------------------------------
    @classmethod
    def coerce(cls, layout: object) -> BlockSparseLayout:
        """``layout`` itself, or a layout made of the attributes of any object that has them
        (`LAYOUT_ATTRIBUTES`); `KernelInputError` naming the missing ones otherwise."""
        if isinstance(layout, cls):
            return layout
        missing = [name for name in LAYOUT_ATTRIBUTES if not hasattr(layout, name)]
        if missing:
            raise KernelInputError(
                NOT_AN_INDEX.format(
                    expected=", ".join(LAYOUT_ATTRIBUTES), got=type(layout).__name__, missing=missing
                )
            )
        return cls(
            **{name: getattr(layout, name) for name in LAYOUT_ATTRIBUTES},
            model_window=getattr(layout, "model_window", 0),
            head_names=tuple(getattr(layout, "head_names", ()) or ()),
            layer=getattr(layout, "layer", None),
        )

    @classmethod
    def from_block_masks(
        cls,
        kept: torch.Tensor,
        full: torch.Tensor | None = None,
        *,
        block_size: int,
        n_q: int,
        n_k: int,
        causal: bool = True,
        sink: int | Sequence[int] | torch.Tensor | None = None,
        window: int | Sequence[int] | torch.Tensor | None = None,
        layer: int | None = None,
        head_names: Sequence[str] = (),
        model_window: int = 0,
    ) -> BlockSparseLayout:
        """Pack dense per-block booleans into a layout.

        ``kept`` (bool ``[H, QB, KB]``) says which tiles a head computes; ``full`` (same
        shape, a subset of ``kept``, or None) which of them the caller believes need no mask.
        The token predicate (causal, ``sink``/``window`` per head, bounds) then decides
        exactly:

        - a kept tile none of whose pairs survives the predicate is dropped (it adds nothing);
        - a tile is listed full only if all its pairs survive; a tile marked ``full`` that is
          not is demoted to partial, so the result never depends on ``full`` being right.
          With ``full=None`` every kept tile that is truly full is listed full.

        So ``kept = all True`` with ``causal=True`` is dense causal attention, and with
        ``sink=64, window=256`` it is a streaming head. ``sink``/``window`` are an int for all
        heads or one int per head; ``window == 0`` (default) means no streaming predicate.
        ``model_window`` (an int, 0 = none) is the model's own sliding window, ANDed with
        every head's predicate: tiles wholly outside it are dropped like any other tile with
        no surviving pair. Tensors are built on ``kept``'s device. Memory of the result is O(listed blocks).
        """
        for name, value in (("block_size", block_size), ("n_q", n_q), ("n_k", n_k)):
            _check_length(name, value)
        model_window = _check_model_window(model_window)
        q_blocks, k_blocks = -(-n_q // block_size), -(-n_k // block_size)
        for name, mask in (("kept", kept), ("full", full)):
            if mask is None:
                continue
            if (
                not isinstance(mask, torch.Tensor)
                or mask.dtype != torch.bool
                or mask.dim() != 3
                or tuple(mask.shape[1:]) != (q_blocks, k_blocks)
                or mask.shape[0] != kept.shape[0]
            ):
                raise KernelInputError(
                    BLOCK_MASK_SHAPE.format(
                        name=name, got=getattr(mask, "shape", type(mask).__name__),
                        q_blocks=q_blocks, k_blocks=k_blocks, n_q=n_q, n_k=n_k,
                        block_size=block_size,
                    )
                )  # fmt: skip
        if full is not None:
            extra = full & ~kept
            if bool(extra.any()):
                head, q_block, k_block = (int(x) for x in torch.nonzero(extra)[0])
                raise KernelInputError(
                    BLOCK_MASK_FULL_NOT_KEPT.format(
                        count=int(extra.sum()), head=head, q_block=q_block, k_block=k_block
                    )
                )
        n_heads = kept.shape[0]
        device = kept.device
        sink_t = _per_head(sink, "sink", n_heads)
        window_t = _per_head(window, "window", n_heads)

        q_grid = torch.arange(q_blocks, device=device).reshape(-1, 1)
        k_grid = torch.arange(k_blocks, device=device).reshape(1, -1)
        listed = torch.empty_like(kept)
        truly_full = torch.empty_like(kept)
        # one head at a time: the int64 grids of a 128k-token head are ~2k x 2k, all heads ~1 GB
        for head in range(n_heads):
            params = dict(
                sink=sink_t[head].to(device), window=window_t[head].to(device),
                block_size=block_size, n_q=n_q, n_k=n_k, causal=causal, model_window=model_window,
            )  # fmt: skip
            listed[head] = kept[head] & tile_any_attended(q_grid, k_grid, **params)
            truly_full[head] = listed[head] & tile_all_attended(q_grid, k_grid, **params)
        full_blocks = truly_full if full is None else truly_full & full
        partial_blocks = listed & ~full_blocks
        full_count, full_offset, full_index = _csr(full_blocks)
        kv_count, kv_offset, kv_index = _csr(partial_blocks)
        return cls(
            block_size=block_size, n_q=n_q, n_k=n_k, n_heads=n_heads, causal=causal,
            full_kv_count=full_count, full_kv_offset=full_offset, full_kv_index=full_index,
            kv_count=kv_count, kv_offset=kv_offset, kv_index=kv_index,
            sink=sink_t.to(device=device, dtype=torch.int32),
            window=window_t.to(device=device, dtype=torch.int32), model_window=model_window,
            head_names=tuple(head_names), layer=layer,
        )  # fmt: skip

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, torch.Tensor],
        *,
        block_size: int,
        n_q: int,
        n_k: int,
        causal: bool = True,
        layer: int | None = None,
        head_names: Sequence[str] = (),
        model_window: int | None = None,
    ) -> BlockSparseLayout:
        """Inverse of `to_arrays` (as exporters store them); validates the result.

        ``model_window`` None reads the optional ``"model_window"`` array (one integer; absent
        in files written before it existed: 0); an int overrides it.
        """
        tensors = {name: torch.as_tensor(arrays[name]).to(torch.int32) for name in TENSOR_FIELDS}
        n_heads = int(tensors["sink"].numel())
        tensors["sink"] = tensors["sink"].reshape(n_heads)
        tensors["window"] = tensors["window"].reshape(n_heads)
        if model_window is None:
            model_window = _model_window_from_array(arrays.get("model_window"))
        layout = cls(block_size=block_size, n_q=n_q, n_k=n_k, n_heads=n_heads, causal=causal, **tensors,
                     model_window=model_window, head_names=tuple(head_names), layer=layer)  # fmt: skip
        return layout.validate()

    def _with_tensors(self, tensors: dict[str, torch.Tensor]) -> BlockSparseLayout:
        return BlockSparseLayout(
            block_size=self.block_size, n_q=self.n_q, n_k=self.n_k, n_heads=self.n_heads,
            causal=self.causal, **tensors, model_window=self.model_window,
            head_names=self.head_names, layer=self.layer, meta=dict(self.meta),
        )  # fmt: skip

    def to(self, device: torch.device | str) -> BlockSparseLayout:
        """The same layout with every tensor int32, contiguous, on ``device`` (contents trusted)."""
        return self._with_tensors({
            name: getattr(self, name).to(device=device, dtype=torch.int32).contiguous()
            for name in TENSOR_FIELDS
        })  # fmt: skip

    # -- conversions ---------------------------------------------------------------------
    def to_arrays(self) -> dict[str, torch.Tensor]:
        """The index tensors by contract name (`TENSOR_FIELDS`), contiguous (for exporters),
        plus ``"model_window"`` (0-d int32) when it is not 0, so a layout without one
        exports exactly the arrays it always did (`OPTIONAL_ARRAY_FIELDS`)."""
        arrays = {name: getattr(self, name).contiguous() for name in TENSOR_FIELDS}
        if self.model_window:
            arrays["model_window"] = torch.tensor(self.model_window, dtype=torch.int32)
        return arrays

    def padded(self) -> dict[str, torch.Tensor]:
        """FlexAttention's padded form: ``kv_num_blocks [1, H, QB]``, ``kv_indices [1, H, QB, KB]``
        and ``full_kv_num_blocks``, ``full_kv_indices``; unused trailing slots hold 0."""
        out = {}
        for prefix in ("kv", "full_kv"):
            count = getattr(self, f"{prefix}_count")
            rows, within, k_blocks = csr_entries(count, getattr(self, f"{prefix}_offset"), getattr(self, f"{prefix}_index"))
            indices = torch.zeros(self.n_heads * self.n_q_blocks, self.n_k_blocks, dtype=torch.int32, device=count.device)
            indices[rows, within] = k_blocks.to(torch.int32)
            out[f"{prefix}_num_blocks"] = count.to(torch.int32)[None].contiguous()
            out[f"{prefix}_indices"] = indices.reshape(1, self.n_heads, self.n_q_blocks, self.n_k_blocks)
        return out

    def to_flex_block_mask(self, device: torch.device | str | None = None) -> BlockMask:
        """A FlexAttention ``BlockMask`` of this layout (`attnlab.kernels.flex.flex_block_mask`)."""
        from attnlab.kernels.flex import flex_block_mask

        return flex_block_mask(self, device=device)

    # -- dense views (small lengths, tests, plots, FlexAttention) -------------------------
    def _dense(self, prefix: str) -> torch.Tensor:
        out = torch.zeros(self.n_heads * self.n_q_blocks, self.n_k_blocks, dtype=torch.bool, device=self.device)
        rows, _, k_blocks = csr_entries(
            getattr(self, f"{prefix}_count"), getattr(self, f"{prefix}_offset"), getattr(self, f"{prefix}_index")
        )
        out[rows, k_blocks] = True
        return out.reshape(self.n_heads, self.n_q_blocks, self.n_k_blocks)

    def full_block_mask(self) -> torch.Tensor:
        """Bool ``[H, QB, KB]``: tiles computed without a mask."""
        return self._dense("full_kv")

    def partial_block_mask(self) -> torch.Tensor:
        """Bool ``[H, QB, KB]``: tiles computed with the token predicate."""
        return self._dense("kv")

    def block_mask(self) -> torch.Tensor:
        """Bool ``[H, QB, KB]``: every tile computed (full or partial), condition 1."""
        return self.full_block_mask() | self.partial_block_mask()

    def token_mask(self) -> torch.Tensor:
        """The exact token-level mask of the contract: bool ``[n_heads, n_q, n_k]``, True =
        query attends key. Listed blocks expanded to tokens AND `attends`. Small lengths only."""
        elements = self.n_heads * self.n_q * self.n_k
        if elements > MAX_TOKEN_MASK_ELEMENTS:
            raise KernelInputError(
                TOKEN_MASK_TOO_LARGE.format(
                    elements=elements, n_heads=self.n_heads, n_q=self.n_q, n_k=self.n_k,
                    limit=MAX_TOKEN_MASK_ELEMENTS,
                )
            )  # fmt: skip
        b, device = self.block_size, self.device
        listed = self.block_mask().repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)
        q_abs = (torch.arange(self.n_q, device=device) + self.q_offset).reshape(1, -1, 1)
        key = torch.arange(self.n_k, device=device).reshape(1, 1, -1)
        per_head = dict(
            sink=self.sink.to(device=device, dtype=torch.int64).reshape(-1, 1, 1),
            window=self.window.to(device=device, dtype=torch.int64).reshape(-1, 1, 1),
        )  # fmt: skip
        return listed[:, : self.n_q, : self.n_k] & attends(
            q_abs, key, n_k=self.n_k, causal=self.causal, model_window=self.model_window, **per_head
        )

    # -- counts --------------------------------------------------------------------------
    def kept_blocks(self) -> torch.Tensor:
        """Computed (full + partial) tiles per head, int64 ``[n_heads]``: the kernel's work."""
        return self.full_kv_count.sum(-1, dtype=torch.int64) + self.kv_count.sum(-1, dtype=torch.int64)

    def causal_blocks(self) -> int:
        """Tiles a dense (causal) kernel computes: those holding at least one attending pair.

        With a ``model_window`` that is the windowed dense cost: tiles holding a pair the
        model's own window (and causality) lets through.
        """
        if self.model_window:
            qb = torch.arange(self.n_q_blocks).reshape(-1, 1)
            kb = torch.arange(self.n_k_blocks).reshape(1, -1)
            zero = torch.zeros((), dtype=torch.int64)
            return int(tile_any_attended(
                qb, kb, zero, zero, block_size=self.block_size, n_q=self.n_q, n_k=self.n_k,
                causal=self.causal, model_window=self.model_window,
            ).sum())  # fmt: skip
        if not self.causal:
            return self.n_q_blocks * self.n_k_blocks
        b = self.block_size
        qb = torch.arange(self.n_q_blocks)
        q_hi = torch.clamp(qb * b + b, max=self.n_q) - 1 + self.q_offset
        return int((q_hi // b + 1).clamp(min=0, max=self.n_k_blocks).sum())

    @property
    def density(self) -> torch.Tensor:
        """Per head, float64 ``[H]``: computed tiles / the tiles dense causal attention computes.

        Block-level (what a block-sparse kernel pays). `token_density` counts token pairs.
        """
        return self.kept_blocks().cpu().to(torch.float64) / max(1, self.causal_blocks())

    def token_density(self) -> torch.Tensor:
        """Per head, float64 ``[H]``: attending token pairs / causal token pairs (small lengths).

        With a ``model_window``, over the pairs the model's own window lets through."""
        tm = self.token_mask()
        i = torch.arange(self.n_q, device=tm.device)[:, None] + self.q_offset
        j = torch.arange(self.n_k, device=tm.device)[None, :]
        if self.model_window:
            visible = (i - j < self.model_window) & ((j <= i) if self.causal else True)
            total = int(visible.sum())
        else:
            total = int((j <= i).sum()) if self.causal else self.n_q * self.n_k
        return tm.sum((-1, -2)).cpu().to(torch.float64) / max(1, total)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index tensors (O(kept blocks + heads x query blocks))."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in TENSOR_FIELDS)

    # -- checks --------------------------------------------------------------------------
    def validate(self, device: torch.device | str | None = None) -> BlockSparseLayout:
        """Check everything an executor relies on; return the layout as int32 on ``device``.

        Raises `KernelInputError` naming the problem and its fix: bad scalars, wrong shapes or
        dtypes, negative counts, offsets past the index array, key blocks out of range, rows
        not strictly ascending, a block listed both full and partial, and a "full" block that
        is not full. Cost: O(listed blocks), a few device syncs. ``device`` defaults to the
        device of ``kv_count``.
        """
        _check_scalars(self)
        if device is None:
            kv_count = self.kv_count
            device = kv_count.device if isinstance(kv_count, torch.Tensor) else torch.device("cpu")
        t = _checked_tensors(self, torch.device(device))
        return self._with_tensors({name: t[name].to(torch.int32).contiguous() for name in TENSOR_FIELDS})

    def equals(self, other: BlockSparseLayout) -> bool:
        """Same geometry, same index tensors, same sink/window and model window."""
        scalars = ("block_size", "n_q", "n_k", "n_heads", "causal", "model_window")
        if any(getattr(self, a) != getattr(other, a) for a in scalars):
            return False
        return all(
            torch.equal(getattr(self, a).to(torch.int32).cpu(), getattr(other, a).to(torch.int32).cpu())
            for a in TENSOR_FIELDS
        )

    def __repr__(self) -> str:
        dens = ", ".join(f"{d:.3f}" for d in self.density.tolist())
        return (f"BlockSparseLayout(layer={self.layer}, heads={self.n_heads}, n_q={self.n_q}, n_k={self.n_k}, "
                f"B={self.block_size}, causal={self.causal}, "
                + (f"model_window={self.model_window}, " if self.model_window else "")
                + f"density=[{dens}])")


# --- validation ---------------------------------------------------------------------------
def _rows_to_head_block(rows: torch.Tensor, q_blocks: int) -> tuple[int, int]:
    row = int(rows.reshape(-1)[0])
    return row // q_blocks, row % q_blocks


def _check_scalars(layout: BlockSparseLayout) -> None:
    for name in ("block_size", "n_q", "n_k", "n_heads"):
        _check_length(name, getattr(layout, name))
    if not isinstance(layout.causal, bool):
        raise KernelInputError(INDEX_SCALAR_BAD.format(name="causal", expected="a bool", got=layout.causal))
    _check_model_window(layout.model_window)


def _check_model_window(value: object) -> int:
    """``value`` as a plain int >= 0 (numpy and torch integers accepted), else KernelInputError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise KernelInputError(MODEL_WINDOW_BAD.format(got=value))
    return int(value)


def _model_window_from_array(value: object) -> int:
    """The ``model_window`` array of an exported layout as an int (absent: 0)."""
    if value is None:
        return 0
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
        got = f"an array of shape {tuple(tensor.shape)}, dtype {tensor.dtype}"
        raise KernelInputError(MODEL_WINDOW_BAD.format(got=got))
    return int(tensor.reshape(()))


def _int_tensor(layout: BlockSparseLayout, name: str, shape: tuple[int, ...], why: str, device: torch.device) -> torch.Tensor:
    value = getattr(layout, name)
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(INDEX_TENSOR_NOT_TENSOR.format(name=name, got=type(value).__name__))
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise KernelInputError(INDEX_TENSOR_DTYPE.format(name=name, got=value.dtype))
    if (shape and tuple(value.shape) != shape) or (not shape and value.dim() != 1):
        raise KernelInputError(
            INDEX_TENSOR_SHAPE.format(
                name=name, got=tuple(value.shape), expected=list(shape) if shape else "[n_listed]",
                why=why, n_heads=layout.n_heads, n_q=layout.n_q, n_k=layout.n_k,
                block_size=layout.block_size,
            )
        )  # fmt: skip
    return value.to(device=device, dtype=torch.int64)


def _checked_tensors(layout: BlockSparseLayout, device: torch.device) -> dict[str, torch.Tensor]:
    """The index tensors as int64 on ``device``, after every check of `BlockSparseLayout.validate`."""
    block_size, n_heads = layout.block_size, layout.n_heads
    q_blocks, k_blocks = layout.n_q_blocks, layout.n_k_blocks
    row_shape = (n_heads, q_blocks)
    why_rows = "one entry per (head, query block)"
    shapes = {
        "full_kv_count": (row_shape, why_rows), "full_kv_offset": (row_shape, why_rows),
        "full_kv_index": ((), "a flat list of key blocks"),
        "kv_count": (row_shape, why_rows), "kv_offset": (row_shape, why_rows),
        "kv_index": ((), "a flat list of key blocks"),
        "sink": ((n_heads,), "one per head"), "window": ((n_heads,), "one per head"),
    }  # fmt: skip
    t = {name: _int_tensor(layout, name, shape, why, device) for name, (shape, why) in shapes.items()}
    for name in ("full_kv_count", "full_kv_offset", "kv_count", "kv_offset", "sink", "window"):
        negative = t[name] < 0
        if bool(negative.any()):
            raise KernelInputError(
                INDEX_NEGATIVE.format(
                    name=name, count=int(negative.sum()), first=int(t[name][negative][0])
                )
            )

    entries = {}
    for prefix in ("full_kv", "kv"):
        count, offset, flat = t[f"{prefix}_count"], t[f"{prefix}_offset"], t[f"{prefix}_index"]
        reach = offset + count
        # an empty row reads nothing, so its offset may be anything non-negative
        past = (count > 0) & (reach > flat.numel())
        if bool(past.any()):
            rows = torch.nonzero(past.reshape(-1))
            head, q_block = _rows_to_head_block(rows, q_blocks)
            raise KernelInputError(
                INDEX_CSR_OUT_OF_RANGE.format(
                    prefix=prefix, reach=int(reach.reshape(-1)[rows[0]]), length=flat.numel(),
                    head=head, q_block=q_block,
                )
            )  # fmt: skip
        rows, _, kb = csr_entries(count, offset, flat)
        bad = (kb < 0) | (kb >= k_blocks)
        if bool(bad.any()):
            head, q_block = _rows_to_head_block(rows[bad], q_blocks)
            raise KernelInputError(
                INDEX_BLOCK_OUT_OF_RANGE.format(
                    prefix=prefix, value=int(kb[bad][0]), head=head, q_block=q_block,
                    n_k=layout.n_k, block_size=block_size, last=k_blocks - 1,
                    count=int(bad.sum()),
                )
            )  # fmt: skip
        same_row = rows[1:] == rows[:-1]
        not_ascending = same_row & (kb[1:] <= kb[:-1])
        if bool(not_ascending.any()):
            where = torch.nonzero(not_ascending).reshape(-1)
            head, q_block = _rows_to_head_block(rows[1:][where], q_blocks)
            raise KernelInputError(
                INDEX_UNSORTED.format(
                    prefix=prefix, head=head, q_block=q_block, prev=int(kb[where[0]]),
                    value=int(kb[where[0] + 1]), count=int(torch.unique(rows[1:][where]).numel()),
                )
            )  # fmt: skip
        entries[prefix] = (rows, kb)

    # Each list is strictly ascending per row, so a repeated (row, block) key means overlap.
    keys = torch.cat([entries["full_kv"][0] * k_blocks + entries["full_kv"][1],
                      entries["kv"][0] * k_blocks + entries["kv"][1]])  # fmt: skip
    unique_keys, key_counts = torch.unique(keys, return_counts=True)
    if bool((key_counts > 1).any()):
        doubled = unique_keys[key_counts > 1]
        row, k_block = int(doubled[0]) // k_blocks, int(doubled[0]) % k_blocks
        raise KernelInputError(
            INDEX_FULL_PARTIAL_OVERLAP.format(
                k_block=k_block, head=row // q_blocks, q_block=row % q_blocks,
                count=doubled.numel(),
            )
        )  # fmt: skip

    rows, kb = entries["full_kv"]
    heads = rows // q_blocks
    truly_full = tile_all_attended(
        rows % q_blocks, kb, t["sink"][heads], t["window"][heads],
        block_size=block_size, n_q=layout.n_q, n_k=layout.n_k, causal=layout.causal,
        model_window=layout.model_window,
    )  # fmt: skip
    if not bool(truly_full.all()):
        bad = ~truly_full
        head, q_block = _rows_to_head_block(rows[bad], q_blocks)
        raise KernelInputError(
            INDEX_FULL_NOT_FULL.format(
                k_block=int(kb[bad][0]), head=head, q_block=q_block, count=int(bad.sum())
            )
        )
    return t
