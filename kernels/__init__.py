"""Block-sparse attention kernels: the Triton kernel, its dense reference, its index contract.

A per-head attention policy (dense, streaming, block-sparse, vertical-slash, ...) reaches
the GPU as a `BlockSparseIndex`: per (head, query block), a sorted list of *full* key blocks
(computed without masks) and one of *partial* key blocks (masked per token by bounds,
causality and a per-head sink/window). `block_sparse_attention` runs every head of a layer
in one Triton launch; `reference_attention` is the plain-PyTorch yardstick, fed the exact
token mask from `token_mask_from_index`; `flex_block_mask_from_index` hands the same index
to FlexAttention (CPU or GPU).

    from attnlab.kernels import index_from_block_masks, block_sparse_attention
    index = index_from_block_masks(kept, None, block_size=64, n_q=n, n_k=n, causal=True,
                                   sink=[0, 64], window=[0, 256])   # dense head, streaming head
    out, lse = block_sparse_attention(q, k, v, index)                # [B, H, N, D], [B, H, N]

CPU use (tests, laptops): the kernel runs under the Triton interpreter, which must be
switched on **before triton or `attnlab.kernels.block_sparse` is imported**::

    import os, torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import attnlab.kernels

The interpreter is numpy underneath: fp32 and fp16 work, bf16 does not, timings mean
nothing. Importing this package needs no GPU and does not import triton; the kernel module
is loaded on first use of `block_sparse_attention`, and this package sets no environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnlab.kernels.flex import flex_block_mask_from_index
from attnlab.kernels.index import (
    SUPPORTED_BLOCK_SIZES,
    BlockSparseIndex,
    BlockSparseIndexTensors,
    KernelInputError,
    block_masks_from_index,
    index_from_block_masks,
    token_mask_from_index,
    validate_index,
)
from attnlab.kernels.reference import reference_attention

if TYPE_CHECKING:
    from attnlab.kernels.block_sparse import block_sparse_attention

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "BlockSparseIndex",
    "BlockSparseIndexTensors",
    "KernelInputError",
    "block_masks_from_index",
    "block_sparse_attention",
    "flex_block_mask_from_index",
    "index_from_block_masks",
    "reference_attention",
    "token_mask_from_index",
    "validate_index",
]


def __getattr__(name: str) -> Any:
    # The kernel module imports triton and decorates the kernel, which fixes interpreter vs.
    # GPU mode for the process: defer that until someone actually asks for the kernel, so
    # importing the index types (as policy code does) never decides it for them.
    if name == "block_sparse_attention":
        from attnlab.kernels.block_sparse import block_sparse_attention

        return block_sparse_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
