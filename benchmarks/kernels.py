"""Benchmark the block-sparse Triton kernel against dense SDPA and FlexAttention (GPU only).

For every (pattern, length, head_dim) it times the kernel on an index of that pattern, dense
causal ``scaled_dot_product_attention`` on the same q/k/v, and compiled FlexAttention on a
BlockMask built from the same layout (`flex_block_mask`), then prints one markdown
table row:

- ``density``: computed blocks / blocks of dense causal attention (the work SDPA does);
- ``TFLOP/s``: effective, counting only computed blocks (4 * B^2 * D flops each);
- ``vs SDPA`` / ``vs Flex``: their latency over the kernel's;
- ``efficiency``: speedup vs SDPA / (1 / density), 1.0 = the ideal sparse speedup.

    python benchmarks/kernels.py                                # the full grid, 4k..128k
    python benchmarks/kernels.py --lengths 4096 16384 --head-dims 128 --out results.md
    python benchmarks/kernels.py --softcap 50 --model-window 4096   # Gemma-2-like variants

Shapes: batch 1, 32 query heads, 8 KV heads (GQA 4), causal. Patterns: all-dense;
streaming (64 sink + 256 local tokens); vertical-slash-like (a few key-block columns plus
the 4 block diagonals next to the causal one); block top-k at 50/25/10/5% of the causal
blocks (random scores, diagonal always kept); mixed (half dense heads, half streaming).
``--softcap`` and ``--model-window`` time the kernel's and Flex's soft-capping and model-window
variants (every pattern inside the model's window); SDPA stays plain dense causal attention.
"""

from __future__ import annotations

if __name__ == "kernels":
    # `python benchmarks/<script>.py` puts this folder first on sys.path, so transformers' own
    # `import kernels` (Hugging Face's kernel hub, required from transformers 5.25) finds this
    # file. Hand the name to the installed package, as the repository's kernels/ folder does.
    import importlib.util as _util
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _spec = _util.spec_from_file_location("_attnlab_hub_name", _os.path.join(_here, "..", "kernels", "_hub_name.py"))
    _helper = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_helper)
    if not _helper.hand_over(_here):
        raise ImportError("`import kernels` found benchmarks/kernels.py (attnlab's kernel benchmark), and no "
                          "installed `kernels` package to hand the name to: pip install kernels")

import argparse
import datetime
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from attnlab.kernels import BlockSparseLayout
from attnlab.kernels.synthetic import causal_blocks, topk_blocks, vertical_slash_blocks

PATTERNS = ("dense", "streaming", "vertical_slash", "topk50", "topk25", "topk10", "topk5", "mixed")
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
STREAMING_SINK, STREAMING_WINDOW = 64, 256
NO_CUDA = (
    "benchmarks/kernels.py needs a CUDA device (the kernel is timed natively; the Triton CPU "
    "interpreter's timings mean nothing). Run it on a GPU machine; `--help` lists options."
)
COLUMNS = (
    "pattern", "N", "D", "density", "kernel ms", "TFLOP/s", "SDPA ms", "vs SDPA",
    "Flex ms", "vs Flex", "efficiency",
)  # fmt: skip


