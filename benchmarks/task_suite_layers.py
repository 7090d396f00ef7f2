"""Where a sparse prefill loses task-suite answers: which layers' sparsity costs the answer.

For task-suite samples that dense attention answers right, the log-probability of dense's own
reply, teacher-forced as ``attnlab eval`` runs it (the reply's first token from the prefill's
last row, the rest through a dense decode over the prefill's KV cache), under:

- dense attention, and the policy (``--policy``, a policy file);
- ``restore G``: the policy with the layers of group G dense (every other layer as the policy);
- ``only G``: dense everywhere but group G, which runs as the policy.

- ``--candidate NAME=FILE``: another policy (e.g. one made with ``--protect-layers``), scored
  the same way: how much of the gap it wins back, at its own density.

The gap ``dense - policy`` (nats per reply, summed over its tokens) is what the sparse prefill
costs the answer. Per group, the share of it that making G dense wins back (``restore``) and
the share G's sparsity causes alone (``only``), beside the prefill density each configuration
runs at: where a budget spent on more attention would buy the most back.

Two ways to add the shares up. *Pooled*: every sample's nats summed, so the tasks whose replies
lose the most nats (multi-key, whose answer is seven digit tokens) weigh the most. *Per task*:
each task's share of its own gap, then the mean over tasks, so each task counts once. With
``--keep partial`` the samples dense answers partly right (score > 0) are kept too, which is
what gives variable tracking and multi-query, rarely answered exactly, samples to weigh.

    python benchmarks/task_suite_layers.py --policy /tmp/t16/cmp/budgeted-0.3.json \\
        --tasks niah_multikey,niah_multiquery,variable_tracking --samples 6 --group 3
    python benchmarks/task_suite_layers.py --policy t16.json --seed 2 --keep partial \\
        --windows L5-7,L6-8,L7-9 --modes restore --candidate L6-8=t16L68.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import time
from pathlib import Path

import numpy as np
import torch


def with_dense_layers(policy, layers: set[int]):
    """``policy`` with every head of ``layers`` dense (the rest unchanged)."""
    from attnlab.sparsity_stats.policy import Policy

    d = policy.to_dict()
    for h in d["heads"]:
        if h["layer"] in layers:
            h.update(kind="dense", params={}, expected_recall=1.0, expected_density=1.0, density_is="exact",
                     reason="made dense by benchmarks/task_suite_layers.py")
    d.pop("summary", None)
    d.pop("budget", None)
    return Policy.from_dict(d)


def reply_logprob(model, sample, reply_ids: list[int], executor) -> tuple[float, float]:
    """``(log p(reply), prefill density)``: the first reply token scored on the prefill's last
    row (sparse under ``executor``), the rest on a dense decode over the prefill's cache."""
    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import forward_with_cache

    with route_attention(model, None if executor is None else executor.attention):
        cache = DynamicCache(config=model.hf_model.config)
        ids = sample.input_ids.to(model.device)
        first = forward_with_cache(model.hf_model, ids, cache, logits_to_keep=1).logits[0, -1]
        lp = float(torch.log_softmax(first.float(), -1)[reply_ids[0]])
        if len(reply_ids) > 1:  # q_len != k_len: the executors attend densely, as a decode does
            feed = torch.tensor([reply_ids[:-1]], device=model.device)
            rest = forward_with_cache(model.hf_model, feed, cache).logits[0]
            lp += float(torch.log_softmax(rest.float(), -1).gather(1, torch.tensor(reply_ids[1:])[:, None]).sum())
    if executor is None:
        return lp, 1.0
    layouts = list(executor.layouts_.values())
    return lp, float(torch.cat([lay.density.float().flatten() for lay in layouts]).mean())


def dense_reply(model, sample) -> list[int]:
    """Dense greedy reply token ids (as `attnlab eval` produces them)."""
    from transformers import DynamicCache

    from attnlab.attention import route_attention
    from attnlab.models import forward_with_cache
    from attnlab.probes.needle import continue_greedy
    from attnlab.sparsity_stats.evaluate import _stop

    with route_attention(model, None):
        cache = DynamicCache(config=model.hf_model.config)
        logits = forward_with_cache(model.hf_model, sample.input_ids.to(model.device), cache, logits_to_keep=1).logits
        return continue_greedy(model, cache, int(logits[0, -1].argmax()), max_new_tokens=sample.max_new_tokens,
                               generated=[], stop=_stop(model, sample))


