"""Block-sparse attention forward: FlashAttention-2 over per-head compressed block lists.

One Triton program computes one (batch, query head, query block) tile of the output. It
walks only the key blocks its head's `BlockSparseLayout` lists for that query block, in two loops:

1. the **full** blocks, with no masking code at all (the layout guarantees every pair of
   those tiles is attended), and
2. the **partial** blocks, which evaluate the token predicate (bounds, causal, sink/window,
   and the model's own sliding window when the layout has one).

Score variants are compile-time branches, so the default kernel is the one it always was:
``HAS_SOFTCAP`` (logits ``c * tanh(s / c)`` before the mask), ``HAS_SINKS`` (one learned logit
per query head in the softmax denominator, no value), ``HAS_MODEL_WINDOW``.

Dense, streaming, block-sparse and vertical-slash heads are just different block lists, so
one launch serves them all. GQA maps query head ``h`` to KV head ``h // (Hq // Hkv)`` inside
the kernel; ``Nq != Nk`` places query ``i`` at absolute position ``i + Nk - Nq``. Softmax is
online in base 2 with fp32 accumulators; the log-sum-exp comes back in natural log.

Under the CPU interpreter ``TRITON_INTERPRET=1`` must be set before this module (i.e. triton
and the decorated kernel) is imported; see the package docstring.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnlab.kernels.layout import (
    BLOCK_SIZE_UNSUPPORTED,
    SUPPORTED_BLOCK_SIZES,
    BlockSparseLayout,
    KernelInputError,
    _check_scalars,
    check_sinks,
    check_softcap,
)

# --- error messages ------------------------------------------------------------------------
INPUT_NOT_TENSOR = "{name} must be a torch.Tensor [B, H, N, D]; got {got}."
INPUT_RANK = "{name} must be 4-D [batch, heads, tokens, head_dim]; got shape {shape}."
DTYPE_UNSUPPORTED = (
    "q has dtype {got}; the kernel takes float16, bfloat16 or float32. Cast with "
    "q.to(torch.float16) (and k, v alike)."
)
DTYPE_MISMATCH = (
    "q, k and v must share one dtype; got q {q}, k {k}, v {v}. Cast k and v to q.dtype."
)
BF16_UNDER_INTERPRETER = (
    "bfloat16 is not supported by the Triton CPU interpreter (TRITON_INTERPRET=1): it "
    "multiplies raw bit patterns. Use float16 or float32 on CPU, bfloat16 on a CUDA device."
)
NOT_CONTIGUOUS = (
    "{name} is not contiguous (shape {shape}, strides {strides}); the kernel assumes a "
    "row-major [B, H, N, D] layout. Pass {name}.contiguous()."
)
DEVICE_MISMATCH = "q, k and v must be on one device; got q {q}, k {k}, v {v}."
KV_SHAPE_MISMATCH = "k and v must have the same shape [B, Hkv, Nk, D]; got k {k}, v {v}."
BATCH_MISMATCH = "q and k must have the same batch size; got q {q} and k {k}."
HEAD_DIM_MISMATCH = (
    "q has head_dim {q} but k/v have head_dim {k}; project them to one head_dim first."
)
HEAD_DIM_UNSUPPORTED = "head_dim {got} is not supported; the kernel takes 1 <= head_dim <= {max}."
GQA_HEADS = (
    "q has {q_heads} heads and k/v have {kv_heads}; grouped-query attention needs q heads to "
    "be a multiple of k/v heads."
)
INDEX_HEADS = (
    "layout.n_heads is {index_heads} but q has {q_heads} query heads; build one layout entry "
    "per query head (not per KV head)."
)
SEQUENCE_LONGER = (
    "{name} has {got} tokens but the layout covers {field}={covered} only; tokens past the "
    "layout would never be attended. Build the layout for n_q={n_q}, n_k={n_k}."
)
SEQUENCE_SHORTER = (
    "{name} has {got} tokens but the layout was built for {field}={covered}; the causal "
    "offset n_k - n_q and the block grid depend on both lengths. Build the layout for "
    "n_q={n_q}, n_k={n_k}."
)
SCALE_BAD = "scale must be a finite float or None (1/sqrt(head_dim)); got {got!r}."
GRID_TOO_LARGE = (
    "batch * query heads = {got} exceeds the {limit} programs a launch grid axis allows; "
    "split the batch."
)
NEEDS_DEVICE_OR_INTERPRETER = (
    "q is on the CPU but the Triton kernel was compiled for a GPU: set TRITON_INTERPRET=1 "
    "before anything imports triton or attnlab.kernels.block_sparse (e.g. at the top of the "
    "script or test module), or move q, k, v to a CUDA device."
)

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535

# natural log of 2: converts the kernel's base-2 log-sum-exp back to natural log
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2_E = 1.4426950408889634


@triton.jit
def _attend_kv_blocks(
    acc, l_i, m_i,  # running output [BLOCK, BLOCK_D], row sums and row maxima [BLOCK], fp32
    q, q_pos,  # query tile [BLOCK, BLOCK_D] and absolute query positions [BLOCK]
    k_head, v_head, stride_kn, stride_vn,  # K/V of this (batch, KV head), token 0
    block_ids, n_blocks,  # this row's key-block list and its length
    offs_n, offs_d,
    qk_scale, softcap_out, n_k, sink, window, model_window,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_MODEL_WINDOW: tl.constexpr,
):  # fmt: skip
    """Fold ``n_blocks`` listed key blocks into the online softmax state of one query tile."""
    d_ok = offs_d < HEAD_DIM
    for t in range(0, n_blocks):
        start_n = tl.load(block_ids + t) * BLOCK
        keys = start_n + offs_n
        k_ptrs = k_head + keys[None, :] * stride_kn + offs_d[:, None]  # K^T tile [D, BLOCK]
        v_ptrs = v_head + keys[:, None] * stride_vn + offs_d[None, :]  # V tile [BLOCK, D]
        if MASKED:
            # a partial block may be the ragged last one: keys >= n_k are not there
            key_ok = keys < n_k
            k = tl.load(k_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            # full blocks are in bounds by contract: unmasked loads
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)

        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        if HAS_SOFTCAP:
            # qk_scale was scale / c: qk = s / c; the base-2 logit is c * log2(e) * tanh(s / c).
            # tanh from exp2, stable for both signs (the interpreter has no libdevice tanh).
            e = tl.math.exp2(-2.8853900817779268 * tl.abs(qk))  # exp(-2|x|)
            th = (1.0 - e) / (1.0 + e)
            qk = tl.where(qk < 0.0, -th, th) * softcap_out
        if MASKED:
            # the token predicate of BlockSparseLayout (`attends`, conditions 2-5 of
            # attnlab.kernels.layout), in triton.language; only ever evaluated here
            keep = key_ok[None, :]
            if CAUSAL:
                keep = keep & (keys[None, :] <= q_pos[:, None])
            streaming = (keys[None, :] < sink) | (q_pos[:, None] - keys[None, :] < window)
            keep = keep & ((window == 0) | streaming)
            if HAS_MODEL_WINDOW:
                keep = keep & (q_pos[:, None] - keys[None, :] < model_window)
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with no kept key yet has m_new = -inf; exp2(-inf - -inf) would be NaN.
            # Shifting such rows by 0 makes p and alpha exactly 0 and the row stays empty.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # every logit is finite here, so the new maximum is too
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, Out, Lse,
    full_count, full_offset, full_index,  # CSR of full blocks, rows = head * QB + q_block
    part_count, part_offset, part_index,  # CSR of partial blocks
    sink_per_head, window_per_head, sink_logits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_q, n_k, n_q_blocks, n_q_heads, group_size,
    qk_scale, softcap_out, model_window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MODEL_WINDOW: tl.constexpr,
):  # fmt: skip
    # Latest query blocks launch first: under a causal mask they list the most key blocks,
    # and starting the longest programs first shortens the launch's tail.
    q_block = n_q_blocks - 1 - tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // n_q_heads
    head = batch_head % n_q_heads
    kv_head = head // group_size  # GQA: a group of query heads shares one K/V head

    offs_m = q_block * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    q_pos = offs_m + (n_k - n_q)  # absolute position: the queries are the last n_q tokens

    # 64-bit base offsets: B * H * N * D overflows int32 at long contexts
    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :])  # fmt: skip
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    row = head * n_q_blocks + q_block
    sink = tl.load(sink_per_head + head)
    window = tl.load(window_per_head + head)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)

    # Full blocks first. They are usually the majority and carry no mask, so they set a
    # finite running max for every row before any masked tile arrives; the NaN guard of
    # the masked loop then only matters for rows that have no full block at all. Keeping
    # the loops apart lets the compiler emit the full loop without any masking code.
    acc, l_i, m_i = _attend_kv_blocks(
        acc, l_i, m_i, q, q_pos, k_head, v_head, stride_kn, stride_vn,
        full_index + tl.load(full_offset + row), tl.load(full_count + row),
        offs_n, offs_d, qk_scale, softcap_out, n_k, sink, window, model_window,
        BLOCK, HEAD_DIM, BLOCK_D, False, CAUSAL, DOT_PRECISION, HAS_SOFTCAP, HAS_MODEL_WINDOW,
    )  # fmt: skip
    # Partial blocks: diagonal tiles, ragged edges, window borders; masked per token.
    acc, l_i, m_i = _attend_kv_blocks(
        acc, l_i, m_i, q, q_pos, k_head, v_head, stride_kn, stride_vn,
        part_index + tl.load(part_offset + row), tl.load(part_count + row),
        offs_n, offs_d, qk_scale, softcap_out, n_k, sink, window, model_window,
        BLOCK, HEAD_DIM, BLOCK_D, True, CAUSAL, DOT_PRECISION, HAS_SOFTCAP, HAS_MODEL_WINDOW,
    )  # fmt: skip

    # Rows that attended nothing (no listed block, or every pair masked) have l_i == 0:
    # they return 0 and lse = -inf instead of 0/0.
    attended = l_i > 0.0
    l_safe = tl.where(attended, l_i, 1.0)
    # the log-sum-exp is over the real keys only, with or without a sink
    lse = tl.where(attended, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    if HAS_SINKS:
        # The head's learned sink joins the denominator with no value. Its logit is finite, so
        # the new max is too, and a row with no key gets l = 1, acc = 0: out 0, no NaN.
        sink_logit = tl.load(sink_logits + head) * 1.4426950408889634  # base 2
        m_sink = tl.maximum(m_i, sink_logit)
        alpha = tl.math.exp2(m_i - m_sink)
        acc = acc * alpha[:, None]
        l_safe = l_i * alpha + tl.math.exp2(sink_logit - m_sink)
    out = acc / l_safe[:, None]
    o_ptrs = (Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :])  # fmt: skip
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + batch_head.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)


def _kernel_is_interpreted() -> bool:
    """Whether the kernel was decorated under TRITON_INTERPRET=1 (runs on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_block_sparse_attention_fwd, InterpretedFunction)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise KernelInputError(INPUT_NOT_TENSOR.format(name=name, got=type(x).__name__))
        if x.dim() != 4:
            raise KernelInputError(INPUT_RANK.format(name=name, shape=tuple(x.shape)))
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise KernelInputError(DTYPE_UNSUPPORTED.format(got=q.dtype))
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(DTYPE_MISMATCH.format(q=q.dtype, k=k.dtype, v=v.dtype))
    if not (q.device == k.device == v.device):
        raise KernelInputError(DEVICE_MISMATCH.format(q=q.device, k=k.device, v=v.device))
    if k.shape != v.shape:
        raise KernelInputError(KV_SHAPE_MISMATCH.format(k=tuple(k.shape), v=tuple(v.shape)))
    if q.shape[0] != k.shape[0]:
        raise KernelInputError(BATCH_MISMATCH.format(q=q.shape[0], k=k.shape[0]))
    if q.shape[-1] != k.shape[-1]:
        raise KernelInputError(HEAD_DIM_MISMATCH.format(q=q.shape[-1], k=k.shape[-1]))
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise KernelInputError(HEAD_DIM_UNSUPPORTED.format(got=q.shape[-1], max=MAX_HEAD_DIM))
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise KernelInputError(GQA_HEADS.format(q_heads=q.shape[1], kv_heads=k.shape[1]))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not x.is_contiguous():
            raise KernelInputError(
                NOT_CONTIGUOUS.format(name=name, shape=tuple(x.shape), strides=x.stride())
            )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise KernelInputError(SCALE_BAD.format(got=scale))
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        raise KernelInputError(GRID_TOO_LARGE.format(got=q.shape[0] * q.shape[1], limit=MAX_GRID_Y))
    interpreted = _kernel_is_interpreted()
    if q.dtype == torch.bfloat16 and interpreted:
        raise KernelInputError(BF16_UNDER_INTERPRETER)
    if q.device.type == "cpu" and not interpreted:
        raise KernelInputError(NEEDS_DEVICE_OR_INTERPRETER)


