"""The block-sparse index: the data contract between attention policies and the kernel.

An attention policy decides, per query head, which (query block, key block) tiles of the
attention map are computed. The kernel consumes that decision as a *compressed* block list,
one CSR row per (head, query block), split in two lists:

- **full** blocks, where every (query, key) pair of the ``B x B`` tile is attended, so the
  kernel runs them with no masking at all;
- **partial** blocks, where some pairs are masked (the causal diagonal, the ragged last
  block, the edge of a sliding window), so the kernel evaluates the token predicate.

The exact token-level mask an index stands for (what `token_mask_from_index` builds and the
kernel reproduces): query row ``i`` sits at absolute position ``qa = i + n_k - n_q`` (prefill
over a cache of ``n_k - n_q`` earlier tokens) and attends key ``j`` iff

1. block ``(i // B, j // B)`` is listed, full or partial, for its head ``h``;
2. ``j < n_k``;
3. not ``causal``, or ``j <= qa``;
4. ``window[h] == 0``, or ``j < sink[h]``, or ``qa - j < window[h]`` (streaming heads).

A block may be listed as full only if all ``B x B`` pairs are in bounds and pass 3 and 4; the
kernel trusts that, and `validate_index` checks it (cheaply, per listed block).

`BlockSparseIndex` is the structural type (any object with these attributes works, e.g. one
built by ``attnlab.sparsity_stats``); `BlockSparseIndexTensors` is the concrete dataclass;
`index_from_block_masks` packs dense per-block booleans into it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from attnlab.errors import AttnlabError

SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128)
INDEX_ATTRIBUTES: tuple[str, ...] = (
    "block_size", "n_q", "n_k", "n_heads", "causal",
    "full_kv_count", "full_kv_offset", "full_kv_index",
    "kv_count", "kv_offset", "kv_index",
    "sink", "window",
)  # fmt: skip
# token_mask_from_index materialises [H, n_q, n_k] booleans; past this it is a mistake.
MAX_TOKEN_MASK_ELEMENTS = 1 << 28


class KernelInputError(AttnlabError, ValueError):
    """Inputs the block-sparse kernel or its index cannot use; raised before any launch."""


# --- error messages: what was expected, what was got, how to fix it ----------------------
NOT_AN_INDEX = (
    "expected a BlockSparseIndex (an object with attributes {expected}); got {got} missing "
    "{missing}. Build one with attnlab.kernels.index_from_block_masks."
)
BLOCK_SIZE_UNSUPPORTED = (
    "index.block_size is {got}; the kernel supports block sizes {supported}. Rebuild the "
    "index with one of them."
)
INDEX_SCALAR_BAD = "index.{name} must be {expected}; got {got!r}."
INDEX_TENSOR_NOT_TENSOR = "index.{name} must be a torch.Tensor of int32; got {got}."
INDEX_TENSOR_DTYPE = (
    "index.{name} must hold integers (int32); got dtype {got}. Convert it with "
    ".to(torch.int32)."
)
INDEX_TENSOR_SHAPE = (
    "index.{name} has shape {got}; expected {expected} ({why}). The index was built for "
    "other head/block counts: rebuild it for n_heads={n_heads}, n_q={n_q}, n_k={n_k}, "
    "block_size={block_size}."
)
INDEX_NEGATIVE = "index.{name} has {count} negative entries (first: {first}); counts, offsets, sink and window must be >= 0."
INDEX_CSR_OUT_OF_RANGE = (
    "index.{prefix}_offset + index.{prefix}_count reaches {reach} but index.{prefix}_index "
    "has only {length} entries (row head={head}, q_block={q_block}). Offsets must point "
    "inside the index array."
)
INDEX_BLOCK_OUT_OF_RANGE = (
    "index.{prefix}_index lists key block {value} for head={head}, q_block={q_block}, but "
    "n_k={n_k} with block_size={block_size} has key blocks 0..{last} only "
    "({count} bad entries). Drop blocks past the end of the keys."
)
INDEX_UNSORTED = (
    "index.{prefix}_index is not strictly ascending within a row: head={head}, "
    "q_block={q_block} lists key block {prev} then {value} ({count} bad rows). Sort each "
    "row's key blocks and remove duplicates."
)
INDEX_FULL_PARTIAL_OVERLAP = (
    "key block {k_block} is listed both as full and as partial for head={head}, "
    "q_block={q_block} ({count} such blocks); it would be counted twice. List each block "
    "once."
)
INDEX_FULL_NOT_FULL = (
    "index.full_kv_index lists key block {k_block} for head={head}, q_block={q_block} as "
    "full, but some of its pairs are out of bounds or masked by the causal/sink/window "
    "predicate ({count} such blocks). The kernel skips masking in full blocks, so this would "
    "be a wrong answer: list them as partial (index_from_block_masks does this for you)."
)
BLOCK_MASK_SHAPE = (
    "{name} has shape {got}; expected a bool tensor [n_heads, q_blocks, k_blocks] = "
    "[H, {q_blocks}, {k_blocks}] for n_q={n_q}, n_k={n_k}, block_size={block_size}."
)
BLOCK_MASK_FULL_NOT_KEPT = (
    "full marks {count} blocks that kept does not (first: head={head}, q_block={q_block}, "
    "k_block={k_block}); full must be a subset of kept."
)
PER_HEAD_VALUE_BAD = (
    "{name} must be None, an int >= 0, or {n_heads} ints >= 0 (one per head); got {got}."
)
TOKEN_MASK_TOO_LARGE = (
    "token_mask_from_index would materialise {elements} booleans [H={n_heads}, n_q={n_q}, "
    "n_k={n_k}]; it is meant for small test lengths (at most {limit})."
)


@runtime_checkable
class BlockSparseIndex(Protocol):
    """What the kernel reads: per-head compressed lists of full and partial key blocks.

    Rows are the flattened (head, query block) pairs, ``r = h * QB + qb`` with
    ``QB = ceil(n_q / block_size)``; key blocks count ``KB = ceil(n_k / block_size)``.

    - ``full_kv_count``, ``full_kv_offset``: int32 ``[n_heads, QB]``; row ``r`` has its full
      key blocks at ``full_kv_index[offset : offset + count]``, strictly ascending.
    - ``full_kv_index``: int32 ``[n_full_total]``.
    - ``kv_count``, ``kv_offset``, ``kv_index``: the same for partial blocks.
    - ``sink``, ``window``: int32 ``[n_heads]``; the streaming predicate (``window == 0``:
      none) applied inside partial blocks.
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