def parse_windows(spec: str, n_layers: int) -> list[list[int]]:
    """``"L5-7,L6-8"`` (or ``"5-7,6"``) -> ``[[5, 6, 7], [6, 7, 8]]``; ``""`` -> no windows."""
    groups = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        a, _, b = part.removeprefix("L").partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise SystemExit(f"--windows {spec}: {part!r} is not a layer range; write e.g. L5-7,L6-8") from None
        if not 0 <= lo <= hi < n_layers:
            raise SystemExit(f"--windows {spec}: {part!r} is outside layers 0-{n_layers - 1}")
        groups.append(list(range(lo, hi + 1)))
    return groups


def parse_candidates(specs: list[str]) -> dict[str, Path]:
    """``["L6-8=a.json"]`` -> ``{"L6-8": Path("a.json")}``; a missing file or ``=`` is named."""
    out = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise SystemExit(f"--candidate {spec}: write NAME=POLICY_FILE")
        if not Path(path).is_file():
            raise SystemExit(f"--candidate {spec}: no file {path}")
        out[name] = Path(path)
    return out


def shares(rows: list[dict], key: str, mode: str) -> tuple[float, dict[str, float], float]:
    """The share of dense's lost log p that configuration ``key`` accounts for: ``(pooled,
    {task: share of that task's gap}, mean of the per-task shares)``.

    ``mode`` ``"restore"`` (a policy with more attention): the nats it wins back over the policy,
    ``key - policy``. ``"only"`` (dense but for some layers): the nats it loses, ``dense - key``.
    A task whose gap is zero or negative (the policy loses nothing there) has no share and is
    left out of the mean.
    """
    def part(r):
        return (r[key] - r["policy"]) if mode == "restore" else (r["dense"] - r[key])

    def ratio(rs):
        gap = sum(r["dense"] - r["policy"] for r in rs)
        return sum(part(r) for r in rs) / gap if gap > 0 else float("nan")

    per_task = {t: ratio([r for r in rows if r["task"] == t]) for t in dict.fromkeys(r["task"] for r in rows)}
    valid = [v for v in per_task.values() if v == v]
    return ratio(rows), per_task, (float(np.mean(valid)) if valid else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="a policy file (e.g. policy compare --save-policies)")
    parser.add_argument("--tasks", default="niah_multikey,niah_multiquery,variable_tracking")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=6, help="samples per task, those dense gets right kept")
    parser.add_argument("--seed", type=int, default=0, help="task-suite seed (0 is the one `attnlab eval` scores; "
                        "another seed diagnoses without touching the scored samples)")
    parser.add_argument("--group", type=int, default=3, help="layers per group")
    parser.add_argument("--stride", type=int, default=0, help="layers between group starts (default --group: disjoint "
                        "groups; 1: every window of --group adjacent layers)")
    parser.add_argument("--windows", help="explicit layer windows instead of --group/--stride, e.g. L5-7,L6-8,L7-9 "
                        "('' for none: only the candidates)")
    parser.add_argument("--modes", default="restore,only", help="which configurations per group: restore, only or both")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=FILE",
                        help="another policy to score against the same gap (repeatable)")
    parser.add_argument("--keep", choices=("right", "partial"), default="right",
                        help="samples kept: those dense answers exactly right, or also partly right (score > 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write every sample's figures here")
    parser.add_argument("--append", type=Path, help="append the markdown report to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import attnlab
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.policy import Policy
    from attnlab.tasks import task_suite

    modes = set(args.modes.split(","))
    if not modes or modes - {"restore", "only"}:
        parser.error(f"--modes {args.modes}: use restore, only, or restore,only")
    args.modes_ = [m for m in ("restore", "only") if m in modes]
    candidates = parse_candidates(args.candidate)
    started = time.perf_counter()
    model = attnlab.load_model("smollm2-135m", verbose=False)
    policy = Policy.load(args.policy, model)
    n_layers = policy.n_layers
    if args.windows is not None:
        groups = parse_windows(args.windows, n_layers)
    else:
        stride = args.stride or args.group
        groups = [list(range(i, i + args.group)) for i in range(0, n_layers - args.group + 1, stride)]
        if stride == args.group and n_layers % args.group:
            groups.append(list(range(groups[-1][-1] + 1 if groups else 0, n_layers)))
    args.groups_ = groups
    args.candidates_ = list(candidates)
    configs: dict[str, Policy | None] = {"dense": None, "policy": policy}
    configs.update({f"candidate {k}": Policy.load(path, model) for k, path in candidates.items()})
    for g in groups:
        name = f"L{g[0]}-{g[-1]}"
        if "restore" in modes:
            configs[f"restore {name}"] = with_dense_layers(policy, set(g))
        if "only" in modes:
            configs[f"only {name}"] = with_dense_layers(policy, set(range(n_layers)) - set(g))
    executors = {k: (None if p is None else PolicyExecutor(p, "flex")) for k, p in configs.items()}
    samples = task_suite(model.tokenizer, args.tasks.split(","), [args.length], args.samples, seed=args.seed)
    rows = []
    from tqdm.auto import tqdm

    for s in tqdm(samples, desc="samples"):
        reply = dense_reply(model, s)
        text = model.tokenizer.decode(reply, skip_special_tokens=True)
        score = s.score(text)
        if score < 1.0 if args.keep == "right" else score <= 0.0:
            continue
        row = {"sample": s.name, "task": s.task, "reply": text, "dense score": score}
        for k, ex in executors.items():
            row[k], row[f"{k} density"] = reply_logprob(model, s, reply, ex)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    md = report(args, rows, started)
    print(md)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + md)