def _check_layout_fits(layout: BlockSparseLayout, q: torch.Tensor, k: torch.Tensor) -> None:
    _check_scalars(layout)
    if layout.block_size not in SUPPORTED_BLOCK_SIZES:
        raise KernelInputError(
            BLOCK_SIZE_UNSUPPORTED.format(got=layout.block_size, supported=SUPPORTED_BLOCK_SIZES)
        )
    if layout.n_heads != q.shape[1]:
        raise KernelInputError(INDEX_HEADS.format(index_heads=layout.n_heads, q_heads=q.shape[1]))
    for name, got, field, covered in (
        ("q", q.shape[2], "n_q", layout.n_q),
        ("k", k.shape[2], "n_k", layout.n_k),
    ):
        if got != covered:
            message = SEQUENCE_LONGER if got > covered else SEQUENCE_SHORTER
            raise KernelInputError(
                message.format(
                    name=name, got=got, field=field, covered=covered,
                    n_q=q.shape[2], n_k=k.shape[2],
                )
            )  # fmt: skip


def _launch_config(block: int, block_d: int) -> tuple[int, int]:
    """(num_warps, num_stages): more warps for 128-wide tiles; fewer stages for big tiles."""
    num_warps = 8 if block >= 128 else 4
    tile_bytes = 2 * block * block_d * 2  # one K and one V tile in 16-bit
    num_stages = 1 if tile_bytes >= 128 * 1024 else 2
    return num_warps, num_stages