@dataclass(frozen=True, eq=False)
class BlockSparseIndexTensors:
    """The concrete `BlockSparseIndex`: plain tensors, memory O(listed blocks).

    Build it with `index_from_block_masks`; see the module docstring for the token-level
    meaning of every field. Shapes: counts/offsets ``[n_heads, q_blocks]``, index arrays
    ``[n_listed]``, sink/window ``[n_heads]``, all int32 on one device.
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

    @property
    def q_blocks(self) -> int:
        return math.ceil(self.n_q / self.block_size)

    @property
    def k_blocks(self) -> int:
        return math.ceil(self.n_k / self.block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_count.device

    def to(self, device: torch.device | str) -> BlockSparseIndexTensors:
        """The same index with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return BlockSparseIndexTensors(
            block_size=self.block_size, n_q=self.n_q, n_k=self.n_k, n_heads=self.n_heads,
            causal=self.causal, **moved,
        )  # fmt: skip

    def blocks_per_head(self) -> torch.Tensor:
        """Computed (full + partial) blocks per head, int64 ``[n_heads]``: the kernel's work."""
        return self.full_kv_count.sum(-1, dtype=torch.int64) + self.kv_count.sum(
            -1, dtype=torch.int64
        )


_TENSOR_FIELDS = (
    "full_kv_count", "full_kv_offset", "full_kv_index", "kv_count", "kv_offset", "kv_index",
    "sink", "window",
)  # fmt: skip


class CheckedIndex(NamedTuple):
    """An index's tensors after `validate_index`: int32, contiguous, on one device."""

    full_kv_count: torch.Tensor
    full_kv_offset: torch.Tensor
    full_kv_index: torch.Tensor
    kv_count: torch.Tensor
    kv_offset: torch.Tensor
    kv_index: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor


# --- the tile predicate, evaluated analytically per block ---------------------------------
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
) -> torch.Tensor:
    """True where every pair of the ``B x B`` tile is in bounds and passes the predicate.

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
    return ok & window_ok


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
) -> torch.Tensor:
    """True where at least one in-bounds pair of the tile passes the predicate.

    Tiles where this is False contribute nothing and are never worth listing.
    """
    qa_lo, qa_hi, j_lo, j_hi = _tile_bounds(
        q_block, k_block, block_size=block_size, n_q=n_q, n_k=n_k
    )
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


# --- validation ---------------------------------------------------------------------------
def _rows_to_head_block(rows: torch.Tensor, q_blocks: int) -> tuple[int, int]:
    row = int(rows.reshape(-1)[0])
    return row // q_blocks, row % q_blocks


def csr_entries(
    count: torch.Tensor, offset: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand a CSR block list into ``(row, k_block)`` pairs, int64 ``[n_entries]`` each.

    ``count``/``offset`` are ``[H, QB]`` (flattened to rows ``h * QB + qb``); offsets must
    already be known to stay inside ``index``.
    """
    count = count.reshape(-1).to(torch.int64)
    offset = offset.reshape(-1).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    starts = torch.cumsum(count, 0) - count
    within_row = torch.arange(rows.numel(), device=count.device) - starts[rows]
    k_blocks = index.to(torch.int64)[offset[rows] + within_row]
    return rows, k_blocks


def _int_tensor(index: object, name: str, shape: tuple[int, ...], why: str, device) -> torch.Tensor:
    value = getattr(index, name)
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(INDEX_TENSOR_NOT_TENSOR.format(name=name, got=type(value).__name__))
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise KernelInputError(INDEX_TENSOR_DTYPE.format(name=name, got=value.dtype))
    if shape and tuple(value.shape) != shape:
        raise KernelInputError(
            INDEX_TENSOR_SHAPE.format(
                name=name, got=tuple(value.shape), expected=list(shape), why=why,
                n_heads=index.n_heads, n_q=index.n_q, n_k=index.n_k,  # type: ignore[attr-defined]
                block_size=index.block_size,  # type: ignore[attr-defined]
            )
        )  # fmt: skip
    if not shape and value.dim() != 1:
        raise KernelInputError(
            INDEX_TENSOR_SHAPE.format(
                name=name, got=tuple(value.shape), expected="[n_listed]", why=why,
                n_heads=index.n_heads, n_q=index.n_q, n_k=index.n_k,  # type: ignore[attr-defined]
                block_size=index.block_size,  # type: ignore[attr-defined]
            )
        )  # fmt: skip
    return value.to(device=device, dtype=torch.int64)