def build_layout(
    pattern: str,
    n: int,
    heads: int,
    block_size: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    model_window: int = 0,
) -> BlockSparseLayout:
    """A causal layout of ``pattern`` over ``n`` tokens for ``heads`` query heads (inside the
    model's own sliding window when ``model_window`` > 0)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)  # small draws
    device_generator = torch.Generator(device=device).manual_seed(seed)  # [H, QB, KB] draws
    allowed = causal_blocks(n, n, block_size, device=device)
    q_blocks, k_blocks = allowed.shape
    sink = window = 0
    if pattern in ("dense", "streaming"):
        kept = allowed.expand(heads, -1, -1)
        if pattern == "streaming":
            sink, window = STREAMING_SINK, STREAMING_WINDOW
    elif pattern == "mixed":
        kept = allowed.expand(heads, -1, -1)
        sink = [0] * (heads // 2) + [STREAMING_SINK] * (heads - heads // 2)
        window = [0] * (heads // 2) + [STREAMING_WINDOW] * (heads - heads // 2)
    elif pattern == "vertical_slash":
        n_columns = max(1, k_blocks // 32)
        layouts = []
        for _ in range(heads):
            columns = [0] + torch.randperm(k_blocks, generator=generator)[:n_columns].tolist()
            layouts.append(
                vertical_slash_blocks(
                    n, n, block_size, columns=columns, diagonals=[0, 1, 2, 3], device=device
                )
            )
        kept = torch.stack(layouts)
    elif pattern.startswith("topk"):
        density = int(pattern[4:]) / 100
        scores = torch.rand(
            heads, q_blocks, k_blocks, generator=device_generator, device=device
        )
        kept = topk_blocks(scores, allowed.expand(heads, -1, -1), density)
        kept |= torch.eye(q_blocks, k_blocks, dtype=torch.bool, device=device)  # diagonal
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    return BlockSparseLayout.from_block_masks(
        kept.contiguous(), None, block_size=block_size, n_q=n, n_k=n, causal=True,
        sink=sink, window=window, model_window=model_window,
    )  # fmt: skip


def density_of(index: BlockSparseLayout) -> float:
    """Computed blocks over the blocks dense causal attention computes."""
    causal = causal_blocks(index.n_q, index.n_k, index.block_size).sum().item() * index.n_heads
    return index.kept_blocks().sum().item() / causal


def kernel_flops(index: BlockSparseLayout, head_dim: int, batch: int) -> float:
    """QK^T and PV over every computed block: 2 matmuls x 2 flops x B x B x D."""
    blocks = index.kept_blocks().sum().item()
    return 4.0 * batch * blocks * index.block_size**2 * head_dim


def markdown_row(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the block-sparse kernel against SDPA (dense causal) and "
        "FlexAttention on the same index. Needs a CUDA device.",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=64, choices=(16, 32, 64, 128))
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--softcap", type=float, default=None,
                        help="logit soft-capping c > 0 (scores c*tanh(s/c)), as Gemma 2")  # fmt: skip
    parser.add_argument("--model-window", type=int, default=0,
                        help="the model's own sliding window in tokens (0: none), as Mistral/Gemma")  # fmt: skip
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--out", type=Path, help="append the markdown table to this file")
    return parser.parse_args(argv)


def bench_pattern(
    pattern: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: argparse.Namespace,
    time_ms: Callable[[Callable[[], object]], float],
    flex_failed: set[str],
) -> tuple[BlockSparseLayout, float, float]:
    """Build ``pattern``'s index for q/k/v, check it once, time the kernel and Flex on it.

    Returns ``(index, kernel_ms, flex_ms)``; ``flex_ms`` is NaN when Flex is skipped or fails.
    """
    import torch.nn.functional as F

    from attnlab.kernels import block_sparse_attention, flex_block_mask
    from attnlab.kernels.flex import flex_block_sparse_attention

    n = q.shape[2]
    index = build_layout(pattern, n, q.shape[1], args.block_size, device=q.device, model_window=args.model_window)
    # the first call validates the index; on the dense pattern it is also checked vs. SDPA
    out, _ = block_sparse_attention(q, k, v, index, softcap=args.softcap)
    if pattern == "dense" and args.softcap is None and not args.model_window:
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        err = (out.float() - want.float()).abs().max().item()
        if err > 5e-2:
            print(f"WARNING: dense kernel differs from SDPA by {err:.3g} at N={n}", file=sys.stderr)
    del out
    kernel_ms = time_ms(lambda: block_sparse_attention(q, k, v, index, softcap=args.softcap, validate=False))

    flex_ms = math.nan
    if not args.no_flex:
        try:
            mask = flex_block_mask(index)
            flex_block_sparse_attention(q, k, v, index, block_mask=mask, softcap=args.softcap)  # compile
            flex_ms = time_ms(
                lambda: flex_block_sparse_attention(q, k, v, index, block_mask=mask, softcap=args.softcap)
            )
        except Exception as error:  # Flex's compile errors vary by version and shape
            key = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            if key not in flex_failed:
                flex_failed.add(key)
                print(f"FlexAttention failed ({pattern}, N={n}): {key}", file=sys.stderr)
        torch.cuda.empty_cache()
    return index, kernel_ms, flex_ms


def bench_shape(
    n: int,
    head_dim: int,
    args: argparse.Namespace,
    time_ms: Callable[[Callable[[], object]], float],
    flex_failed: set[str],
) -> list[str]:
    """Markdown rows for every pattern at one (length, head_dim)."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    generator = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (
        torch.randn(args.batch, heads, n, head_dim, generator=generator, device="cuda", dtype=dtype)
        for heads in (args.q_heads, args.kv_heads, args.kv_heads)
    )
    sdpa_ms = time_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    )
    rows = []
    for pattern in args.patterns:
        index, kernel_ms, flex_ms = bench_pattern(pattern, q, k, v, args, time_ms, flex_failed)
        density = density_of(index)
        speedup = sdpa_ms / kernel_ms
        row = markdown_row([
            pattern, str(n), str(head_dim), f"{density:.3f}", f"{kernel_ms:.3f}",
            f"{kernel_flops(index, head_dim, args.batch) / kernel_ms / 1e9:.1f}",
            f"{sdpa_ms:.3f}", f"{speedup:.2f}x", f"{flex_ms:.3f}",
            f"{flex_ms / kernel_ms:.2f}x" if not math.isnan(flex_ms) else "n/a",
            f"{speedup * density:.2f}",
        ])  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from triton.testing import do_bench

    # Every (shape, index) pair compiles its own Flex kernel; the default limit of 8
    # recompiles would silently drop later ones to eager Flex (dense scores: OOM at 128k).
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    def time_ms(fn: Callable[[], object]) -> float:
        return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms)

    title = (
        f"block-sparse kernel, {torch.cuda.get_device_name()}, {args.dtype}, "
        f"B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} block={args.block_size}, "
        + (f"softcap={args.softcap}, " if args.softcap is not None else "")
        + (f"model_window={args.model_window}, " if args.model_window else "")
        + f"torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    lines = [f"### {title}", "", markdown_row(list(COLUMNS)),
             markdown_row(["---"] * len(COLUMNS))]  # fmt: skip
    print("\n".join(lines), flush=True)
    flex_failed: set[str] = set()
    for head_dim in args.head_dims:
        for n in args.lengths:
            lines += bench_shape(n, head_dim, args, time_ms, flex_failed)
            torch.cuda.empty_cache()

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write("\n".join(lines) + "\n\n")
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
