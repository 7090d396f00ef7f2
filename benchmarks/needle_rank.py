"""Would a larger top-k keep the needle, or does the pick's estimate not see it?

The 4k essay diagnosis (`task_suite_multikey.py`; RESULTS.md, "Task suite at 4k: 34 of the 60
shards") found that where the budgeted pick misses an essay needle and XAttention answers, the
pick's last prompt row keeps the whole needle on about half of the heads that read it. The pick's
`block_topk` heads choose their key blocks per input, by the dot product of mean-pooled queries
and keys, and keep a number of blocks fixed per head; XAttention ranks blocks by antidiagonal
sums. This script separates the two causes. It runs the pick's prefill on the samples of an
earlier diagnosis (its ``--out`` JSON: the samples, their groups and their needle heads) and, on
every needle head the pick runs as ``block_topk``, ranks the key blocks of the last query-block row
as the pick's selection does (the diagonal first, the first block second, then by score), by

- ``pooled``: the pick's own estimate (mean-pooled q . k, softmax over causal blocks);
- ``antidiagonal``: XAttention's scores (stride 8) of the same queries and keys.

For each, the blocks a top-k needs to keep the whole needle (the worst rank among the needle's
blocks) is set against the head's ``k``: a needle ranked just past ``k`` would be kept by a
somewhat larger ``k``; one ranked far down is not seen by the estimate at all. The queries and
keys are the pick's own (its earlier layers ran sparse), so the pooled ranks are the ones its
selection used: the script checks that ``needed <= k`` exactly where the mask kept the needle.

    python benchmarks/needle_rank.py benchmarks/data/eval-4k-seed4/essay-lastrow.json \\
        --policy benchmarks/data/eval-4k-seed4/policies/p68n4k.json --out needle-rank.json
    python benchmarks/needle_rank.py --report needle-rank.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from task_suite_multikey import (  # the same folder: run as a script
    last_row_mask,
    needle_span,
    read_report,
    token_starts,
)

RULES = ("pooled", "antidiagonal")


def block_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every key block in the last query-block row, ``[H, KB]``, in the order the
    pick's top-k takes them (the diagonal, then the first block, then by score; ties share the
    better rank). ``scores [H, QB, KB]``."""
    from attnlab.sparsity_stats.kinds import _forced_scores

    s, _ = _forced_scores(scores)
    row = s[:, -1, :]  # [H, KB]
    return 1 + (row[:, None, :] > row[:, :, None]).sum(-1)


class Ranker:
    """An attention function for `route_attention`: runs the pick's executor and, on its prefill,
    records per layer the last row's ranks of every key block under both estimates, and the mask
    the pick ran."""

    def __init__(self, executor, stride: int = 8):
        self.executor, self.stride = executor, stride
        self.ranks: dict[int, dict[str, torch.Tensor]] = {}
        self.kept: dict[int, torch.Tensor] = {}

    def __call__(self, layer, query, key, value, *, scaling, attention_mask=None, **kw):
        from attnlab.sparsity_stats.dynamic import antidiagonal_block_scores
        from attnlab.sparsity_stats.kinds import estimate_block_scores

        out = self.executor.attention(layer, query, key, value, scaling=scaling, attention_mask=attention_mask, **kw)
        if query.shape[-2] == key.shape[-2]:  # the prefill
            q, k = query[0].float(), key[0].float()
            b = self.executor.policy.block_size
            self.ranks[layer] = {
                "pooled": block_ranks(estimate_block_scores(q, k, b).blocks),
                "antidiagonal": block_ranks(antidiagonal_block_scores(q, k, b, stride=self.stride)),
            }
            self.kept[layer] = last_row_mask(self.executor.layouts_[layer])
        return out


def measure(model, sample, executor) -> Ranker:
    """The pick's prefill of ``sample`` under the `Ranker`."""
    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import forward_with_cache

    rec = Ranker(executor)
    with torch.no_grad(), route_attention(model, rec):
        cache = DynamicCache(config=model.hf_model.config)
        forward_with_cache(model.hf_model, sample.input_ids.to(model.device), cache, logits_to_keep=1)
    return rec


