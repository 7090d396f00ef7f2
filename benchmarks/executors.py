"""CPU executor benchmark: model prefill under a sparse policy against dense SDPA prefill.

On the embedded model, for each length: the whole-model prefill (no unembedding) with dense
SDPA attention (baseline), and with the ``flex`` executor under a policy of about the requested
density — uniform streaming (sink + window) by default, or a budgeted policy generated from a
profile run (``--run``). The first flex call at each shape compiles; the figure is the best of
the timed repeats after one warm-up.

    python benchmarks/executors.py --lengths 2048,8192 --density 0.2
    python benchmarks/executors.py --run runs/long --lengths 8192 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def streaming_policy(model, n: int, density: float, block_size: int = 64):
    """Every head streaming with a 64-token sink and the window that gives ``density`` at ``n``."""
    from attnlab.sparsity_stats.policy import POLICY_FORMAT, POLICY_SCHEMA, Policy

    # causal area ≈ n²/2; a band of width w covers ≈ n·w − w²/2, plus the sink columns
    lo, hi = 1, n
    while lo < hi:
        w = (lo + hi) // 2
        covered = n * w - w * w / 2 + 64 * (n - w)
        if covered / (n * n / 2) < density:
            lo = w + 1
        else:
            hi = w
    heads = [
        {"layer": la, "head": h, "kv_head": model.kv_head(h), "kind": "streaming", "params": {"sink": 64, "window": lo}}
        for la in range(model.n_layers)
        for h in range(model.n_heads)
    ]
    return Policy.from_dict({"format": POLICY_FORMAT, "schema": POLICY_SCHEMA, "model": model.identity(), "block_size": block_size, "heads": heads})


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and Inductor compile for flex)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--run", default=None, help="profile run to generate a budgeted policy from (default: uniform streaming)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--append", default=None)
    args = parser.parse_args()

    from attnlab.attention import route_attention
    from attnlab.models import load_model
    from attnlab.prompts import builtin_prompts
    from attnlab.sparsity_stats.executors import PolicyExecutor

    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", verbose=False)
    rows = []
    for n in [int(v) for v in args.lengths.split(",")]:
        if args.run:
            from attnlab.sparsity_stats import PolicyGenerator

            policy = PolicyGenerator(budget=args.density).fit(args.run).emit()
            label = f"budgeted ({args.run})"
        else:
            policy = streaming_policy(model, n, args.density)
            label = "uniform streaming"
        ids = builtin_prompts(model.tokenizer, [n], 1, seed=7)[0].input_ids
        ex = PolicyExecutor(policy, "flex")

        def dense(ids=ids):
            with route_attention(model):
                model.hf_model.base_model(ids, use_cache=False)

        def sparse(ids=ids, ex=ex):
            with route_attention(model, ex.attention):
                model.hf_model.base_model(ids, use_cache=False)

        t_dense = timed(dense, args.repeats)
        t_sparse = timed(sparse, args.repeats)
        density = float(torch.cat([lay.density for lay in ex.layouts_.values()]).mean())
        rows.append((n, label, density, t_dense, t_sparse, t_dense / t_sparse))
        print(rows[-1], flush=True)
    header = (
        f"### executors (CPU) — {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores), "
        f"`python benchmarks/executors.py --lengths {args.lengths} --density {args.density}"
        f"{' --run ' + args.run if args.run else ''}`\n\n"
        "Baseline: dense SDPA prefill of the same model and prompt in the same run (no unembedding).\n\n"
        "| tokens | policy | achieved density | dense SDPA s | flex policy s | speedup (dense ÷ flex) |\n|---:|---|---:|---:|---:|---:|\n"
    )
    body = "".join(f"| {n} | {lab} | {d:.3f} | {td:.2f} | {ts:.2f} | {r:.2f}× |\n" for n, lab, d, td, ts, r in rows)
    print(header + body)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + header + body)


if __name__ == "__main__":
    main()
