"""Sweep the block-sparse kernel's launch configuration (num_warps, num_stages) on a GPU.

For each head_dim and configuration it times the kernel on the dense causal layout and on a
25% block top-k layout, next to dense SDPA on the same q/k/v (timed once per shape), and checks
the dense output against SDPA. It prints one markdown row per configuration; the configuration
`attnlab.kernels.block_sparse._launch_config` chooses today is marked ``*``.

    python benchmarks/kernel_configs.py --length 16384 --head-dims 64 128
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch


def _build_layout():
    """`build_layout` of benchmarks/kernels.py (loaded by path: `kernels` is also a package name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("attnlab_kernel_benchmark", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_configs.py needs a CUDA device", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    from triton.testing import do_bench

    from attnlab.kernels import block_sparse as bs

    build_layout = _build_layout()
    chosen = bs._launch_config
    n, heads, kv_heads = args.length, 32, 8
    lines = [f"### launch configurations, {torch.cuda.get_device_name()}, N={n}, bf16, Hq={heads} Hkv={kv_heads}, block 64",
             "", "| D | warps | stages | dense ms | vs SDPA | top-25% ms | vs SDPA | max err vs SDPA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for d in args.head_dims:
        g = torch.Generator(device="cuda").manual_seed(d)
        q, k, v = (torch.randn(1, h, n, d, generator=g, device="cuda", dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
        sdpa_ms = do_bench(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        dense = build_layout("dense", n, heads, 64, device="cuda")
        top = build_layout("topk25", n, heads, 64, device="cuda")
        default = chosen(64, d)
        for warps, stages in itertools.product(args.warps, args.stages):
            bs._launch_config = lambda block, block_d, w=warps, s=stages: (w, s)
            try:
                out, _ = bs.block_sparse_attention(q, k, v, dense)
                err = (out.float() - want.float()).abs().max().item()
                dense_ms = do_bench(partial(bs.block_sparse_attention, q, k, v, dense, validate=False))
                top_ms = do_bench(partial(bs.block_sparse_attention, q, k, v, top, validate=False))
            except Exception as error:  # out of shared memory for some (stages, D)
                print(f"| {d} | {warps} | {stages} | failed: {type(error).__name__} |", flush=True)
                continue
            mark = " *" if (warps, stages) == default else ""
            row = (f"| {d} | {warps}{mark} | {stages}{mark} | {dense_ms:.3f} | {sdpa_ms / dense_ms:.2f}x | "
                   f"{top_ms:.3f} | {sdpa_ms / top_ms:.2f}x | {err:.3g} |")
            lines.append(row)
            print(row, flush=True)
        bs._launch_config = chosen
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
