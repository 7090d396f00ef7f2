"""Retrieval heads on the embedded model: do they matter, what does scoring cost, is it stable?

On a needle suite of ≤ 1.5k tokens (default: 512 and 1024 tokens × 5 depths × 3 needle kinds =
30 samples) this measures

1. **causal effect** — needle accuracy with the top-K retrieval heads ablated against K random
   other heads (mean of ``--draws`` draws): ``drop_top / drop_random`` (target ≥ 3), for zero
   ablation and for mean ablation (zeroing an early head can break the model for reasons that
   have nothing to do with retrieval; mean ablation keeps the residual stream on-distribution);
2. **scoring cost** — wall time of `trace_sample` (one routed SDPA pass giving both the greedy
   and the teacher-forced score) per sample, against the model's own generation of the same
   answer: a plain Hugging Face model with ``attn_implementation="sdpa"``, ``generate`` with at
   most as many new tokens (target ≤ 1.5×); measured sample by sample, interleaved, so both see the same
   machine load; the ratio reported is the median of the per-sample ratios;
3. **split-half stability** — Spearman correlation of the per-head greedy score between two
   disjoint halves of the counted samples (target ≥ 0.8); the seed-0 split and the mean over 20
   random splits.

    python benchmarks/probes_retrieval.py                       # ~5 min on 2 idle cores
    python benchmarks/probes_retrieval.py --threads 1           # on a shared, busy machine
    python benchmarks/probes_retrieval.py --lengths 512 --depths 0.5 --k 5 --draws 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--kinds", default="passkey,kv,phrase")
    parser.add_argument("--k", type=int, default=10, help="heads ablated (default 10)")
    parser.add_argument("--draws", type=int, default=3, help="random head sets (default 3)")
    parser.add_argument(
        "--methods", default="zero,mean",
        help="ablation methods for the causal check (default zero,mean; mean uses head means over 4 "
        "haystack-only prompts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice); 1 is much faster on a shared, busy machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from attnlab.models import cache_dir, load_model
    from attnlab.probes.ablation import head_means
    from attnlab.probes.causal import causal_check, summarize_causal
    from attnlab.probes.needle import needle_samples
    from attnlab.probes.retrieval import score_traces, spearman, trace_sample
    from attnlab.prompts import builtin_prompts

    torch.set_grad_enabled(False)
    started = time.perf_counter()
    model = load_model("smollm2-135m", verbose=False)
    plain = AutoModelForCausalLM.from_pretrained(
        cache_dir() / "models" / "smollm2-135m", dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    samples = needle_samples(
        model,
        lengths=[int(v) for v in args.lengths.split(",")],
        depths=[float(v) for v in args.depths.split(",")],
        kinds=args.kinds.split(","),
        seed=args.seed,
    )

    def generate(sample, n_new: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out = plain.generate(
            sample.input_ids, attention_mask=torch.ones_like(sample.input_ids), max_new_tokens=n_new,
            do_sample=False, pad_token_id=model.tokenizer.eos_token_id,
        )
        return out[0, sample.n_tokens :].tolist(), time.perf_counter() - t0

    trace_sample(model, samples[0])  # warm-up: first calls pay one-off costs
    generate(samples[0], 4)
    traces, ratios, same_tokens = [], [], 0
    for i, sample in enumerate(samples):
        trace = trace_sample(model, sample)
        tokens, base_s = generate(sample, len(trace.greedy_ids))
        traces.append(trace)
        ratios.append(trace.seconds / base_s)
        same_tokens += tokens == trace.greedy_ids
        print(
            f"[{i + 1}/{len(samples)}] {sample.name}: {trace.greedy_text!r} score {trace.seconds:.2f}s "
            f"generate {base_s:.2f}s", file=sys.stderr, flush=True,
        )
    greedy = score_traces(traces, samples, "greedy")
    teacher = score_traces(traces, samples, "teacher")
    splits = [greedy.split_half(seed) for seed in range(20)]
    splits = [s for s in splits if s is not None]

    methods = args.methods.split(",")
    means = None
    if "mean" in methods:
        means = head_means(model, builtin_prompts(model.tokenizer, [512], 4, seed=args.seed + 1, kinds=["narrative"]))
    causal, frames = {}, []
    for i, method in enumerate(methods):
        frame = causal_check(
            model, samples, greedy.ranking(), ks=(args.k,), draws=args.draws, method=method, means=means,
            seed=args.seed, dense=i == 0, progress=True,
        )
        frames.append(frame)
        causal[method] = summarize_causal(pd.concat([frames[0].iloc[:1], frame.iloc[1 if i == 0 else 0 :]]))[
            "per_k"
        ][str(args.k)]
    total_s = time.perf_counter() - started

    score = greedy.score
    top = [f"{layer}.{h} ({float(score[layer, h]):.2f})" for layer, h in greedy.ranking()[:10]]
    figures = {
        "samples": len(samples),
        "counted_greedy": greedy.n_counted,
        "counted_teacher": teacher.n_counted,
        "causal": causal,
        "random_heads": {
            f"draw{d}": json.loads(frames[0][frames[0]["condition"] == "random"]["heads"].iloc[d])
            for d in range(args.draws)
        },
        "score_s_per_sample": statistics.mean(t.seconds for t in traces),
        "cost_ratio_median": statistics.median(ratios),
        "cost_ratio_mean": statistics.mean(ratios),
        "same_tokens_as_generate": same_tokens,
        "split_half_seed0": greedy.split_half(0),
        "split_half_mean20": statistics.mean(splits) if splits else None,
        "mode_spearman": spearman(greedy.score, teacher.score),
        "retrieval_heads_ge_0.1": int((score >= 0.1).sum()),
        "top_heads": top,
        "runtime_s": total_s,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)

    def fmt(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    command = "python benchmarks/probes_retrieval.py " + " ".join(sys.argv[1:])
    dense = causal[methods[0]]["dense"]
    causal_rows = "".join(
        f"| accuracy, top-{args.k} retrieval heads {m}-ablated | {fmt(c['top'])} | |\n"
        f"| accuracy, {args.k} random other heads {m}-ablated (mean of {args.draws}) | {fmt(c['random_mean'])} "
        f"({', '.join(fmt(a) for a in c['random'])}) | |\n"
        f"| accuracy drop, top ÷ random ({m}) | "
        f"{fmt(c['ratio'], '.1f') + '×' if c['ratio'] is not None else 'random drop 0'} "
        f"({fmt(c['drop_top'])} vs {fmt(c['drop_random'])}) | ≥ 3× |\n"
        for m, c in causal.items()
    )
    print(
        f"\n### probes: retrieval heads — {time.strftime('%Y-%m-%d')}, {platform.node()} "
        f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}), "
        f"`{command.strip()}`, {total_s / 60:.1f} min\n\n"
        f"SmolLM2-135M-Instruct, {len(samples)} needle samples (lengths {args.lengths}, depths {args.depths}, "
        f"kinds {args.kinds}); {greedy.n_counted} answered correctly and counted.\n\n"
        "| measure | value | target |\n|---|---:|---:|\n"
        f"| needle accuracy, dense | {fmt(dense)} | |\n"
        + causal_rows +
        f"| scoring cost ÷ SDPA `generate` of the same answer (median per sample) | "
        f"{fmt(figures['cost_ratio_median'])}× (mean {fmt(figures['cost_ratio_mean'])}×, "
        f"{fmt(figures['score_s_per_sample'])} s/sample) | ≤ 1.5× |\n"
        f"| split-half Spearman of per-head scores (seed 0; mean of 20 splits) | "
        f"{fmt(figures['split_half_seed0'])}; {fmt(figures['split_half_mean20'])} | ≥ 0.8 |\n"
        f"| greedy answers identical to HF `generate` (samples) | {same_tokens}/{len(samples)} | all |\n"
        f"| Spearman greedy vs teacher-forced scores | {fmt(figures['mode_spearman'])} | |\n"
        f"| heads with score ≥ 0.1 (of {score.numel()}) | {figures['retrieval_heads_ge_0.1']} | |\n\n"
        f"Top heads (layer.head, greedy score): {', '.join(top)}.\n"
    )


if __name__ == "__main__":
    main()
