"""Compiled FlexAttention on the CPU over prompts of many lengths: what the recompile limit cost.

An eval answers prompts whose lengths differ by a few tokens (2030-2048 at ``--lengths 2048``),
and compiled Flex compiles once per length. Past torch._dynamo's default recompile limit (8)
it fell back to Flex's eager path, which materialises the scores. `flex_block_sparse_attention`
now raises the limit for its own calls (`attnlab.kernels.flex.FLEX_RECOMPILE_LIMIT`).

For each of ``--count`` consecutive lengths from ``--length``, on SmolLM2's shapes (9 query heads
over 3 KV heads of 64 dims, batch 1) and a random block layout at ``--density`` (causal,
``--block``-token blocks), one process measures:

- the first compiled call at that length (compile + run), and a second one (run only);
- the eager call (what the fallback ran), the baseline, in the same process.

    python benchmarks/flex_lengths.py --length 2030 --count 4 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from attnlab.kernels import BlockSparseLayout, reference_attention
from attnlab.kernels.flex import flex_block_sparse_attention
from attnlab.kernels.synthetic import random_blocks


def layout(n: int, block: int, density: float, heads: int) -> BlockSparseLayout:
    generator = torch.Generator().manual_seed(n)
    kept = torch.stack([random_blocks(n, n, block, density, generator=generator) for _ in range(heads)])
    return BlockSparseLayout.from_block_masks(kept, None, block_size=block, n_q=n, n_k=n, causal=True)


def timed(q, k, v, lay, *, compiled: bool) -> tuple[float, torch.Tensor]:
    """Seconds of one Flex call, and its output."""
    t0 = time.perf_counter()
    out, _ = flex_block_sparse_attention(q, k, v, lay, compiled=compiled)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2030)
    parser.add_argument("--count", type=int, default=4, help="consecutive lengths")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in range(args.length, args.length + args.count):
        lay = layout(n, args.block, args.density, 9)
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, 9, n, 64, generator=generator)
        k, v = (torch.randn(1, 3, n, 64, generator=generator) for _ in range(2))
        first, out = timed(q, k, v, lay, compiled=True)
        second, _ = timed(q, k, v, lay, compiled=True)
        eager, out_eager = timed(q, k, v, lay, compiled=False)
        gold, _ = reference_attention(q, k, v, lay.token_mask())
        err = max(float((out.double() - gold).abs().max()), float((out_eager.double() - gold).abs().max()))
        rows.append((n, first, second, eager, err))
        print(f"n={n}: compile+run {first:.2f} s, run {second:.3f} s, eager {eager:.3f} s, max |err| {err:.1e}", flush=True)
    lines = [
        "## FlexAttention on the CPU: prompts of many lengths (`benchmarks/flex_lengths.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: `{platform.platform()}`, "
        f"torch {torch.__version__}, {os.cpu_count()} cores (shared), {args.threads} thread(s)",
        f"- command: `python benchmarks/flex_lengths.py --length {args.length} --count {args.count} --block {args.block} "
        f"--density {args.density} --threads {args.threads}`",
        "- one Flex call = one layer's prefill attention: 9 query heads over 3 KV heads of 64 dims, a random causal "
        f"layout at density {args.density} with {args.block}-token blocks; the eager call (Flex's fallback past "
        "the recompile limit) is the baseline, in the same process",
        "",
        "| length | compile + run (s) | compiled run (s) | eager run (s) | eager / compiled | max abs error vs fp64 |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {a:.2f} | {b:.3f} | {c:.3f} | {c / b:.1f}x | {e:.1e} |" for n, a, b, c, e in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
