"""FlexAttention as a second executor of a `BlockSparseLayout` (CPU through Inductor, or GPU).

`flex_block_mask` turns the layout into a FlexAttention ``BlockMask`` with the same split: our
full blocks become Flex's ``full_kv_*`` (no ``mask_mod`` call), our partial blocks its ``kv_*``
(``mask_mod`` = block membership and `attends`: bounds, causal, sink/window, the model's
window). The result computes exactly the mask `BlockSparseLayout.token_mask` describes, so it
doubles as a baseline in the kernel benchmark and as a portable executor where Triton is
unavailable. Logit soft-capping is a ``score_mod``; learned sinks rescale Flex's output by
its log-sum-exp (exact: ``out * sigmoid(lse - sink)``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from attnlab.kernels.layout import BlockSparseLayout, attends, check_sinks, check_softcap

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_COMPILED_FLEX: dict[str, Any] = {}
#: How many shapes compiled Flex keeps before torch._dynamo would give up and run Flex eagerly
#: (its default is 8: an eval over prompts of a dozen lengths passed it).
FLEX_RECOMPILE_LIMIT = 256


def _many_compilations() -> contextlib.AbstractContextManager:
    """torch._dynamo's recompile limits raised to `FLEX_RECOMPILE_LIMIT` for one Flex call
    (never lowered: a user's higher setting stands)."""
    import torch._dynamo

    config = torch._dynamo.config
    return config.patch(recompile_limit=max(config.recompile_limit, FLEX_RECOMPILE_LIMIT),
                        accumulated_recompile_limit=max(config.accumulated_recompile_limit, 4 * FLEX_RECOMPILE_LIMIT))


def flex_mask_mod(layout: BlockSparseLayout) -> Callable[..., torch.Tensor]:
    """The layout's token semantics as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.

    Compiled Flex calls it in partial blocks only (where the block lookup is always True);
    eager Flex ignores the block lists and evaluates it everywhere, so it carries the block
    lookup (condition 1) too. Built on the layout's device.
    """
    listed = layout.block_mask()
    device = listed.device
    sink = layout.sink.to(device=device, dtype=torch.int64)
    window = layout.window.to(device=device, dtype=torch.int64)
    offset, n_k, causal, block = layout.q_offset, layout.n_k, layout.causal, layout.block_size
    model_window = int(layout.model_window)
    last_q_block, last_k_block = layout.n_q_blocks - 1, layout.n_k_blocks - 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        in_block = listed[h, (q_idx // block).clamp(0, last_q_block), (kv_idx // block).clamp(0, last_k_block)]
        return in_block & attends(
            q_idx + offset, kv_idx, n_k=n_k, sink=sink[h], window=window[h], causal=causal,
            model_window=model_window,
        )  # fmt: skip

    mask_mod.__name__ = f"block_layout_layer{layout.layer}" if layout.layer is not None else "block_layout"
    return mask_mod


def flex_block_mask(layout: BlockSparseLayout, device: torch.device | str | None = None) -> BlockMask:
    """A FlexAttention ``BlockMask`` for ``layout`` (batch dimension 1, broadcast over batch).

    Validated and built on ``device`` (default: the layout's) with ``BLOCK_SIZE = (block_size,
    block_size)`` and ``seq_lengths = (n_q, n_k)``, straight from the block lists (no mask
    evaluation). Uses O(H * QB * KB) memory, as every BlockMask does. On GPU, FlexAttention's
    kernel tile must divide ``block_size``: use 64 or 128.
    """
    from torch.nn.attention.flex_attention import BlockMask

    layout = BlockSparseLayout.coerce(layout).validate(device)
    padded = layout.padded()
    return BlockMask.from_kv_blocks(
        padded["kv_num_blocks"], padded["kv_indices"],
        padded["full_kv_num_blocks"], padded["full_kv_indices"],
        BLOCK_SIZE=(layout.block_size, layout.block_size),
        mask_mod=flex_mask_mod(layout),
        seq_lengths=(layout.n_q, layout.n_k),
    )  # fmt: skip


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`block_sparse_attention` semantics through FlexAttention: ``(out, lse)``.

    Shapes as the kernel: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``; ``lse`` is fp32
    natural log, -inf on rows that attend nothing -- or None when compiled on the CPU, where
    Inductor's Flex supports neither the log-sum-exp nor gradients (torch 2.13).
    ``compiled=False`` runs Flex's eager path, which materialises the scores (fine for
    tests, slow and memory-hungry otherwise). Pass a prebuilt ``block_mask`` to keep its
    construction out of a timing loop. Compiled Flex compiles once per shape and per (block
    size, causal, length) of the layout (6-11 s at 2k tokens on the CPU; dynamic shapes fail
    in Inductor's CPU code generation on torch 2.13). It may keep `FLEX_RECOMPILE_LIMIT`
    compilations: past torch._dynamo's default of 8, Flex would fall back to its eager path,
    36-78x slower per call at 2k tokens on the CPU (`benchmarks/RESULTS.md`, "FlexAttention on
    the CPU: prompts of many lengths").

    ``softcap`` c > 0 is a ``score_mod`` ``c * tanh(s / c)`` on the scaled scores (before the
    mask). ``sinks`` (float ``[Hq]``): each head's learned logit joins the softmax denominator
    with no value; applied exactly as ``out * sigmoid(lse - sink)`` from Flex's log-sum-exp,
    which stays that of the real keys (as in `reference_attention`). Since compiled Flex on
    the CPU returns no log-sum-exp, ``sinks`` on the CPU run Flex's eager path.
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, q.shape[1])
    if block_mask is None:
        block_mask = flex_block_mask(layout, device=q.device)
    if sinks is not None and q.device.type == "cpu":
        compiled = False  # the rescaling needs the log-sum-exp CPU Inductor cannot return
    if compiled:
        if "flex" not in _COMPILED_FLEX:
            _COMPILED_FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
        attend = _COMPILED_FLEX["flex"]
    else:
        attend = flex_attention
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    score_mod = None if softcap is None else _softcap_score_mod(softcap)
    if compiled and q.device.type == "cpu":
        with torch.no_grad(), _many_compilations():
            out = attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        return out, None
    # Compiled Flex on a GPU tiles with its own BLOCK_M/BLOCK_N (128 on Hopper for some head
    # sizes), which must divide the mask's block size: "Q and KV block size must be divisible
    # by BLOCK_M and BLOCK_N". Tile at the layout's block size, at most 64.
    options = None
    if compiled and q.device.type == "cuda":
        tile = min(int(block_mask.BLOCK_SIZE[0]), int(block_mask.BLOCK_SIZE[1]), 64)
        options = {"BLOCK_M": tile, "BLOCK_N": tile}
    with _many_compilations() if compiled else contextlib.nullcontext():
        out, aux = attend(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa,
            return_aux=AuxRequest(lse=True), kernel_options=options,
        )  # fmt: skip
    lse = aux.lse.float()
    if sinks is not None:
        # p_j = exp(s_j) / (exp(lse) + exp(sink)) = Flex's p_j * sigmoid(lse - sink); a row
        # with no key has out 0 and lse -inf, so it stays 0
        share = torch.sigmoid(lse - sinks.to(device=lse.device, dtype=torch.float32).reshape(1, -1, 1))
        out = (out.float() * share[..., None]).to(out.dtype)
    return out, lse


def _softcap_score_mod(softcap: float) -> Callable[..., torch.Tensor]:
    """Logit soft-capping as a FlexAttention ``score_mod``: ``c * tanh(score / c)``."""

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                  kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return softcap * torch.tanh(score / softcap)

    return score_mod
