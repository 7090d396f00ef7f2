"""Executors: run a whole model under a sparse-attention policy, selected by name.

=============  ===========================================================================
executor       how each layer's attention runs
=============  ===========================================================================
``reference``  masked dense attention in fp32 with the policy's exact token-level mask
               (`reference_attention`); the yardstick, O(n²) memory
``flex``       FlexAttention with the compiled ``BlockMask`` (CPU and GPU)
``triton``     the block-sparse Triton kernel (`block_sparse_attention`); on a CPU it runs
               through ``TRITON_INTERPRET=1``: correct and slow, for tests
=============  ===========================================================================

The executor plugs into the model through transformers' attention-function registry
(`attnlab.attention.route_attention`), so dense attention is restored when the ``with`` block
ends, whatever happens inside it. Static policy kinds are compiled once per (layer, length)
into a `BlockSparseLayout`; dynamic kinds (``vertical_slash``, ``block_topk``) are estimated
from each input's own queries and keys (`estimate_block_scores`). Policies apply to prefill,
as MInference's do: decode steps (one new query over a cache) attend densely here; a policy's
decode phase (which tokens each KV head's cache keeps) runs through `attnlab.sparsity_stats.kvcache`.

The model's own attention variant (`attnlab.attention.AttentionVariant`) passes through every
executor: a sliding-window layer's layouts carry ``model_window`` (ANDed with every head's
predicate, so the window bounds what a policy keeps and the layer's density is measured
against its windowed dense cost), and soft-capping and learned sinks go to the kernels as
``softcap=`` and ``sinks=``. Decode steps use the model's own attention (`attend`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from attnlab.attention import PLAIN, AttentionVariant, attend, route_attention
from attnlab.errors import AttnlabError
from attnlab.kernels.layout import BlockSparseLayout
from attnlab.models import LoadedModel

from .masks import compile_for_input, compile_layer
from .policy import Policy

EXECUTORS = ("reference", "flex", "triton")

_ERR_EXECUTOR = "unknown executor {name!r}: choose one of {choices}"
_ERR_BATCH = "policy execution takes one sequence at a time (batch 1): loop over samples"


def check_executor(name: str) -> str:
    if name not in EXECUTORS:
        raise AttnlabError(_ERR_EXECUTOR.format(name=name, choices=", ".join(EXECUTORS)))
    return name


def prepare_triton() -> None:
    """Choose the Triton interpreter on a machine without CUDA (must precede the kernel import)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def with_model_window(layout: BlockSparseLayout, window: int) -> BlockSparseLayout:
    """``layout`` with the model's own sliding window ANDed in (``model_window``); tiles the
    window leaves empty are dropped and full/partial re-decided. Unchanged when ``window`` is 0
    or already the layout's."""
    if not window or layout.model_window == window:
        return layout
    out = BlockSparseLayout.from_block_masks(
        layout.block_mask(), block_size=layout.block_size, n_q=layout.n_q, n_k=layout.n_k, causal=layout.causal,
        sink=layout.sink, window=layout.window, model_window=int(window), layer=layout.layer, head_names=layout.head_names,
    )  # fmt: skip
    out.meta.update(layout.meta)
    return out


def run_layout(
    executor: str, layout: BlockSparseLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
    variant: AttentionVariant | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's sparse attention: ``q [b, H, n_q, d]``, ``k, v [b, H_kv, n_k, d]`` → ``(out [b, H, n_q, d], lse)``.

    ``variant``: the layer's soft-cap and learned sinks (its window must already be in
    ``layout.model_window``, `with_model_window`)."""
    variant = variant or PLAIN
    if variant.window and layout.model_window != variant.window:
        layout = with_model_window(layout, variant.window)
    extra = {}
    if variant.softcap is not None:
        extra["softcap"] = variant.softcap
    if variant.sinks is not None:
        extra["sinks"] = variant.sinks.to(q.device, torch.float32)
    if executor == "reference":
        from attnlab.kernels.reference import reference_attention

        out, lse = reference_attention(q, k, v, layout.to(q.device), scale=scaling, dtype=torch.float32, **extra)
        return out.to(q.dtype), lse
    if executor == "flex":
        from attnlab.kernels.flex import flex_block_sparse_attention

        return flex_block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, scale=scaling, **extra)
    if executor == "triton":
        prepare_triton()  # before the kernel module's first import
        from attnlab.kernels.block_sparse import block_sparse_attention

        return block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout, scale=scaling, **extra)
    raise AttnlabError(_ERR_EXECUTOR.format(name=executor, choices=", ".join(EXECUTORS)))


class PolicyExecutor:
    """Compiles a policy per layer and length, and runs attention under it.

    Attributes:
        layouts_: the last compiled layout of each layer (``{layer: BlockSparseLayout}``), for
            reading the achieved density after a forward.
    """

    def __init__(self, policy: Policy, executor: str = "flex", *, block_size: int | None = None):
        self.policy = policy
        self.executor = check_executor(executor)
        self.block_size = block_size or policy.block_size
        self._static: dict[tuple[int, int], BlockSparseLayout] = {}
        self.layouts_: dict[int, BlockSparseLayout] = {}

    def check_model(self, model: LoadedModel, path: str = "(in memory)") -> None:
        """`PolicyError` unless the policy was made for ``model`` (the one identity check)."""
        self.policy.check_model(model.identity(), path)

    def layout(self, layer: int, q: torch.Tensor, k: torch.Tensor, window: int = 0) -> BlockSparseLayout:
        """The layer's layout for this input: ``q [H, n, d]``, ``k [H_kv, n, d]`` (one sample);
        ``window``: the model's own sliding window on this layer (0 = none), ANDed in."""
        n = int(k.shape[-2])
        if any(not e.static for e in self.policy.layer(layer)):
            lay = with_model_window(compile_for_input(self.policy, layer, q.float().cpu(), k.float().cpu(), self.block_size), window)
        else:
            key = (layer, n, window)
            if key not in self._static:
                self._static[key] = with_model_window(compile_layer(self.policy, layer, n, self.block_size), window)
            lay = self._static[key]
        self.layouts_[layer] = lay
        return lay

    def sparse(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
        variant: AttentionVariant | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(out [b, H, n, d], lse [b, H, n])`` of the layer under the policy (prefill), with the
        model's own attention ``variant`` (window, soft-cap, learned sinks)."""
        if query.shape[0] != 1:
            raise AttnlabError(_ERR_BATCH)
        variant = variant or PLAIN
        lay = self.layout(layer, query[0], key[0], variant.window)
        return run_layout(self.executor, lay, query, key, value, scaling, variant)

    def attention(
        self, layer: int, query, key, value, *, scaling: float, attention_mask=None, variant: AttentionVariant = PLAIN
    ) -> torch.Tensor:
        if query.shape[-2] != key.shape[-2]:  # decode over a cache: dense, as in MInference
            return attend(query, key, value, scaling=scaling, variant=variant)
        out, _ = self.sparse(layer, query, key, value, scaling, variant)
        return out.transpose(1, 2).contiguous()


@contextmanager
def run_with_policy(
    model: LoadedModel, policy: Policy, executor: str = "flex", *, block_size: int | None = None
) -> Iterator[PolicyExecutor]:
    """Inside the block, ``model`` attends under ``policy``; dense attention comes back after."""
    ex = PolicyExecutor(policy, executor, block_size=block_size)
    ex.check_model(model)
    with route_attention(model, ex.attention):
        yield ex
