"""Block-sparse attention kernels: the layout type, the Triton kernel, its dense reference, Flex.

A per-head attention layout (dense, streaming, block-sparse, vertical-slash, ...) reaches
every executor as one `BlockSparseLayout`: per (head, query block), a sorted list of *full*
key blocks (computed without masks) and one of *partial* key blocks (masked per token by
bounds, causality, a per-head sink/window and the layer's own sliding window,
``model_window``). `block_sparse_attention` runs every head of a
layer in one Triton launch; `reference_attention` is the plain-PyTorch yardstick, fed the
exact token mask from `BlockSparseLayout.token_mask`; `flex_block_mask` hands the same layout
to FlexAttention (CPU or GPU).

    from attnlab.kernels import BlockSparseLayout, block_sparse_attention
    layout = BlockSparseLayout.from_block_masks(kept, None, block_size=64, n_q=n, n_k=n,
                                                causal=True, sink=[0, 64], window=[0, 256])
    out, lse = block_sparse_attention(q, k, v, layout)                # [B, H, N, D], [B, H, N]

The model's own variants are keyword arguments of all three executors (kernel, reference,
Flex), off by default: ``softcap=c`` (scores ``c * tanh(s / c)`` before the mask, Gemma 2),
``sinks=[Hq] logits`` (a learned per-head logit in the softmax denominator with no value,
gpt-oss; the returned lse stays that of the real keys), and the layout's ``model_window``
(``from_block_masks(..., model_window=W)``: a query sees itself and ``W - 1`` keys before it,
Hugging Face's sliding window). A row that attends no key returns out 0 and lse -inf.

This package is a leaf: it knows nothing of policies, probes or runs (the policy compiler in
``attnlab.sparsity_stats`` builds layouts; its executors run models with them).

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

if __name__ == "kernels":
    # This folder is the package `attnlab.kernels`. A process started in the repository root
    # (`python -m pytest`, `python -c ...`) also finds it as top-level `kernels`: the import name
    # of Hugging Face's kernel-hub package, which transformers >= 5.25 requires and imports. Hand
    # that name to the installed package, found on the rest of sys.path, so transformers gets the
    # module it asked for; attnlab's own names (the `else` branch) stay out of it.
    import os as _os

    from ._hub_name import hand_over as _hand_over

    if not _hand_over(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))):
        # No hub package installed: stay an empty module with no version, which transformers
        # (< 5.25, where `kernels` is optional) reads as "kernels not available". Raising here
        # would break its import-time check of every optional package.
        def __getattr__(name: str):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: this `kernels` is attnlab's folder, "
                "imported from the repository root; import it as `attnlab.kernels` (Hugging Face's "
                "kernel hub, `pip install kernels`, is not installed)"
            )
else:
    from typing import TYPE_CHECKING, Any

    from attnlab.kernels.flex import flex_block_mask, flex_block_sparse_attention, flex_mask_mod
    from attnlab.kernels.layout import (
        SUPPORTED_BLOCK_SIZES,
        TOKEN_SEMANTICS,
        BlockSparseLayout,
        KernelInputError,
        attends,
    )
    from attnlab.kernels.reference import reference_attention

    if TYPE_CHECKING:
        from attnlab.kernels.block_sparse import block_sparse_attention

    __all__ = [
        "SUPPORTED_BLOCK_SIZES",
        "TOKEN_SEMANTICS",
        "BlockSparseLayout",
        "KernelInputError",
        "attends",
        "block_sparse_attention",
        "flex_block_mask",
        "flex_block_sparse_attention",
        "flex_mask_mod",
        "reference_attention",
    ]

    def __getattr__(name: str) -> Any:
        # The kernel module imports triton and decorates the kernel, which fixes interpreter vs.
        # GPU mode for the process: defer that until someone actually asks for the kernel, so
        # importing the layout type (as policy code does) never decides it for them.
        if name == "block_sparse_attention":
            from attnlab.kernels.block_sparse import block_sparse_attention

            return block_sparse_attention
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
