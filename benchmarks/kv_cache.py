"""Decode-phase policies on SmolLM2: needle accuracy with a compressed KV cache at a KV budget,
the budgeted policy against the KV baselines at the same budget, KV bytes held against the
policies' predictions, and decode speed and peak memory at 4k tokens.

1. Profile the embedded model (q/k path, built-in prompts at ``--length`` tokens).
2. The retrieval probe on that run (``--retrieval-samples``), then the budgeted policy
   (`PolicyGenerator(budget_kind="kv")`, retrieval heads kept full, its decode section implied
   by its choice) and every baseline of `baselines.kv_baselines` at the same KV budget, given the
   same retrieval scores.
3. ``--samples`` passkey samples of ``--length`` tokens (another seed than the profile's
   prompts): each answered greedily once with a full cache (the baseline) and once per policy
   with its compressed cache; paired counts, and a paired bootstrap interval of the accuracy
   difference (compressed − dense).
4. At ``--speed-length`` tokens: prefill + ``--new-tokens`` greedy tokens, dense and budgeted,
   each in its own process: decode tokens/s and the growth of peak RSS over the loaded model.

    python benchmarks/kv_cache.py --samples 60 --length 2048 --budget 0.25 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEED_CHILD = r"""
import json, sys, time, torch
import attnlab
from attnlab.sparsity_stats.kvcache import greedy_decode
from attnlab.sparsity_stats.policy import Policy
policy_path, n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_grad_enabled(False)
model = attnlab.load_model("smollm2-135m", verbose=False)
policy = None if policy_path == "dense" else Policy.load(policy_path)
ids = torch.randint(100, 30000, (1, n), generator=torch.Generator().manual_seed(3))
greedy_decode(model, ids[:, :32], policy, 2)  # warm-up: the identity check, kernel set-up
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
t = time.perf_counter()
prefill = greedy_decode(model, ids, policy, 1)
t_prefill = time.perf_counter() - t
t = time.perf_counter()
out = greedy_decode(model, ids, policy, new)
total = time.perf_counter() - t
decode_s = max(total - t_prefill, 1e-9)
print(json.dumps({"prefill_s": t_prefill, "decode_s": decode_s, "tokens_per_s": (new - 1) / decode_s,
                  "peak_bytes": rss("VmHWM:") - base}))
