"""FlexAttention as a second executor of a `BlockSparseIndex` (CPU through Inductor, or GPU).

`flex_block_mask_from_index` turns the index into a FlexAttention ``BlockMask`` with the same
split: our full blocks become Flex's ``full_kv_*`` (no ``mask_mod`` call), our partial blocks
its ``kv_*`` (``mask_mod`` = the token predicate: bounds, causal, sink/window). The result
computes exactly the mask `token_mask_from_index` describes, so it doubles as a baseline in
the kernel benchmark and as a portable executor where Triton is unavailable.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from attnlab.kernels.index import BlockSparseIndex, block_masks_from_index

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_COMPILED_FLEX: dict[str, Any] = {}


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[H, QB, KB]`` -> Flex's (num_blocks ``[1, H, QB]``, indices ``[1, H, QB, KB]``).

    Listed key blocks come first in each row, ascending; the rest of a row is padding that
    Flex never reads (its count stops before it).
    """
    as_int = blocks.to(torch.int32)
    num_blocks = as_int.sum(-1, dtype=torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks.unsqueeze(0).contiguous(), indices.unsqueeze(0).contiguous()


def flex_block_mask_from_index(
    index: BlockSparseIndex, device: torch.device | str | None = None
) -> BlockMask:
    """A FlexAttention ``BlockMask`` for ``index`` (batch dimension 1, broadcast over batch).

    Built on ``device`` (default: the index's) with ``BLOCK_SIZE = (block_size, block_size)``
    and ``seq_lengths = (n_q, n_k)``. Uses O(H * QB * KB) memory, as every BlockMask does.
    On GPU, FlexAttention's kernel tile must divide ``block_size``: use 64 or 128.
    """
    from torch.nn.attention.flex_attention import BlockMask

    listed, full = block_masks_from_index(index, device=device)
    partial = listed & ~full
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)

    device = listed.device
    sink = index.sink.to(device=device, dtype=torch.int64)
    window = index.window.to(device=device, dtype=torch.int64)
    offset, n_k, causal = index.n_k - index.n_q, index.n_k, index.causal
    block = index.block_size

    def block_sparse_index_predicate(b, h, q_idx, kv_idx):
        # The full token semantics of BlockSparseIndex. Compiled Flex calls it in partial
        # blocks only (where the block lookup is always True); eager Flex ignores the block
        # lists and evaluates it everywhere, so it must carry the block lookup too.
        q_abs = q_idx + offset
        keep = listed[h, q_idx // block, kv_idx // block] & (kv_idx < n_k)
        if causal:
            keep = keep & (kv_idx <= q_abs)
        streaming = (kv_idx < sink[h]) | (q_abs - kv_idx < window[h])
        return keep & ((window[h] == 0) | streaming)

    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=(index.block_size, index.block_size),
        mask_mod=block_sparse_index_predicate,
        seq_lengths=(index.n_q, index.n_k),
    )  # fmt: skip


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    *,
    scale: float | None = None,
    block_mask: BlockMask | None = None,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`block_sparse_attention` semantics through FlexAttention: ``(out, lse)``.

    Shapes as the kernel: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``; ``lse`` is fp32
    natural log, -inf on rows that attend nothing -- or None when compiled on the CPU, where
    Inductor's Flex supports neither the log-sum-exp nor gradients (torch 2.13).
    ``compiled=False`` runs Flex's eager path, which materialises the scores (fine for
    tests, slow and memory-hungry otherwise). Pass a prebuilt ``block_mask`` to keep its
    construction out of a timing loop. Compiled Flex recompiles per shape and per
    (block size, causal, length) of the index; past torch._dynamo's recompile limit
    (``torch._dynamo.config.cache_size_limit``, default 8) it silently runs eagerly.
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    if block_mask is None:
        block_mask = flex_block_mask_from_index(index, device=q.device)
    if compiled:
        if "flex" not in _COMPILED_FLEX:
            _COMPILED_FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
        attend = _COMPILED_FLEX["flex"]
    else:
        attend = flex_attention
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    if compiled and q.device.type == "cpu":
        with torch.no_grad():
            out = attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        return out, None
    out, aux = attend(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return out, aux.lse.float()
