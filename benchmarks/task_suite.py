"""The task-suite headline on SmolLM2: at achieved prefill density ~0.3, the budgeted policy
against dense, XAttention, FlexPrefill and the MInference-style baseline, per task, paired on the
same samples; and the suite's own cost against running the model.

Every step is the user's command line (``attnlab profile``, ``probe retrieval``,
``policy compare --save-policies``, ``eval --shard``, ``merge``, ``eval --compare``); this
script only chains them, picks the settings, and times things.

1. Profile the embedded model (q/k path, 64-token blocks, ``--profile-samples`` built-in
   prompts at ``--length`` tokens) and run the retrieval probe on it (``--retrieval-samples``
   needles, no causal check): the generator keeps the detected retrieval heads dense.
2. ``policy compare --budgets 0.3 --save-policies``: the budgeted policy and the baselines at
   density 0.3, each baseline tuned on the same profile (their best shot).
3. Pilot, on samples of another seed than the evaluated ones (nothing is tuned on the samples
   that are scored):
   - dense on ``--pilot-samples`` of every task: tasks where dense scores below ``--floor`` are
     left out of the sparse runs and of the headline (they are still run densely at full size
     and reported);
   - XAttention's tau and FlexPrefill's gamma over a grid, prefill only: the setting whose mean
     achieved density is nearest 0.3 is the one evaluated (their density is only known per
     input, so it is chosen on inputs, not on the profile).
4. ``eval`` over ``--shards`` processes (``--shard I/N``, merged): dense, budgeted-0.3,
   minference-0.3, the chosen XAttention and FlexPrefill, ``--samples`` per task; then
   ``eval --compare --densities 0.3``. The number of samples is ``--samples`` or, with
   ``--minutes``, as many as the pilot's answer times say fit (the table says which).
5. The suite's cost (``--cost-length``, default 4096): generating and grading 100 samples of
   every task, against the model's dense answers on a subset (one per task, ``--cost-answers``),
   scaled to 100 per task.

    python benchmarks/task_suite.py --length 1024 --samples 100 --append benchmarks/RESULTS.md
    python benchmarks/task_suite.py --length 1024 --minutes 70 --work /tmp/ts   # as many samples as fit
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET = 0.3
TAUS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def cli(*argv: str, log: Path | None = None) -> None:
    """One ``attnlab`` command; its output goes to ``log``; a failure stops the benchmark with its tail."""
    cmd = [sys.executable, "-m", "attnlab.cli", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"`attnlab {shlex.join(argv)}` failed:\n{out.stderr[-3000:]}")


def pilot_probe(samples):
    """The pilot samples the dynamic methods' densities are measured on: two ``niah_essay``, one
    ``variable_tracking``."""
    return [s for s in samples if s.task == "niah_essay"][:2] + [s for s in samples if s.task == "variable_tracking"][:1]


def density_grid(model, samples, block_size: int, suffix: str = "", dense_layers=()) -> dict[str, float]:
    """Mean prefill density of XAttention over `TAUS` and FlexPrefill over `GAMMAS` at
    ``block_size`` (the heads of ``dense_layers`` dense), keyed by the result name
    (``kind:key=value``, ``kind[denseA-B]:key=value``) + ``suffix``."""
    from attnlab.sparsity_stats.dynamic import baseline_name, published_policy

    grid = {}
    for kind, key, values in (("xattention", "tau", TAUS), ("flexprefill", "gamma", GAMMAS)):
        for v in values:
            policy = published_policy(model, kind, block_size=block_size, dense_layers=dense_layers, **{key: v})
            grid[baseline_name(kind, {key: v}, dense_layers) + suffix] = prefill_density(model, samples, policy)
    return grid


def prefill_density(model, samples, policy) -> float:
    """Mean achieved prefill density of ``policy`` over ``samples`` (prefill only, no decoding)."""
    import torch

    from attnlab.attention import route_attention
    from attnlab.sparsity_stats.executors import PolicyExecutor

    ex = PolicyExecutor(policy, "flex")
    out = []
    with torch.no_grad():
        for s in samples:
            with route_attention(model, ex.attention):
                model.hf_model(input_ids=s.input_ids.to(model.device), use_cache=False, logits_to_keep=1)
            out.append(float(torch.cat([lay.density.float().flatten() for lay in ex.layouts_.values()]).mean()))
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=100, help="samples per task (ignored with --minutes)")
    parser.add_argument("--minutes", type=float, default=0,
                        help="size --samples so the evaluation takes about this long (from the pilot's answer times)")
    parser.add_argument("--shards", type=int, default=2, help="processes running the evaluation (--shard I/N)")
    parser.add_argument("--profile-samples", type=int, default=4)
    parser.add_argument("--retrieval-samples", type=int, default=10)
    parser.add_argument("--pilot-samples", type=int, default=8, help="dense answers per task in the pilot (seed 1)")
    parser.add_argument("--floor", type=float, default=0.2)
    parser.add_argument("--cost-length", type=int, default=4096)
    parser.add_argument("--cost-answers", type=int, default=1, help="dense answers per task timed for the cost (0: skip)")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "task_suite")
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()
    import torch

    import attnlab
    from attnlab.runs import EVAL_SAMPLES, Run
    from attnlab.sparsity_stats.evaluate import answer
    from attnlab.tasks import TASKS, task_suite

    torch.set_grad_enabled(False)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # the cached steps below are only valid for the settings they were made with
    settings = {"length": args.length, "profile_samples": args.profile_samples,
                "retrieval_samples": args.retrieval_samples, "pilot_samples": args.pilot_samples}
    recorded = work / "settings.json"
    if recorded.exists() and json.loads(recorded.read_text()) != settings:
        raise SystemExit(f"{work} holds steps made with {recorded.read_text().strip()}, not {settings}: "
                         "give another --work (or delete that folder)")
    recorded.write_text(json.dumps(settings))
    started = time.perf_counter()
    times: dict[str, float] = {}
    model_flags = ["--model", "smollm2-135m", "--quiet"]
    L = str(args.length)

    # 1-2. profile, retrieval heads, policies at 0.3
    t = time.perf_counter()
    prof = work / "profile"
    if not (prof / "policy_compare.csv").exists():
        cli("profile", *model_flags, "--path", "qk", "--lengths", L, "--samples", str(args.profile_samples),
                "--block-size", "64", "--out", str(prof), "--force", log=work / "profile.log")
        cli("probe", "retrieval", *model_flags, "--out", str(prof), "--samples", str(args.retrieval_samples),
                "--lengths", L, "--causal-k", "", log=work / "probe.log")
        cli("policy", "compare", str(prof), "--budgets", str(TARGET), "--save-policies", str(work / "cmp"),
                "--force", "--quiet", log=work / "compare.log")
    times["profile, probe, policies"] = time.perf_counter() - t
    policies = [work / "cmp" / f"budgeted-{TARGET:g}.json", work / "cmp" / f"minference-{TARGET:g}.json"]

    # 3. pilot on seed 1
    pilot_file = work / "pilot.json"
    model = attnlab.load_model("smollm2-135m", verbose=False)
    if pilot_file.exists():
        pilot = json.loads(pilot_file.read_text())
    else:
        t = time.perf_counter()
        samples = task_suite(model.tokenizer, list(TASKS), [args.length], args.pilot_samples, seed=1)
        dense_score: dict[str, list[float]] = {}
        answer_s = []
        for s in samples:
            t1 = time.perf_counter()
            reply, _ = answer(model, s)
            answer_s.append(time.perf_counter() - t1)
            dense_score.setdefault(s.task, []).append(s.score(reply))
        grid = density_grid(model, pilot_probe(samples), 64)
        pilot = {"dense": {k: float(np.mean(v)) for k, v in dense_score.items()}, "dense_answer_s": float(np.mean(answer_s)),
                 "grid": grid, "seconds": time.perf_counter() - t}
        pilot_file.write_text(json.dumps(pilot, indent=1))
    times["pilot"] = pilot["seconds"]
    kept = [task for task in TASKS if pilot["dense"][task] >= args.floor]
    left_out = [task for task in TASKS if task not in kept]
    chosen = {kind: min((k for k in pilot["grid"] if k.startswith(kind)), key=lambda k: abs(pilot["grid"][k] - TARGET))
              for kind in ("xattention", "flexprefill")}
    n_methods = 1 + len(policies) + len(chosen)
    n = args.samples
    if args.minutes:
        # sparse answers take ~1.5x a dense one (failed answers run to max_new_tokens); shards run in parallel
        per_sample = pilot["dense_answer_s"] * (len(kept) * (1 + 1.5 * (n_methods - 1)) + len(left_out))
        n = max(2, int(args.minutes * 60 * max(args.shards * 0.75, 1) / per_sample))
    print(f"pilot: dense {pilot['dense']}; kept {kept}; left out {left_out}; chosen {chosen}; {n} samples per task",
          flush=True)

    # 4. the evaluation, sharded; left-out tasks densely only
    t = time.perf_counter()
    ev = work / f"eval-{n}"
    if not (ev / "merged").exists():
        ev.mkdir(parents=True, exist_ok=True)
        procs = []
        for i in range(args.shards):
            argv = ["eval", *model_flags, "--lengths", L, "--samples", str(n), "--tasks", ",".join(kept),
                    "--out", str(ev / f"s{i}"), "--shard", f"{i}/{args.shards}"]
            for p in policies:
                argv += ["--policy", str(p)]
            for spec in chosen.values():
                argv += ["--baseline", spec]
            dense_only = ["eval", *model_flags, "--lengths", L, "--samples", str(n), "--tasks", ",".join(left_out),
                          "--out", str(ev / f"d{i}"), "--shard", f"{i}/{args.shards}"]
            script = shlex.join([sys.executable, "-m", "attnlab.cli", *argv])
            if left_out:
                script += " && " + shlex.join([sys.executable, "-m", "attnlab.cli", *dense_only])
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            with (work / f"eval-{n}-s{i}.log").open("w") as log:
                procs.append(subprocess.Popen(["bash", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT))
        if any([p.wait() != 0 for p in procs]):  # a list: wait for every shard, even after a failure
            raise SystemExit(f"an eval shard failed: see {work}/eval-{n}-s*.log")
        cli("merge", *[str(ev / f"s{i}") for i in range(args.shards)], "--out", str(ev / "merged"))
        if left_out:
            cli("merge", *[str(ev / f"d{i}") for i in range(args.shards)], "--out", str(ev / "dense_left_out"))
        times["eval"] = time.perf_counter() - t
        (ev / "seconds.json").write_text(json.dumps(times["eval"]))
    else:
        times["eval"] = json.loads((ev / "seconds.json").read_text())
    cli("eval", "--compare", str(ev / "merged"), "--densities", str(TARGET), "--floor", str(args.floor),
            log=work / "compare_iso.log")
    report = (ev / "merged" / "iso_density.md").read_text()
    table = Run.open(ev / "merged").read(EVAL_SAMPLES)
    if left_out:
        table_lo = Run.open(ev / "dense_left_out").read(EVAL_SAMPLES)
    else:
        table_lo = table.iloc[:0]

    # 5. the suite's own cost at --cost-length
    cost = None
    if args.cost_answers:
        t = time.perf_counter()
        built = task_suite(model.tokenizer, list(TASKS), [args.cost_length], 100, seed=2)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        for s in built:
            s.score(s.answers[0])  # grading by string match on a reply
        grade_s = time.perf_counter() - t
        timed = [x for task in TASKS for x in [b for b in built if b.task == task][: args.cost_answers]]
        answer_s = []
        for s in timed:
            t = time.perf_counter()
            answer(model, s)
            answer_s.append(time.perf_counter() - t)
        model_s = float(np.mean(answer_s)) * len(built)
        cost = {"samples": len(built), "generate_s": gen_s, "grade_s": grade_s, "answers_timed": len(answer_s),
                "mean_answer_s": float(np.mean(answer_s)), "model_s_estimate": model_s,
                "ratio": (gen_s + grade_s) / model_s}

    md = markdown(args, sys.argv, pilot, kept, left_out, chosen, n, report, table, table_lo, cost, times, started)
    (work / "task_suite.md").write_text(md)
    print(md)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + md)


def markdown(args, argv, pilot, kept, left_out, chosen, n, report, table, table_lo, cost, times, started) -> str:
    from attnlab.sparsity_stats.evaluate import DENSE, paired_counts

    lines = [
        f"## Task suite: the budgeted policy against XAttention, FlexPrefill and MInference-style at density {TARGET:g} "
        "(`benchmarks/task_suite.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: `{platform.platform()}`, "
        f"{os.cpu_count()} cores (shared); torch {__import__('torch').__version__}; "
        f"{(time.perf_counter() - started) / 60:.0f} min in all ({', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())})",
        f"- command: `python benchmarks/{Path(argv[0]).name} {shlex.join(argv[1:])}`",
        f"- model: smollm2-135m; {args.length} tokens; {n} samples per task (seed 0), {args.shards} processes; "
        f"policies from a {args.profile_samples}-prompt q/k profile at {args.length} tokens with "
        f"{args.retrieval_samples} retrieval-probe samples (`policy compare --budgets {TARGET:g}`, baselines tuned on "
        "the same profile); sparse prefill (flex executor), dense decode",
        f"- pilot (seed 1, {args.pilot_samples} samples per task, dense): "
        + ", ".join(f"{k} {v:.2f}" for k, v in pilot["dense"].items()),
        f"- left out of the sparse runs and the headline (dense < {args.floor:g} in the pilot): "
        + (", ".join(left_out) or "none"),
        "- dynamic settings chosen on the pilot's prefill density (nearest 0.3): "
        + "; ".join(f"{k} → {v} (density {pilot['grid'][v]:.3f})" for k, v in chosen.items())
        + "; grid: " + ", ".join(f"{k} {v:.2f}" for k, v in pilot["grid"].items()),
        "",
        report.strip(),
        "",
        "### Paired against dense (same samples)",
        "",
        "| task | method | density | score | both right | only dense | only sparse | neither |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in kept:
        d = table[(table.task == task) & (table.method == DENSE)].sort_values("sample")
        for method in [m for m in table.method.unique() if m != DENSE]:
            s = table[(table.task == task) & (table.method == method)].sort_values("sample")
            c = paired_counts(d.correct.tolist(), s.correct.tolist())
            lines.append(f"| {task} | {method} | {s.density.mean():.3f} | {s.score.mean():.3f} | {c['both']} | "
                         f"{c['only_dense']} | {c['only_sparse']} | {c['neither']} |")
    if len(table_lo):
        lines += ["", "Dense on the left-out tasks (full size): "
                  + ", ".join(f"{t} {g.score.mean():.3f} ({len(g)} samples)" for t, g in table_lo.groupby("task"))]
    if cost is not None:
        lines += [
            "",
            f"### The suite's own cost at {args.cost_length} tokens",
            "",
            f"Generating {cost['samples']} samples ({cost['samples'] // 9} of each task) took {cost['generate_s']:.1f} s and "
            f"grading them {cost['grade_s']:.3f} s; one dense answer took {cost['mean_answer_s']:.1f} s on average "
            f"({cost['answers_timed']} timed, {args.cost_answers} per task), so running the model densely on them would take about "
            f"{cost['model_s_estimate'] / 60:.0f} min: the suite costs **{100 * cost['ratio']:.2f}%** of that "
            "(target < 5%), and less against every further method run on the same samples.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