def report(rows: list[dict]) -> None:
    """Per group of samples: over needle heads the pick runs as ``block_topk``, how many keep the
    whole needle, and how many would at ``k`` times 1.5, 2 and 3, under either estimate."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    print("| samples | needle heads (block_topk) | estimate | kept at k | at 1.5 k | at 2 k | at 3 k | median needed / k |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for g in groups:
        heads = [h for r in rows if r["group"] == g for h in r["heads"]]
        n_samples = sum(r["group"] == g for r in rows)
        for rule in RULES:
            ratio = np.array([h[f"needed_{rule}"] / h["k"] for h in heads])
            cells = " | ".join(f"{int((ratio <= f).sum())} ({(ratio <= f).mean():.0%})" for f in (1, 1.5, 2, 3))
            print(f"| {g} ({n_samples}) | {len(heads)} | {rule} | {cells} | {np.median(ratio):.2f} |")
    print("\nPer layer (all samples): needle heads run as block_topk, kept at k by the pooled estimate / by the antidiagonal one")
    layers = sorted({h["layer"] for r in rows for h in r["heads"]})
    for layer in layers:
        hs = [h for r in rows for h in r["heads"] if h["layer"] == layer]
        print(f"- layer {layer}: {len(hs)} heads; pooled {sum(h['needed_pooled'] <= h['k'] for h in hs)}, "
              f"antidiagonal {sum(h['needed_antidiagonal'] <= h['k'] for h in hs)}; "
              f"k {sorted({h['k'] for h in hs})}, needed (pooled) {sorted(h['needed_pooled'] for h in hs)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = read_report(argv)
    if saved is not None:
        report(saved["rows"])
        return 0
    ap.add_argument("diagnosis", help="the --out JSON of task_suite_multikey.py (samples, groups, needle heads)")
    ap.add_argument("--policy", required=True, help="the budgeted pick's policy file")
    ap.add_argument("--executor", default="reference", choices=["reference", "flex"])
    ap.add_argument("--out", default="/tmp/needle-rank.json")
    args = ap.parse_args(argv)

    import attnlab
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.kinds import get_kind
    from attnlab.sparsity_stats.policy import Policy
    from attnlab.tasks import build_task_sample

    diag = json.loads(Path(args.diagnosis).read_text())
    task, length, seed = diag["args"]["task"], diag["args"]["length"], diag["args"]["seed"]
    policy = Policy.load(args.policy)
    t0 = time.perf_counter()
    model = attnlab.load_model("smollm2-135m", verbose=False)
    executor = PolicyExecutor(policy, args.executor)
    executor.check_model(model, args.policy)
    n_heads, b = policy.n_heads, policy.block_size

    from tqdm.auto import tqdm

    rows = []
    for r in tqdm(diag["results"], desc="samples", unit="sample"):
        index = int(r["sample"].rsplit("-", 1)[1])
        sample = build_task_sample(model.tokenizer, task, length, index, seed=seed)
        ids = sample.input_ids[0].tolist()
        text, starts = token_starts(model.tokenizer, ids)
        a, z = needle_span(text, starts, sample.answers[0])
        blocks = sorted({t // b for t in range(a, z)})
        rec = measure(model, sample, executor)
        heads = []
        for flat in r["top"]:
            layer, head = divmod(int(flat), n_heads)
            entry = policy.layer(layer)[head]
            if entry.kind != "block_topk" or "topk" not in entry.params:
                continue
            k = get_kind("block_topk").topk_blocks(entry.params, len(ids), b)
            needed = {rule: int(rec.ranks[layer][rule][head, blocks].max()) for rule in RULES}
            kept_whole = bool(rec.kept[layer][head, a:z].all())
            if kept_whole != (needed["pooled"] <= k):
                raise SystemExit(f"{r['sample']} layer {layer} head {head}: the mask kept the needle "
                                 f"{'whole' if kept_whole else 'partly'} but the pooled rank says {needed['pooled']} of k {k}: "
                                 "the ranks do not describe the selection that ran")
            heads.append({"layer": layer, "head": head, "k": k, "kept": kept_whole,
                          **{f"needed_{rule}": v for rule, v in needed.items()}})
        rows.append({"sample": r["sample"], "group": r["group"], "needle_blocks": blocks, "heads": heads})
    elapsed = time.perf_counter() - t0
    print(f"# {task} at {length} (seed {seed}): where the pick's top-k ranks the needle, last query-block row")
    print(f"{datetime.date.today()}, {platform.node()}, {elapsed / 60:.1f} min; "
          f"command: python benchmarks/needle_rank.py {shlex.join(argv)}\n")
    report(rows)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"\nper-head ranks: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
