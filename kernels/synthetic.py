"""Synthetic block layouts for kernel tests and benchmarks.

These are stand-ins with the *shapes* of real head types (dense, streaming, block top-k,
vertical-slash), not attention policies: real layouts come from ``attnlab.sparsity_stats``.
Each function returns dense per-block booleans ``[QB, KB]`` (or ``[H, QB, KB]``) to be packed
by `BlockSparseLayout.from_block_masks`, which also applies causality and sink/window, so "keep every
block" plus ``causal=True`` is dense causal attention and plus ``sink=64, window=256`` is a
streaming head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def block_grid(n_q: int, n_k: int, block_size: int) -> tuple[int, int]:
    """(QB, KB): query and key block counts."""
    return math.ceil(n_q / block_size), math.ceil(n_k / block_size)


def all_blocks(n_q: int, n_k: int, block_size: int, *, device=None) -> torch.Tensor:
    """Every block kept: dense (or, with causal/sink/window, causal/streaming) attention."""
    return torch.ones(block_grid(n_q, n_k, block_size), dtype=torch.bool, device=device)


def no_blocks(n_q: int, n_k: int, block_size: int, *, device=None) -> torch.Tensor:
    """Nothing kept: a head at density 0 (every row returns 0, lse -inf)."""
    return torch.zeros(block_grid(n_q, n_k, block_size), dtype=torch.bool, device=device)


def causal_blocks(n_q: int, n_k: int, block_size: int, *, device=None) -> torch.Tensor:
    """Blocks holding at least one causal pair (query ``i`` at ``i + n_k - n_q``)."""
    q_blocks, k_blocks = block_grid(n_q, n_k, block_size)
    last_query = (torch.clamp((torch.arange(q_blocks, device=device) + 1) * block_size, max=n_q)
                  - 1 + n_k - n_q)  # fmt: skip
    first_key = torch.arange(k_blocks, device=device) * block_size
    return first_key[None, :] <= last_query[:, None]


def vertical_slash_blocks(
    n_q: int,
    n_k: int,
    block_size: int,
    *,
    columns: Sequence[int],
    diagonals: Sequence[int],
    device=None,
) -> torch.Tensor:
    """Vertical lines (fixed key blocks ``columns``) plus slashes (key blocks ``d`` blocks
    behind each query block's causal diagonal, for ``d`` in ``diagonals``; 0 = the diagonal).
    """
    q_blocks, k_blocks = block_grid(n_q, n_k, block_size)
    kept = torch.zeros(q_blocks, k_blocks, dtype=torch.bool, device=device)
    kept[:, [c for c in columns if 0 <= c < k_blocks]] = True
    # the key block holding query block qb's first absolute position
    diagonal = (torch.arange(q_blocks, device=device) * block_size + n_k - n_q).clamp(min=0)
    diagonal = diagonal // block_size
    for distance in diagonals:
        k_block = diagonal - distance
        ok = (k_block >= 0) & (k_block < k_blocks)
        kept[torch.arange(q_blocks, device=device)[ok], k_block[ok]] = True
    return kept


def random_blocks(
    n_q: int, n_k: int, block_size: int, density: float, *, generator: torch.Generator
) -> torch.Tensor:
    """Each block kept independently with probability ``density`` (CPU tensor)."""
    shape = block_grid(n_q, n_k, block_size)
    return torch.rand(shape, generator=generator) < density


def topk_blocks(scores: torch.Tensor, allowed: torch.Tensor, density: float) -> torch.Tensor:
    """Per query block, the ``ceil(density * allowed)`` highest-scoring allowed key blocks.

    ``scores`` float and ``allowed`` bool, both ``[..., QB, KB]``; like a block top-k policy
    at a given density (of the allowed, e.g. causal, blocks). Every row with an allowed
    block keeps at least one.
    """
    per_row = allowed.sum(-1, keepdim=True)
    keep = torch.clamp(torch.ceil(per_row * density), min=1).to(torch.int64)
    ranked = torch.where(allowed, scores, float("-inf")).argsort(dim=-1, descending=True)
    rank = torch.empty_like(ranked)
    rank.scatter_(-1, ranked, torch.arange(ranked.shape[-1], device=ranked.device).expand_as(ranked))
    return allowed & (rank < keep)
