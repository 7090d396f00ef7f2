"""Multi-key at the last prompt row: does each method's prefill read the asked key's needle?

`niah_multikey` hides four needles ("The secret number for KEY is VALUE.") and asks for one. At
2k (seed 4) FlexPrefill γ 0.9 answers 20 samples fully right that the budgeted pick misses, and
the pick 8 the other way (RESULTS.md, "Task suite at 2k: FlexPrefill (γ 0.9) on all 28 shards").
This script looks at the row the first reply token is read from, the prompt's last, in every
layer and head, as each method's prefill really runs it (the executor `attnlab eval` uses, its
own mask for this input, the hidden states its own earlier layers produced):

- ``asked``: the attention mass on the asked needle's tokens (from "The secret number" to the
  end of the value), under the method's mask and softmax over the keys it keeps;
- ``other``: the mass on the three distractor needles together;
- ``kept``: the share of the asked needle's tokens the method's mask keeps in that row.

The heads that matter for a sample are its *needle heads*: the ``--top`` (layer, head) pairs
where dense attention puts the most mass on the four needles together. Per method and per
group of samples (which of the pick and ``--against`` answered them right, and whether dense
did, read from the stored eval shards) the script prints, over needle heads, the mean ``asked``
and ``other`` mass, the share of needle heads whose mask keeps the whole asked needle, and the
selectivity ``asked / (asked + other)``; then the selectivity per layer, summed over the layer's
heads, on the layers where dense reads the needles most.

    python benchmarks/task_suite_multikey.py benchmarks/data/eval-2k-seed4 \\
        --policy benchmarks/data/eval-2k-seed4/policies/p68n2k.json \\
        --against flexprefill:gamma=0.9 --controls 8 --out multikey.json
    python benchmarks/task_suite_multikey.py --report multikey.json   # the tables again
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch


def token_starts(tokenizer, ids: list[int]) -> tuple[str, np.ndarray]:
    """The prompt's text and each token's first character in it (byte-level BPE: the tokens
    decoded one by one concatenate to the whole; checked)."""
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    text = "".join(pieces)
    if text != tokenizer.decode(ids, skip_special_tokens=False):
        raise SystemExit("the tokenizer's pieces do not concatenate to the prompt: needle spans can't be located")
    return text, np.cumsum([0] + [len(p) for p in pieces[:-1]])


def needle_span(text: str, starts: np.ndarray, value: str) -> tuple[int, int]:
    """Token range ``[a, b)`` of the needle holding ``value``: from "The secret number" before it
    to the value's last character."""
    end = text.find(f" is {value}.")
    if end < 0 or text.find(f" is {value}.", end + 1) >= 0:
        raise SystemExit(f"needle value {value} is not in the prompt exactly once")
    begin = text.rfind("The secret number", 0, end)
    last = end + len(f" is {value}") - 1
    a = int(np.searchsorted(starts, begin, side="right") - 1)
    b = int(np.searchsorted(starts, last, side="right"))
    return a, b


def last_row_mask(layout) -> torch.Tensor:
    """The layout's token mask on its last query row, bool ``[H, n_k]`` (what
    ``layout.token_mask()[:, -1]`` gives, without the ``[H, n_q, n_k]`` tensor)."""
    from attnlab.kernels.layout import attends

    listed = layout.block_mask()[:, -1].repeat_interleave(layout.block_size, dim=-1)[:, : layout.n_k]
    q_abs = torch.tensor(layout.n_q - 1 + layout.q_offset).reshape(1, 1)
    key = torch.arange(layout.n_k).reshape(1, -1)
    return listed & attends(q_abs, key, n_k=layout.n_k, causal=layout.causal, model_window=layout.model_window,
                            sink=layout.sink.to(torch.int64).reshape(-1, 1), window=layout.window.to(torch.int64).reshape(-1, 1))