def _check_scalars(index: object) -> None:
    if not isinstance(index, BlockSparseIndex):
        missing = [name for name in INDEX_ATTRIBUTES if not hasattr(index, name)]
        raise KernelInputError(
            NOT_AN_INDEX.format(
                expected=", ".join(INDEX_ATTRIBUTES), got=type(index).__name__, missing=missing
            )
        )
    for name in ("block_size", "n_q", "n_k", "n_heads"):
        value = getattr(index, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KernelInputError(
                INDEX_SCALAR_BAD.format(name=name, expected="an int >= 1", got=value)
            )
    if not isinstance(index.causal, bool):
        raise KernelInputError(
            INDEX_SCALAR_BAD.format(name="causal", expected="a bool", got=index.causal)
        )
    if index.block_size not in SUPPORTED_BLOCK_SIZES:
        raise KernelInputError(
            BLOCK_SIZE_UNSUPPORTED.format(got=index.block_size, supported=SUPPORTED_BLOCK_SIZES)
        )


def validate_index(index: BlockSparseIndex, device: torch.device | str | None = None) -> CheckedIndex:
    """Check everything the kernel relies on; return the tensors as int32 on ``device``.

    Raises `KernelInputError` naming the problem and its fix: missing attributes, unsupported
    block size, wrong shapes or dtypes, negative counts, offsets past the index array, key
    blocks out of range, rows not strictly ascending, a block listed both full and partial,
    and a "full" block that is not full. Cost: O(listed blocks), a few device syncs.
    ``device`` defaults to the device of ``index.kv_count``.
    """
    _check_scalars(index)
    block_size, n_heads = index.block_size, index.n_heads
    q_blocks = math.ceil(index.n_q / block_size)
    k_blocks = math.ceil(index.n_k / block_size)
    if device is None:
        kv_count = index.kv_count
        device = kv_count.device if isinstance(kv_count, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    row_shape = (n_heads, q_blocks)
    why_rows = "one entry per (head, query block)"
    t = {
        "full_kv_count": _int_tensor(index, "full_kv_count", row_shape, why_rows, device),
        "full_kv_offset": _int_tensor(index, "full_kv_offset", row_shape, why_rows, device),
        "full_kv_index": _int_tensor(index, "full_kv_index", (), "a flat list of key blocks", device),
        "kv_count": _int_tensor(index, "kv_count", row_shape, why_rows, device),
        "kv_offset": _int_tensor(index, "kv_offset", row_shape, why_rows, device),
        "kv_index": _int_tensor(index, "kv_index", (), "a flat list of key blocks", device),
        "sink": _int_tensor(index, "sink", (n_heads,), "one per head", device),
        "window": _int_tensor(index, "window", (n_heads,), "one per head", device),
    }
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
        rows, kb = csr_entries(count, offset, flat)
        bad = (kb < 0) | (kb >= k_blocks)
        if bool(bad.any()):
            head, q_block = _rows_to_head_block(rows[bad], q_blocks)
            raise KernelInputError(
                INDEX_BLOCK_OUT_OF_RANGE.format(
                    prefix=prefix, value=int(kb[bad][0]), head=head, q_block=q_block,
                    n_k=index.n_k, block_size=block_size, last=k_blocks - 1,
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
        block_size=block_size, n_q=index.n_q, n_k=index.n_k, causal=index.causal,
    )  # fmt: skip
    if not bool(truly_full.all()):
        bad = ~truly_full
        head, q_block = _rows_to_head_block(rows[bad], q_blocks)
        raise KernelInputError(
            INDEX_FULL_NOT_FULL.format(
                k_block=int(kb[bad][0]), head=head, q_block=q_block, count=int(bad.sum())
            )
        )
    return CheckedIndex(**{name: t[name].to(torch.int32).contiguous() for name in _TENSOR_FIELDS})


# --- building an index --------------------------------------------------------------------
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


def _csr(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack bool ``[H, QB, KB]`` into (count ``[H, QB]``, offset ``[H, QB]``, index) int32."""
    n_heads, q_blocks, k_blocks = blocks.shape
    count = blocks.sum(-1, dtype=torch.int64)
    offset = torch.cumsum(count.reshape(-1), 0) - count.reshape(-1)
    # nonzero walks rows in order and columns ascending: exactly the CSR index array
    index = torch.nonzero(blocks.reshape(-1, k_blocks))[:, 1]
    return (
        count.to(torch.int32),
        offset.reshape(n_heads, q_blocks).to(torch.int32),
        index.to(torch.int32).contiguous(),
    )


def index_from_block_masks(
    kept: torch.Tensor,
    full: torch.Tensor | None,
    *,
    block_size: int,
    n_q: int,
    n_k: int,
    causal: bool,
    sink: int | Sequence[int] | torch.Tensor | None = None,
    window: int | Sequence[int] | torch.Tensor | None = None,
) -> BlockSparseIndexTensors:
    """Pack dense per-block booleans into the compressed index the kernel reads.

    ``kept`` (bool ``[H, QB, KB]``, ``QB = ceil(n_q / block_size)``, ``KB = ceil(n_k /
    block_size)``) says which tiles a head computes; ``full`` (same shape, a subset of
    ``kept``, or None) which of them the caller believes need no mask. The token predicate
    (causal, ``sink``/``window`` per head, bounds) then decides exactly:

    - a kept tile none of whose pairs survives the predicate is dropped (it adds nothing);
    - a tile is listed full only if all its pairs survive; a tile marked ``full`` that is not
      is demoted to partial, so the result never depends on ``full`` being right. With
      ``full=None`` every kept tile that is truly full is listed full.

    So ``kept = all True`` with ``causal=True`` is dense causal attention, and with
    ``sink=64, window=256`` it is a streaming head. ``sink``/``window`` are an int for all
    heads or one int per head; ``window == 0`` (default) means no streaming predicate.
    Tensors are built on ``kept``'s device. Memory of the result is O(listed blocks).
    """
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise KernelInputError(
            BLOCK_SIZE_UNSUPPORTED.format(got=block_size, supported=SUPPORTED_BLOCK_SIZES)
        )
    for name, value in (("n_q", n_q), ("n_k", n_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KernelInputError(INDEX_SCALAR_BAD.format(name=name, expected="an int >= 1", got=value))
    q_blocks, k_blocks = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
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
            block_size=block_size, n_q=n_q, n_k=n_k, causal=causal,
        )  # fmt: skip
        listed[head] = kept[head] & tile_any_attended(q_grid, k_grid, **params)
        truly_full[head] = listed[head] & tile_all_attended(q_grid, k_grid, **params)
    full_blocks = truly_full if full is None else truly_full & full
    partial_blocks = listed & ~full_blocks
    full_count, full_offset, full_index = _csr(full_blocks)
    kv_count, kv_offset, kv_index = _csr(partial_blocks)
    return BlockSparseIndexTensors(
        block_size=block_size, n_q=n_q, n_k=n_k, n_heads=n_heads, causal=causal,
        full_kv_count=full_count, full_kv_offset=full_offset, full_kv_index=full_index,
        kv_count=kv_count, kv_offset=kv_offset, kv_index=kv_index,
        sink=sink_t.to(device=device, dtype=torch.int32),
        window=window_t.to(device=device, dtype=torch.int32),
    )  # fmt: skip


def block_masks_from_index(
    index: BlockSparseIndex, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of packing: dense bool ``(listed, full)``, each ``[H, QB, KB]``.

    ``listed`` holds full and partial blocks. O(H * QB * KB) memory: for tests, plots and
    FlexAttention, not for the kernel. Built on ``device`` (default: the index's).
    """
    checked = validate_index(index, device=device)
    q_blocks = math.ceil(index.n_q / index.block_size)
    k_blocks = math.ceil(index.n_k / index.block_size)
    shape = (index.n_heads * q_blocks, k_blocks)
    device = checked.kv_count.device
    listed = torch.zeros(shape, dtype=torch.bool, device=device)
    full = torch.zeros(shape, dtype=torch.bool, device=device)
    rows, kb = csr_entries(checked.full_kv_count, checked.full_kv_offset, checked.full_kv_index)
    full[rows, kb] = True
    listed[rows, kb] = True
    rows, kb = csr_entries(checked.kv_count, checked.kv_offset, checked.kv_index)
    listed[rows, kb] = True
    return (listed.reshape(index.n_heads, q_blocks, k_blocks),
            full.reshape(index.n_heads, q_blocks, k_blocks))  # fmt: skip


def token_predicate(
    n_heads: int,
    n_q: int,
    n_k: int,
    *,
    causal: bool,
    sink: torch.Tensor,
    window: torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Conditions 2-4 of the token semantics (no block lists): bool ``[H, n_q, n_k]``."""
    q_abs = (torch.arange(n_q, device=device) + (n_k - n_q)).reshape(1, -1, 1)
    key = torch.arange(n_k, device=device).reshape(1, 1, -1)
    sink = sink.to(device=device, dtype=torch.int64).reshape(-1, 1, 1)
    window = window.to(device=device, dtype=torch.int64).reshape(-1, 1, 1)
    allowed = (window == 0) | (key < sink) | (q_abs - key < window)
    if causal:
        allowed = allowed & (key <= q_abs)
    return allowed.expand(n_heads, n_q, n_k)


def token_mask_from_index(index: BlockSparseIndex) -> torch.Tensor:
    """The exact token-level mask an index stands for: bool ``[n_heads, n_q, n_k]``.

    True = query attends key. Listed blocks (full or partial), expanded to tokens, and the
    causal/sink/window predicate of the module docstring. For small lengths only.
    """
    _check_scalars(index)
    elements = index.n_heads * index.n_q * index.n_k
    if elements > MAX_TOKEN_MASK_ELEMENTS:
        raise KernelInputError(
            TOKEN_MASK_TOO_LARGE.format(
                elements=elements, n_heads=index.n_heads, n_q=index.n_q, n_k=index.n_k,
                limit=MAX_TOKEN_MASK_ELEMENTS,
            )
        )  # fmt: skip
    listed, _ = block_masks_from_index(index)
    b = index.block_size
    tokens = listed.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)
    tokens = tokens[:, : index.n_q, : index.n_k]
    return tokens & token_predicate(
        index.n_heads, index.n_q, index.n_k, causal=index.causal,
        sink=index.sink, window=index.window, device=listed.device,
    )  # fmt: skip