def _launch(grid: tuple[int, int], *args: object, **kwargs: object) -> None:
    """The one place the kernel is launched (tests replace it to prove errors come first)."""
    _block_sparse_attention_fwd[grid](*args, **kwargs)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the blocks ``layout`` lists, per query head, in one launch.

    Shapes: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``; one dtype
    (float16, float32, or bfloat16 on a GPU), contiguous, one device; ``layout`` built for
    ``n_heads = Hq``, ``n_q = Nq``, ``n_k = Nk``. ``scale`` defaults to ``1 / sqrt(D)``.

    Returns ``(out [B, Hq, Nq, D] in q.dtype, lse [B, Hq, Nq] float32)``: the softmax over
    exactly the pairs `BlockSparseLayout.token_mask` marks, and its natural log-sum-exp. Rows that
    attend nothing get out 0 and lse -inf.

    ``softcap`` c > 0 caps the scaled scores to ``c * tanh(s / c)`` before the mask (Gemma 2);
    ``sinks`` (float ``[Hq]``, finite) adds one learned logit per query head to the softmax
    denominator with no value (gpt-oss). The returned lse is over the real keys only, as in
    `reference_attention` (the sink's share of a row is ``sigmoid(sink - lse)``). The
    layout's ``model_window`` is applied in partial blocks. Each compiles its own kernel
    variant; without them the kernel is the plain one.

    Everything is checked before the launch and a `KernelInputError` names the problem and
    the fix. ``validate=False`` skips only the O(listed blocks) content checks of the layout
    (`BlockSparseLayout.validate`: ranges, order, overlap, full-block claims) -- for timing
    loops over a layout already validated once; a malformed layout then gives wrong answers
    or faults. Any object with the layout's attributes is accepted (`BlockSparseLayout.coerce`).
    """
    _check_inputs(q, k, v, scale)
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, q.shape[1])
    layout = BlockSparseLayout.coerce(layout)
    _check_layout_fits(layout, q, k)
    blocks = layout.validate(q.device) if validate else layout.to(q.device)

    batch, q_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    block = layout.block_size
    n_q_blocks = math.ceil(n_q / block)
    out = torch.empty_like(q)
    lse = torch.empty((batch, q_heads, n_q), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    # An empty block list still needs a valid pointer; its count of 0 keeps it unread.
    full_index = blocks.full_kv_index if blocks.full_kv_index.numel() else blocks.full_kv_count
    part_index = blocks.kv_index if blocks.kv_index.numel() else blocks.kv_count

    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if softcap is None:
        qk_scale, softcap_out = scale * _LOG2_E, 1.0
    else:  # the kernel forms s / c, then c * log2(e) * tanh(s / c)
        qk_scale, softcap_out = scale / softcap, softcap * _LOG2_E
    # an unused pointer argument still needs a tensor; HAS_SINKS=False never reads it
    sink_logits = blocks.sink if sinks is None else sinks.to(device=q.device, dtype=torch.float32).contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    num_warps, num_stages = _launch_config(block, block_d)
    grid = (n_q_blocks, batch * q_heads)
    _launch(
        grid,
        q, k, v, out, lse,
        blocks.full_kv_count, blocks.full_kv_offset, full_index,
        blocks.kv_count, blocks.kv_offset, part_index,
        blocks.sink, blocks.window, sink_logits,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n_q, n_k, n_q_blocks, q_heads, q_heads // k.shape[1],
        qk_scale, softcap_out, int(blocks.model_window),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block, CAUSAL=layout.causal,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None,
        HAS_MODEL_WINDOW=blocks.model_window > 0,
        # fp32 inputs get true fp32 products (not TF32) to match an fp32 reference
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse


__all__ = ["SUPPORTED_BLOCK_SIZES", "block_sparse_attention"]