class LastRow:
    """An attention function for `route_attention` that runs ``executor`` (or dense attention)
    and records, per layer, the last query row's attention probabilities under the mask that
    ran (``probs [H, n]``) and that mask (``kept [H, n]``)."""

    def __init__(self, executor):
        self.executor = executor
        self.probs: dict[int, torch.Tensor] = {}
        self.kept: dict[int, torch.Tensor] = {}

    def __call__(self, layer, query, key, value, *, scaling, attention_mask=None, **kw):
        from attnlab.attention import attend

        if self.executor is None:
            out = attend(query, key, value, scaling=scaling, **kw)
        else:
            out = self.executor.attention(layer, query, key, value, scaling=scaling, attention_mask=attention_mask, **kw)
        if query.shape[-2] == key.shape[-2]:  # the prefill
            h, hkv = query.shape[1], key.shape[1]
            q = query[0, :, -1].float()  # [H, d]
            k = key[0].float().repeat_interleave(h // hkv, dim=0)  # [H, n, d]
            scores = torch.einsum("hd,hnd->hn", q, k) * scaling
            kept = torch.ones_like(scores, dtype=torch.bool)
            if self.executor is not None:
                kept = last_row_mask(self.executor.layouts_[layer]).to(scores.device)
            self.probs[layer] = torch.softmax(scores.masked_fill(~kept, float("-inf")), -1)
            self.kept[layer] = kept
        return out


def measure(model, sample, executor, answer_ids=()) -> dict[str, np.ndarray]:
    """``probs [L, H, n]`` and ``kept [L, H, n]`` of the prompt's last row, and the prefill's
    greedy first token, under ``executor`` (None: dense). With ``answer_ids`` (the reference
    answer's tokens), the reply is then teacher-forced as `attnlab eval` decodes it (dense rows
    over the cache the method's prefill filled): ``p_answer [steps]`` is the probability of the
    reference's token at each step, ``greedy [steps]`` the token greedy decoding would have
    chosen there."""
    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import forward_with_cache

    rec = LastRow(executor)
    p_answer, greedy = [], []
    with torch.no_grad(), route_attention(model, rec):
        cache = DynamicCache(config=model.hf_model.config)
        logits = forward_with_cache(model.hf_model, sample.input_ids.to(model.device), cache, logits_to_keep=1).logits
        first = int(logits[0, -1].argmax())
        for i, token in enumerate(answer_ids):
            probs = torch.softmax(logits[0, -1].float(), -1)
            p_answer.append(float(probs[token]))
            greedy.append(int(probs.argmax()))
            if i + 1 < len(answer_ids):
                feed = torch.tensor([[token]], device=model.device)
                logits = forward_with_cache(model.hf_model, feed, cache, logits_to_keep=1).logits
    layers = sorted(rec.probs)
    return {"probs": torch.stack([rec.probs[i] for i in layers]).numpy(),
            "kept": torch.stack([rec.kept[i] for i in layers]).numpy(),
            "first": first, "p_answer": np.asarray(p_answer), "greedy": greedy}


def stored_answers(shards: str, task: str):
    """Whether each answer was right, from the eval shards under ``shards``: a table with one row
    per sample of ``task`` and one column per method."""
    import pandas as pd

    files = sorted(glob.glob(str(Path(shards) / "s*" / "eval_samples.parquet")))
    if not files:
        raise SystemExit(f"no eval shards (s*/eval_samples.parquet) under {shards}")
    t = pd.concat([pd.read_parquet(f) for f in files])
    t = t[t["task"] == task]
    return t.pivot(index="sample", columns="method", values="correct")


def report(results: list[dict], methods: list[str]) -> None:
    """The tables of the module docstring, from the per-sample measurements: samples grouped by
    which of the pick and the split baseline answered them, and whether dense did."""
    def key(r):
        return f"{r['group']}, dense {'right' if r['answered'].get('dense') else 'wrong'}"

    groups = list(dict.fromkeys(key(r) for r in results))
    distractors = any(r["values"].get("distractors") for r in results)
    print("| samples | n | method | right | asked | other | selectivity "
          "| asked kept whole |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for group in groups:
        rs = [r for r in results if key(r) == group]
        for method in methods:
            asked, other, whole = [], [], []
            for r in rs:
                d = r["methods"][method]
                asked.append(np.asarray(d["asked"]).ravel()[r["top"]].mean())
                other.append(np.asarray(d["other"]).ravel()[r["top"]].mean())
                whole.append((np.asarray(d["kept"]).ravel()[r["top"]] >= 1.0).mean())
            right = sum(r["answered"].get(method, False) for r in rs)
            a, o = np.mean(asked), np.mean(other)
            sel = f"{a / (a + o):.2f}" if distractors else "–"
            print(f"| {group} | {len(rs)} | {method} | {right} "
                  f"| {a:.3f} | {o:.3f} | {sel} | {np.mean(whole):.2f} |")
    dense_needles = np.mean([np.asarray(r["methods"]["dense"]["asked"]) + np.asarray(r["methods"]["dense"]["other"])
                             for r in results], axis=0).sum(-1)  # [L]: the layer's heads, summed
    layers = [int(i) for i in np.flatnonzero(dense_needles >= 0.5)]
    what = "selectivity asked / (asked + other)" if distractors else "the asked needle's mass"
    print(f"\n## per layer: {what}, the layer's heads summed, mean over samples")
    print(f"(layers where dense puts a mass of 0.5 or more on the needles, summed over heads: {layers})\n")
    print("| samples | method | " + " | ".join(f"L{i}" for i in layers) + " |")
    print("|---|---|" + "---:|" * len(layers))
    for group in groups:
        rs = [r for r in results if key(r) == group]
        for method in methods:
            a = np.mean([np.asarray(r["methods"][method]["asked"]).sum(-1) for r in rs], axis=0)
            o = np.mean([np.asarray(r["methods"][method]["other"]).sum(-1) for r in rs], axis=0)
            cells = [a[i] / (a[i] + o[i]) if distractors else a[i] for i in layers]
            print(f"| {group} | {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if all("p_answer" in d for r in results for d in r["methods"].values()):
        reply_report(results, methods, key, groups)


def reply_report(results, methods, key, groups) -> None:
    """The reference answer teacher-forced after each method's prefill (dense decode rows, as
    eval decodes): per group and method, the mean probability of the answer's first digit (the
    step after the leading space, if any), the smallest step probability, and where greedy
    decoding would first leave the reference."""
    print("\n## the reference reply, teacher-forced after each method's prefill (dense decode rows)")
    print("(steps: the answer's tokens; `leaves at`: the step where greedy decoding first picks "
          "another token, counted over the group's samples)\n")
    print("| samples | n | method | P(first digit) | smallest step P | follows the reference | "
          "leaves at its first digit | leaves later |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for group in groups:
        rs = [r for r in results if key(r) == group]
        for method in methods:
            first, low, keep, at_first, later = [], [], 0, 0, 0
            for r in rs:
                d = r["methods"][method]
                p = np.asarray(d["p_answer"])
                digit = r.get("first_digit", 0)
                first.append(p[digit])
                low.append(p.min())
                off = [i for i, (g, t) in enumerate(zip(d["greedy"], r["answer_ids"], strict=True)) if g != t]
                if not off:
                    keep += 1
                elif off[0] <= digit:
                    at_first += 1
                else:
                    later += 1
            print(f"| {group} | {len(rs)} | {method} | {np.mean(first):.2f} | {np.mean(low):.2f} "
                  f"| {keep} | {at_first} | {later} |")


def read_report(argv: list[str]) -> dict | None:
    """The saved measurements when ``argv`` is ``--report FILE``; None for a measuring run."""
    if argv[:1] != ["--report"]:
        return None
    if len(argv) != 2 or not Path(argv[1]).is_file():
        raise SystemExit("--report takes one file: the --out JSON of an earlier run")
    return json.loads(Path(argv[1]).read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = read_report(argv)
    if saved is not None:
        report(saved["results"], saved.get("methods") or list(saved["results"][0]["methods"]))
        return 0
    ap.add_argument("shards", help="folder of eval shards (s*/) holding the pick's and --against's answers")
    ap.add_argument("--policy", required=True, help="the budgeted pick's policy file (its name is the method's)")
    ap.add_argument("--against", default="flexprefill:gamma=0.9", help="the baseline to split samples by")
    ap.add_argument("--baseline", action="append", default=[], help="more baselines to measure (not to split by)")
    ap.add_argument("--task", default="niah_multikey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16, help="the baselines' block size (as --baseline-block-size)")
    ap.add_argument("--executor", default="reference", choices=["reference", "flex"],
                    help="how the sparse layers run: the same masks either way (eval used flex; reference "
                         "agrees with it to ~1e-6 and needs no compile per prompt length)")
    ap.add_argument("--controls", type=int, default=12, help="samples both answer right, measured as a control")
    ap.add_argument("--limit", type=int, default=0, help="at most this many samples per group (0: all)")
    ap.add_argument("--top", type=int, default=20, help="needle heads per sample")
    ap.add_argument("--out", default="/tmp/multikey.json", help="per-sample measurements (JSON)")
    args = ap.parse_args(argv)

    import attnlab
    from attnlab.sparsity_stats.dynamic import baseline_name, parse_baselines, published_policy
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.policy import Policy
    from attnlab.tasks import build_task_sample

    pick = Path(args.policy).stem
    against = parse_baselines(args.against)
    if len(against) != 1:
        raise SystemExit(f"--against {args.against}: give one setting (e.g. flexprefill:gamma=0.9), not a sweep")
    args.against = baseline_name(*against[0])  # eval's name for it, as the shards hold it
    table = stored_answers(args.shards, args.task)
    for m in (pick, args.against):
        if m not in table.columns:
            raise SystemExit(f"the shards under {args.shards} hold no answers of {m!r}: methods {list(table.columns)}")
    ok_pick, ok_base = table[pick].astype(bool), table[args.against].astype(bool)
    groups = {f"only {args.against}": list(table.index[ok_base & ~ok_pick]),
              f"only {pick}": list(table.index[ok_pick & ~ok_base]),
              "neither": list(table.index[~ok_pick & ~ok_base]),
              "both": list(table.index[ok_pick & ok_base])[: args.controls]}

    t0 = time.perf_counter()
    model = attnlab.load_model("smollm2-135m", verbose=False)
    methods = {"dense": None, pick: PolicyExecutor(Policy.load(args.policy), args.executor)}
    for spec in [args.against, *args.baseline]:
        for kind, params in parse_baselines(spec):
            methods[baseline_name(kind, params)] = PolicyExecutor(published_policy(model, kind, block_size=args.block_size, **params),
                                             args.executor)
    for name, ex in methods.items():
        if ex is not None:
            ex.check_model(model, name)

    from tqdm.auto import tqdm

    results = []
    if args.limit:
        groups = {g: names[: args.limit] for g, names in groups.items()}
    todo = [(g, s) for g, names in groups.items() for s in names]
    for group, name in tqdm(todo, desc="samples", unit="sample"):
        index = int(name.rsplit("-", 1)[1])
        sample = build_task_sample(model.tokenizer, args.task, args.length, index, seed=args.seed)
        ids = sample.input_ids[0].tolist()
        text, starts = token_starts(model.tokenizer, ids)
        asked = needle_span(text, starts, sample.answers[0])
        distractors = sample.details.get("distractors", [])  # single-needle tasks have none
        others = [needle_span(text, starts, v) for v in distractors]
        # the reply as eval's greedy decoding would give it right: " " + the value, token by token
        answer_ids = model.tokenizer.encode(" " + sample.answers[0], add_special_tokens=False)
        first_digit = next(i for i, t in enumerate(answer_ids) if model.tokenizer.decode([t]).strip())
        per = {}
        for method, ex in methods.items():
            m = measure(model, sample, ex, answer_ids)
            a, b = asked
            per[method] = {
                "asked": m["probs"][..., a:b].sum(-1),
                "other": sum((m["probs"][..., x:y].sum(-1) for x, y in others), np.zeros(m["probs"].shape[:2])),
                "kept": m["kept"][..., a:b].mean(-1),
                "first": model.tokenizer.decode([m["first"]]),
                "p_answer": m["p_answer"],
                "greedy": m["greedy"],
            }
        needles = per["dense"]["asked"] + per["dense"]["other"]
        top = np.argsort(needles.ravel())[::-1][: args.top]
        results.append({"sample": name, "group": group, "top": top.tolist(),
                        "answer_ids": answer_ids, "first_digit": first_digit,
                        "values": {"asked": sample.answers[0], "distractors": distractors},
                        "answered": {k: bool(v) for k, v in table.loc[name].items() if k in methods},
                        "methods": {k: {f: (v.tolist() if isinstance(v, np.ndarray) else v) for f, v in d.items()}
                                    for k, d in per.items()}})
    elapsed = time.perf_counter() - t0

    print(f"# {args.task} at {args.length} (seed {args.seed}): the last prompt row, {args.top} needle heads per sample")
    print(f"{datetime.date.today()}, {platform.node()}, {elapsed / 60:.1f} min; "
          f"command: python benchmarks/task_suite_multikey.py {shlex.join(argv)}\n")
    report(results, list(methods))
    Path(args.out).write_text(json.dumps({"args": vars(args), "methods": list(methods), "results": results}))
    print(f"\nper-sample measurements: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