def report(args, rows: list[dict], started: float) -> str:
    kept = "dense answers right" if args.keep == "right" else "dense answers at least partly right"
    if not rows:
        return f"no sample that {kept}: nothing to split (more --samples, or --keep partial)"
    gap = np.array([r["dense"] - r["policy"] for r in rows])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    counts = ", ".join(f"{t} {sum(r['task'] == t for r in rows)}" for t in tasks)
    lines = [
        "## Task suite: which layers' sparsity costs the answer (`benchmarks/task_suite_layers.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: `{platform.platform()}`, "
        f"torch {torch.__version__}; {(time.perf_counter() - started) / 60:.0f} min",
        f"- command: `python benchmarks/task_suite_layers.py --policy {args.policy} --tasks {args.tasks} "
        f"--length {args.length} --samples {args.samples} --seed {args.seed}"
        + (f" --windows {shlex.quote(args.windows)}" if args.windows is not None else f" --group {args.group}"
           + (f" --stride {args.stride}" if args.stride else ""))
        + f" --modes {args.modes} --keep {args.keep}" + "".join(f" --candidate {shlex.quote(c)}" for c in args.candidate)
        + (f" --threads {args.threads}" if args.threads else "") + "`",
        f"- {len(rows)} samples that {kept} ({counts}); "
        f"log p of dense's reply under dense {np.mean([r['dense'] for r in rows]):.2f}, under the policy "
        f"{np.mean([r['policy'] for r in rows]):.2f} nats (mean); gap {gap.mean():.2f} nats (median {np.median(gap):.2f}); "
        f"policy density {np.mean([r['policy density'] for r in rows]):.3f}",
        "- per-task gap (mean nats): " + ", ".join(
            f"{t} {np.mean([r['dense'] - r['policy'] for r in rows if r['task'] == t]):.2f}" for t in tasks),
        "",
        "Share of the gap won back by making the group dense (`restore`), caused by the group alone "
        "(`only`), or won back by a candidate policy; *pooled* sums every sample's nats, *per task* "
        "is the mean of each task's own share (each task counts once). Prefill density: mean over samples.",
        "",
        "| configuration | density | pooled | per task | " + " | ".join(tasks) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    configs = [(f"{m} L{g[0]}-{g[-1]}", m) for g in args.groups_ for m in args.modes_]
    configs += [(f"candidate {c}", "restore") for c in args.candidates_]
    for key, mode in configs:
        pooled, per_task, mean = shares(rows, key, mode)
        lines.append(f"| {key} | {np.mean([r[f'{key} density'] for r in rows]):.3f} | {pooled:+.2f} | **{mean:+.2f}** | "
                     + " | ".join(f"{per_task[t]:+.2f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
