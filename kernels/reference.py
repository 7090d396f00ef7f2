"""Dense reference attention: the yardstick every kernel test measures against.

Plain PyTorch, computed in a chosen dtype (fp64 for the "true" answer, the input dtype for
the "same-dtype PyTorch" answer of the FlashAttention test convention), with an explicit
boolean token mask or the exact token mask of a `BlockSparseLayout`. It materialises the ``[B, Hq, Nq, Nk]`` score matrix: small shapes only.
"""

from __future__ import annotations

import math

import torch

from attnlab.kernels.layout import BlockSparseLayout, KernelInputError, check_sinks, check_softcap

REFERENCE_SHAPES = (
    "reference_attention expects q [B, Hq, Nq, D] and k, v [B, Hkv, Nk, D] with Hq a "
    "multiple of Hkv; got q {q}, k {k}, v {v}."
)
REFERENCE_MASK = (
    "token_mask must be a bool tensor broadcastable to [B, Hq, Nq, Nk] = {expected}; got "
    "{got}."
)


def _bool_mask_broadcasts(mask: object, shape: tuple[int, ...]) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    try:
        return tuple(torch.broadcast_shapes(mask.shape, shape)) == shape
    except RuntimeError:
        return False


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | BlockSparseLayout | None = None,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with a boolean token mask, computed in ``dtype``.

    Shapes: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``; query head ``h`` reads KV head
    ``h // (Hq // Hkv)`` (GQA). ``token_mask`` (True = attend) broadcasts to
    ``[B, Hq, Nq, Nk]``, e.g. ``[Hq, Nq, Nk]``; a `BlockSparseLayout` stands for its
    `~BlockSparseLayout.token_mask` (small lengths); None attends everything. ``scale``
    defaults to ``1 / sqrt(D)``.

    Variants (Hugging Face's eager semantics):

    - ``softcap`` c > 0: the scaled scores become ``c * tanh(s / c)`` before the mask
      (Gemma 2's logit soft-capping);
    - ``sinks``: float ``[Hq]``, one learned logit per query head that joins the softmax
      denominator and carries no value (gpt-oss): ``out = sum_j p_j v_j`` with
      ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``.

    Returns ``(out [B, Hq, Nq, D], lse [B, Hq, Nq])`` in ``dtype``; ``lse`` is the natural
    log-sum-exp of the scaled (soft-capped), masked scores **of the real keys only**: the sink
    is not in it, so the sink's share of a row is ``sigmoid(sink - lse)`` and the output
    without a sink is ``out / sigmoid(lse - sink)``. A row with no attended key gets out 0 and
    lse -inf, never NaN (with a sink too: the sink takes all the mass and has no value). In fp16/bf16 the softmax is ``torch.softmax`` on low-precision scores
    and the probabilities are rounded to ``dtype`` before ``P @ V``: the eager baseline the
    FlashAttention tests compare kernels against.
    """
    if (
        q.dim() != 4 or k.dim() != 4 or v.shape != k.shape
        or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]
        or q.shape[1] % k.shape[1] != 0
    ):  # fmt: skip
        raise KernelInputError(
            REFERENCE_SHAPES.format(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape))
        )
    batch, q_heads, n_q, head_dim = q.shape
    group = q_heads // k.shape[1]
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, q_heads)

    qd = q.to(dtype)
    kd = k.to(dtype).repeat_interleave(group, dim=1)
    vd = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if isinstance(token_mask, BlockSparseLayout):
        token_mask = token_mask.token_mask()
    if token_mask is not None:
        expected = (batch, q_heads, n_q, n_k)
        if not _bool_mask_broadcasts(token_mask, expected):
            raise KernelInputError(
                REFERENCE_MASK.format(expected=list(expected), got=getattr(token_mask, "shape", token_mask))
            )
        scores = scores.masked_fill(~token_mask.to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    if sinks is not None:
        # the sink is one more logit per row; its probability is dropped (it has no value)
        sink = sinks.to(device=scores.device, dtype=dtype).reshape(1, q_heads, 1, 1)
        combined = torch.cat([scores, sink.expand(batch, q_heads, n_q, 1)], dim=-1)
        probs = torch.softmax(combined, dim=-1)[..., :-1]
        return torch.matmul(probs, vd), lse
    empty_row = torch.isneginf(lse)
    # softmax of an all -inf row is NaN; such a row attends nothing, so it gets zeros
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row[..., None], 0.0)
    out = torch.matmul(probs, vd)
    return out, lse