"""


def prefill_once(model, ids, window: int):
    """The dense prefill every decode-phase policy starts from, run once: per layer the last
    ``window`` queries, the keys and values, the scaling; and the logits of the last position."""
    from attnlab.attention import route_attention, sdpa

    layers = {}

    def fn(layer, query, key, value, *, scaling, attention_mask=None):
        layers[layer] = (query[..., -window:, :].clone(), key.clone(), value.clone(), scaling)
        return sdpa(query, key, value, scaling=scaling)

    with route_attention(model, fn):
        logits = model.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    return layers, logits


def decode_from(model, prefilled, policy, limit: int, stop):
    """Greedy decode after ``prefilled`` with ``policy``'s cache (None: full), filled and
    compressed exactly as `CachedAttention` does at the end of a prefill."""
    import torch
    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import forward_with_cache
    from attnlab.sparsity_stats.kvcache import (
        CachedAttention,
        PolicyCache,
        _dense_fn,
        window_scores,
    )

    layers, logits = prefilled
    if policy is None:
        cache = DynamicCache(config=model.hf_model.config)
        for la, (_, k, v, _) in layers.items():
            cache.update(k, v, la)
        fn = _dense_fn(None)
    else:
        cache = PolicyCache(policy, model.n_layers)
        for la, (q, k, v, scaling) in layers.items():
            lc = cache.layers[la]
            lc.update(k, v)
            lc.compress(window_scores(q, k, scaling, lc.heads) if any(h.kind == "snapkv" for h in lc.heads) else None)
        fn = CachedAttention(cache)
    tokens = [int(logits.argmax())]
    with route_attention(model, fn):
        while len(tokens) < limit and not stop(tokens):
            out = forward_with_cache(model.hf_model, torch.tensor([[tokens[-1]]]), cache, logits_to_keep=1)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, cache


def paired_ci(dense: np.ndarray, comp: np.ndarray, *, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval of mean(comp) − mean(dense) over samples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dense), size=(n, len(dense)))
    diff = comp[idx].mean(1) - dense[idx].mean(1)
    return float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--profile-samples", type=int, default=4)
    parser.add_argument("--retrieval-samples", type=int, default=10,
                        help="needle samples of the retrieval probe run on the profile (0: none; no head is then protected)")
    parser.add_argument("--last-queries", type=int, default=256,
                        help="profile the attention of the last queries only: what decode-time attention looks like")
    parser.add_argument("--speed-length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, help="keep the profile and policies here (default: a temporary folder)")
    parser.add_argument("--minutes", type=float, default=0,
                        help="stop taking needle samples after this many minutes (0: no limit); the table says how many ran")
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()
    import torch
    from tqdm.auto import tqdm

    import attnlab
    from attnlab import PolicyGenerator, StatConfig, builtin_prompts
    from attnlab.errors import AttnlabError
    from attnlab.probes.needle import default_max_new_tokens, grade, make_stop
    from attnlab.runs import DETECTIONS, HEAD_STATS, Run
    from attnlab.sparsity_stats import compute_curves
    from attnlab.sparsity_stats.baselines import kv_baselines
    from attnlab.sparsity_stats.kvcache import greedy_decode
    from attnlab.sparsity_stats.validation import _needle_samples

    torch.set_grad_enabled(False)
    work = args.work or Path(tempfile.mkdtemp(prefix="attnlab-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = attnlab.load_model("smollm2-135m", verbose=False)
    prompts = builtin_prompts(model.tokenizer, [args.length], args.profile_samples, seed=0)
    try:  # a finished profile in --work is reused; an interrupted one resumes
        run = Run.open(work / "profile")
        run.require(HEAD_STATS)
    except AttnlabError:
        run = attnlab.profile(model, prompts, work / "profile", config=StatConfig(block_size=64, last_queries=args.last_queries),
                              path="qk")
    if args.retrieval_samples and not run.has(DETECTIONS):  # retrieval heads: protected by the generator and Duo/Razor/HeadKV
        probe = subprocess.run([sys.executable, "-m", "attnlab.cli", "probe", "retrieval", "--model", "smollm2-135m",
                                "--out", str(work / "profile"), "--samples", str(args.retrieval_samples),
                                "--lengths", str(args.length), "--causal-k", "", "--quiet"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise SystemExit(f"retrieval probe failed:\n{probe.stderr[-3000:]}")
        run = Run.open(work / "profile")
    curves = compute_curves(run)
    budgeted = PolicyGenerator(budget=args.budget, budget_kind="kv").fit(curves).emit()
    policies = {"budgeted": budgeted, **kv_baselines(curves, args.budget, retrieval_scores=curves.retrieval_scores)}
    for name, p in policies.items():
        p.save(work / f"{name}.json")
    samples = _needle_samples(model, args.samples, args.length, seed=1)
    correct = {name: [] for name in ["dense", *policies]}
    held = {name: 0 for name in policies}
    predicted = {name: 0 for name in policies}
    dense_bytes = {name: 0 for name in policies}
    window = max([32, *(e.params.get("window", 0) for p in policies.values() for e in p.decode_heads())])
    for i, s in enumerate(tqdm(samples, desc="needles", unit="sample")):
        if args.minutes and time.perf_counter() - started > 60 * args.minutes:
            print(f"stopping after {i} samples: --minutes {args.minutes} reached", flush=True)
            break
        limit, stop = default_max_new_tokens(s), make_stop(model, s, stop_on_answer=True)
        prefilled = prefill_once(model, s.input_ids, window)  # decode-phase policies share the dense prefill
        tokens, _ = decode_from(model, prefilled, None, limit, stop)
        if i == 0:  # the shortcut is the library's path: same tokens as greedy_decode
            assert tokens == greedy_decode(model, s.input_ids, None, limit, stop=stop).tokens
        correct["dense"].append(bool(grade(s, model.tokenizer.decode(tokens, skip_special_tokens=True))["contains"]))
        for name, p in policies.items():
            tokens, cache = decode_from(model, prefilled, p, limit, stop)
            if i == 0 and name == "budgeted":
                assert tokens == greedy_decode(model, s.input_ids, p, limit, stop=stop).tokens, name
            correct[name].append(bool(grade(s, model.tokenizer.decode(tokens, skip_special_tokens=True))["contains"]))
            rep = cache.kv_report()
            held[name] += rep["kv_bytes_held"]
            predicted[name] += rep["kv_bytes_predicted"]
            dense_bytes[name] += rep["kv_bytes_dense"]
        (work / "needles.json").write_text(json.dumps({"correct": correct, "held": held, "predicted": predicted,
                                                       "dense_bytes": dense_bytes}))
    needle_s = time.perf_counter() - started
    (work / "needles.json").write_text(json.dumps({"correct": correct, "held": held, "predicted": predicted,
                                                   "dense_bytes": dense_bytes, "seconds": needle_s}))
    n_done = len(correct["dense"])
    d = np.array(correct["dense"], dtype=float)
    rows = [f"| dense (full cache, the baseline) | 1.000 | — | {d.mean():.3f} | — | — | — |"]
    result = {"dense": d.mean()}
    for name in policies:
        c = np.array(correct[name], dtype=float)
        lo, hi = paired_ci(d, c)
        both, d_only = int(((d == 1) & (c == 1)).sum()), int(((d == 1) & (c == 0)).sum())
        c_only, neither = int(((d == 0) & (c == 1)).sum()), int(((d == 0) & (c == 0)).sum())
        result[name] = c.mean()
        rows.append(f"| {name} | {held[name] / dense_bytes[name]:.3f} | {held[name] / predicted[name]:.4f} | {c.mean():.3f} | "
                    f"{c.mean() - d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {both} / {d_only} / {c_only} / {neither} | "
                    f"{', '.join(f'{k} {v}' for k, v in _kinds(policies[name]).items())} |")
        print(rows[-1], flush=True)
    speed = {}
    for name, path in (("dense", "dense"), ("budgeted", str(work / "budgeted.json"))) if args.speed_length > 0 else ():
        out = subprocess.run([sys.executable, "-c", SPEED_CHILD, path, str(args.speed_length), str(args.new_tokens)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"speed run {name} failed:\n{out.stderr[-3000:]}")
        speed[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, speed[name], flush=True)
    kv_full = 2 * model.n_layers * model.n_kv_heads * model.head_dim * 4 * (args.speed_length + args.new_tokens)
    best_baseline = max((n for n in policies if n != "budgeted"), key=lambda n: result[n])
    text = "\n".join([
        "## Decode-phase policies: needle accuracy at a KV budget (`benchmarks/kv_cache.py`)",
        "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} cores (shared with other work), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; needles took {needle_s / 60:.0f} min",
        f"- command: `python benchmarks/kv_cache.py --samples {args.samples} --length {args.length} --budget {args.budget} "
        f"--profile-samples {args.profile_samples} --retrieval-samples {args.retrieval_samples} --last-queries {args.last_queries} --speed-length {args.speed_length} --new-tokens {args.new_tokens}`",
        f"- model: smollm2-135m; profile: {args.profile_samples} built-in prompts of {args.length} tokens (q/k path, the last {args.last_queries} queries: decode-time attention); "
        f"budgeted = `PolicyGenerator(budget={args.budget}, budget_kind=\"kv\")`; baselines = `kv_baselines` at the same "
        "budget; retrieval heads from `attnlab probe retrieval` with "
        f"{args.retrieval_samples} samples on the profile (the generator keeps them full; Duo/Razor/HeadKV rank by them); "
        "prefill dense for all (decode-phase only)",
        f"- {n_done} passkey samples of {args.length} tokens (seed 1; {args.samples} asked), greedy; the baseline is the full cache on the "
        "same samples; Δ = compressed − dense with a 95% paired bootstrap interval; paired = both right / only dense / "
        "only compressed / neither",
        "",
        "| policy | KV held / dense | held / predicted | needle accuracy | Δ vs dense [95% CI] | paired | decode kinds (KV heads) |",
        "|---|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        f"Targets: budgeted within 5 points of dense: **{'yes' if result['budgeted'] >= result['dense'] - 0.05 else 'NO'}** "
        f"({result['budgeted']:.3f} vs {result['dense']:.3f}); ≥ every baseline: "
        f"**{'yes' if all(result['budgeted'] >= result[n] for n in policies if n != 'budgeted') else 'NO'}** "
        f"(best baseline {best_baseline} {result[best_baseline]:.3f}).",
        "",
    ])
    if speed:
        text += "\n" + "\n".join([
            f"Decode at {args.speed_length} tokens + {args.new_tokens} generated (one process each, greedy, random prompt):",
            "",
            "| cache | prefill s | decode tokens/s | peak RSS growth MiB |",
            "|---|---:|---:|---:|",
            *(f"| {k} | {v['prefill_s']:.1f} | {v['tokens_per_s']:.2f} | {v['peak_bytes'] / 2**20:.0f} |" for k, v in speed.items()),
            "",
            f"Dense KV cache at {args.speed_length + args.new_tokens} tokens: {kv_full / 2**20:.0f} MiB; the budgeted policy "
            f"predicts {budgeted.predicted_kv_fraction(args.speed_length):.3f} of it. Peak saving measured: "
            f"{(speed['dense']['peak_bytes'] - speed['budgeted']['peak_bytes']) / 2**20:.0f} MiB; decode speed ratio "
            f"{speed['budgeted']['tokens_per_s'] / speed['dense']['tokens_per_s']:.2f}×.",
            "",
        ])
    print(text)
    (work / "kv_cache.md").write_text(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)


def _kinds(policy) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in policy.decode_heads():
        out[e.kind] = out.get(e.kind, 0) + 1
    return out


if __name__ == "__main__":
    main()
