"""What might close the task-suite gap: budgeted policies made another way, answered on the very
samples of a finished ``benchmarks/task_suite.py`` run and set beside its methods.

A variant changes what the generator sees, never the samples that are scored:

- ``PROMPTS``: ``builtin`` (the suite run's profile prompts: ``--profile-samples`` built-in
  prompts) or ``tasks`` (one task-suite sample of each ``--profile-tasks`` task, on seed 2 — the
  suite scores seed 0 and pilots on seed 1 — written as a ``.jsonl`` prompt file: a user's
  "profile on prompts like my workload"); ``tasks=T1+T2+...`` profiles on those tasks only, so
  the others are held out from the fit;
- ``BLOCK``: the block size of the profile and the policy (64 in the suite run);
- optional extra ``attnlab policy compare`` flags.

For each variant, the user's commands: ``attnlab profile --path qk``, ``probe retrieval``, ``policy
compare --budgets 0.3 --save-policies``. Its budgeted policy then answers the suite run's scored
samples (its tasks, length and sample count; seed 0) with the function ``attnlab eval`` uses
(sparse prefill through the flex executor, dense decode), over ``--shards`` processes. Dense and
the other methods are not re-run: their per-sample results are read from the suite run.

``--baselines NAME,...`` (or ``all``): those variants also answer under the baselines at their own
block size, so that a gain from the block size is not credited to the generator: their
MInference-style policy from the same compare (when its density is within 0.05 of 0.3) and, at a
block size other than the suite's or when the variant protects layers, XAttention and FlexPrefill
at the τ and γ whose prefill density on pilot samples (seed 1) is nearest 0.3. A variant's
``--protect-layers`` are dense in every baseline too (``xattention[dense6-8]:tau=0.7@16``), so a
gain from protecting them is not credited to the generator either. Every step is cached under
``--suite``/variants/NAME.

``--mass`` adds each method's attention mass kept at run time (``benchmarks/policy.py``'s
`measure_recall`, dynamic heads choosing from the input) on the first scored sample of each task:
the figure the generator maximises, set beside the score it is meant to stand for.

    python benchmarks/task_suite_variants.py --suite /tmp/ts \\
        --variant tasks64=tasks:64 --variant tasks16=tasks:16 --baselines tasks16 --mass --append benchmarks/RESULTS.md
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
from task_suite import (  # the same folder: run as a script
    TARGET,
    cli,
    density_grid,
    pilot_probe,
)

PROFILE_SEED = 2
#: the suite run's block size (its dynamic baselines ran at it) and the iso-density tolerance
SUITE_BLOCK = 64
TOLERANCE = 0.05


def parse_variant(text: str) -> dict:
    """``NAME=PROMPTS:BLOCK[:EXTRA policy compare FLAGS]`` → its fields (one clear line if malformed);
    ``tasks=T1+T2`` gives the profile's tasks as ``_tasks`` (the caller folds it into the recorded
    profile settings)."""
    name, _, spec = text.partition("=")
    parts = spec.split(":", 2)
    prompts, _, only = parts[0].partition("=")
    if (not name or len(parts) < 2 or prompts not in ("builtin", "tasks") or (only and prompts != "tasks")
            or not parts[1].isdigit()):
        raise SystemExit(f"--variant {text!r}: expected NAME=PROMPTS:BLOCK[:FLAGS] with PROMPTS builtin, tasks or "
                         "tasks=T1+T2 and BLOCK a block size, e.g. tasks16=tasks:16, held=tasks=niah_noise+niah_essay:16 "
                         "or more=tasks:64:--retrieval-threshold 0.07")
    out = {"name": name, "prompts": prompts, "block": int(parts[1]), "flags": shlex.split(parts[2]) if len(parts) > 2 else []}
    if only:
        from attnlab.tasks import TASKS

        unknown = [t for t in only.split("+") if t not in TASKS]
        if unknown:
            raise SystemExit(f"--variant {text!r}: unknown task(s) {', '.join(unknown)}: use some of {', '.join(TASKS)}")
        out["_tasks"] = only.replace("+", ",")
    return out


def method_policy(model, spec: str):
    """A policy file (``.json``), or a published dynamic method at a block size
    (``xattention:tau=0.5@16``; ``xattention[dense6-8]:tau=0.4@16`` keeps layers 6-8 dense)."""
    from attnlab.sparsity_stats.dynamic import parse_baseline_name, published_policy
    from attnlab.sparsity_stats.policy import Policy

    if spec.endswith(".json"):
        return Policy.load(spec)
    method, _, block = spec.rpartition("@")
    kind, params, layers = parse_baseline_name(method)
    return published_policy(model, kind, block_size=int(block), dense_layers=layers, **params)


def protected_layers(flags: list[str]) -> list[int]:
    """The layers a variant's ``policy compare`` flags protect (``--protect-layers A-B``), [] if none."""
    from attnlab.cliargs import layer_list

    for i, flag in enumerate(flags):
        if flag == "--protect-layers" and i + 1 < len(flags):
            return layer_list(flags[i + 1])
        if flag.startswith("--protect-layers="):
            return layer_list(flag.partition("=")[2])
    return []


def answer_shard(args) -> None:
    """One process's share (round-robin) of the scored samples under one policy: rows as JSON lines."""
    import torch

    import attnlab
    from attnlab.sparsity_stats.evaluate import answer
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.tasks import task_suite

    torch.set_grad_enabled(False)
    i, n = (int(x) for x in args.answer_shard.split("/"))
    model = attnlab.load_model("smollm2-135m", verbose=False)
    samples = task_suite(model.tokenizer, args.tasks.split(","), [args.length], args.samples, seed=0)[i::n]
    ex = PolicyExecutor(method_policy(model, args.policy), "flex")
    with open(args.rows, "w") as f:
        for s in samples:
            t = time.perf_counter()
            reply, density = answer(model, s, ex)
            score = s.score(reply)
            f.write(json.dumps({"sample": s.name, "task": s.task, "score": score, "correct": score == 1.0,
                                "density": density, "reply": reply, "seconds": time.perf_counter() - t}) + "\n")
            f.flush()


def answer_all(spec: str, vdir: Path, stem: str, tasks: list[str], length: int, n: int, shards: int):
    """Every scored sample answered under ``spec`` (cached as ``vdir/STEM-N.jsonl``), over ``shards`` processes."""
    import pandas as pd

    done = vdir / f"{stem}-{n}.jsonl"
    if not done.exists():
        procs = []
        for i in range(shards):
            argv = [sys.executable, __file__, "--answer-shard", f"{i}/{shards}", "--policy", spec,
                    "--rows", str(vdir / f"{stem}-rows-{i}.jsonl"), "--tasks", ",".join(tasks), "--length", str(length),
                    "--samples", str(n)]
            with (vdir / f"{stem}-answer-{i}.log").open("w") as log:
                procs.append(subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                              stderr=subprocess.STDOUT))
        if any([p.wait() != 0 for p in procs]):  # a list: wait for every process, even after a failure
            raise SystemExit(f"an answering process failed: see {vdir}/{stem}-answer-*.log")
        done.write_text("".join((vdir / f"{stem}-rows-{i}.jsonl").read_text() for i in range(shards)))
    return pd.read_json(done, lines=True)


def variant_baselines(v: dict, vdir: Path, length: int) -> dict[str, tuple[str, str]]:
    """The baselines at the variant's block size (``--baselines``): its MInference-style policy when
    it lands within ``TOLERANCE`` of the target density, and, unless the block size is the suite's
    and no layer is protected (the suite's run already holds those), XAttention and FlexPrefill at
    the grid setting whose prefill density on pilot samples (seed 1, as the suite's pilot) is
    nearest the target. Layers the variant protects (``--protect-layers``) are dense in the
    dynamic baselines too (the MInference-style policy gets them from ``policy compare``)."""
    import pandas as pd

    import attnlab
    from attnlab.cliargs import layers_text
    from attnlab.tasks import task_suite

    out = {}
    compared = pd.read_csv(vdir / "profile" / "policy_compare.csv")
    mi = compared[compared.method == "minference"]
    if len(mi) and abs(float(mi.density.iloc[0]) - TARGET) <= TOLERANCE:
        out[f"minference-{TARGET:g}"] = ("minference", str(vdir / "cmp" / f"minference-{TARGET:g}.json"))
    dense = protected_layers(v["flags"])
    if v["block"] == SUITE_BLOCK and not dense:
        return out
    grid_file = vdir / ("pilot_grid.json" if not dense else f"pilot_grid-dense{layers_text(dense)}.json")
    if not grid_file.exists():
        model = attnlab.load_model("smollm2-135m", verbose=False)
        pilot = task_suite(model.tokenizer, ["niah_essay", "variable_tracking"], [length], 2, seed=1)
        grid = density_grid(model, pilot_probe(pilot), v["block"], f"@{v['block']}", dense_layers=dense)
        grid_file.write_text(json.dumps(grid, indent=1))
    grid = json.loads(grid_file.read_text())
    for kind in ("xattention", "flexprefill"):
        spec = min((k for k in grid if k.startswith(kind)), key=lambda k: abs(grid[k] - TARGET))
        stem = spec.replace("[", "_").replace("]", "").replace(":", "_").replace("=", "").replace("@", "_b")
        out[spec] = (stem, spec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, help="the --work folder of a finished benchmarks/task_suite.py run")
    parser.add_argument("--variant", action="append", default=[], help="NAME=PROMPTS:BLOCK[:FLAGS] (repeat)")
    parser.add_argument("--profile-tasks", default="niah_noise,niah_essay,niah_uuid,niah_multikey,niah_multivalue,"
                        "niah_multiquery,variable_tracking,common_words", help="tasks whose samples make the profile prompts")
    parser.add_argument("--profile-samples", type=int, default=4, help="built-in prompts (PROMPTS builtin)")
    parser.add_argument("--retrieval-samples", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--baselines", default="", metavar="NAME,...",
                        help="variants (or 'all') that also run the baselines at their block size (MInference-style from "
                        "their profile; XAttention and FlexPrefill when the block size is not the suite's)")
    parser.add_argument("--mass", action="store_true",
                        help="also measure each method's attention mass kept on one scored sample per task (what the "
                        "generator maximises), beside its score")
    parser.add_argument("--append", type=Path)
    # one answering process (internal)
    parser.add_argument("--answer-shard", help=argparse.SUPPRESS)
    for hidden in ("--policy", "--rows", "--tasks"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.answer_shard:
        return answer_shard(args)
    if args.suite is None or not args.variant:
        raise SystemExit("give --suite (a finished task_suite.py --work folder) and at least one --variant")
    variants = [parse_variant(v) for v in args.variant]
    unknown = set(filter(None, args.baselines.split(","))) - {"all"} - {v["name"] for v in variants}
    if unknown:
        raise SystemExit(f"--baselines names {', '.join(sorted(unknown))}, not a --variant: give variant names or 'all'")
    for v in variants:  # what the cached profile depends on besides the variant itself
        v["profile"] = ({"tasks": v.pop("_tasks", args.profile_tasks), "seed": PROFILE_SEED} if v["prompts"] == "tasks"
                        else {"samples": args.profile_samples}) | {"retrieval_samples": args.retrieval_samples}
    import pandas as pd

    from attnlab.runs import EVAL_SAMPLES, Run
    from attnlab.tasks import task_suite

    merged = sorted(args.suite.glob("eval-*/merged"))
    if len(merged) != 1:
        raise SystemExit(f"{args.suite} holds {len(merged)} merged eval runs (eval-N/merged), not one: give a finished "
                         "task_suite.py --work folder")
    suite = Run.open(merged[0]).read(EVAL_SAMPLES)
    settings = json.loads((args.suite / "settings.json").read_text()) if (args.suite / "settings.json").exists() else {}
    length = int(suite.length.iloc[0])
    tasks = list(dict.fromkeys(suite.task))
    n = int(suite[suite.method == "dense"].groupby("task").size().min())
    work = args.suite / "variants"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    model_flags = ["--model", "smollm2-135m", "--quiet"]
    rows = []
    # each method's policy, for --mass: the suite's policy files and dynamic baselines, then the variants'
    specs = {m: (str(args.suite / "cmp" / f"{m}.json") if ":" not in m else f"{m}@{SUITE_BLOCK}")
             for m in dict.fromkeys(suite.method) if m != "dense"}
    for v in variants:
        t0 = time.perf_counter()
        vdir = work / v["name"]
        vdir.mkdir(exist_ok=True)
        recorded = vdir / "variant.json"
        if recorded.exists() and json.loads(recorded.read_text()) != v:
            raise SystemExit(f"{vdir} was made for {recorded.read_text().strip()}, not {v}: give the variant another name")
        recorded.write_text(json.dumps(v))
        policy = vdir / "cmp" / f"budgeted-{TARGET:g}.json"
        if not policy.exists():
            prof = vdir / "profile"
            if v["prompts"] == "tasks":
                import attnlab

                model = attnlab.load_model("smollm2-135m", verbose=False)
                prompt_file = vdir / "prompts.jsonl"
                with prompt_file.open("w") as f:
                    for s in task_suite(model.tokenizer, v["profile"]["tasks"].split(","), [length], 1, seed=PROFILE_SEED):
                        f.write(json.dumps({"text": model.tokenizer.decode(s.input_ids[0].tolist()), "name": s.name}) + "\n")
                source = ["--prompts", str(prompt_file)]
            else:
                source = ["--lengths", str(length), "--samples", str(args.profile_samples)]
            cli("profile", *model_flags, *source, "--path", "qk", "--block-size", str(v["block"]), "--out", str(prof),
                "--force", log=vdir / "profile.log")
            cli("probe", "retrieval", *model_flags, "--out", str(prof), "--samples", str(args.retrieval_samples),
                "--lengths", str(length), "--causal-k", "", log=vdir / "probe.log")
            cli("policy", "compare", str(prof), "--budgets", str(TARGET), *v["flags"], "--save-policies", str(vdir / "cmp"),
                "--force", "--quiet", log=vdir / "compare.log")
        methods = {f"budgeted-{TARGET:g}": ("answers", str(policy))}
        if args.baselines == "all" or v["name"] in args.baselines.split(","):
            methods.update(variant_baselines(v, vdir, length))
        for label, (stem, spec) in methods.items():
            part = answer_all(spec, vdir, stem, tasks, length, n, args.shards)
            part["method"] = f"{v['name']}: {label}"
            specs[part["method"].iloc[0]] = spec
            rows.append(part)
        v["minutes"] = (time.perf_counter() - t0) / 60
        for grid_file in sorted(vdir.glob("pilot_grid*.json")):
            v.setdefault("grid", {}).update(json.loads(grid_file.read_text()))
        compared = pd.read_csv(vdir / "profile" / "policy_compare.csv")
        v["detail"] = str(compared[compared.method == "budgeted"].detail.iloc[0])
    table = pd.concat([suite[["sample", "task", "method", "score", "correct", "density"]],
                       *[r[["sample", "task", "method", "score", "correct", "density"]] for r in rows]], ignore_index=True)
    mass = kept_mass(specs, tasks, length) if args.mass else None
    md = markdown(args, variants, table, tasks, length, n, settings, started, mass)
    (work / "variants.md").write_text(md)
    print(md)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + md)


def kept_mass(specs: dict[str, str], tasks: list[str], length: int) -> dict[str, tuple[float, float]]:
    """Each method's attention mass kept (mean over heads and queries) and achieved density on the
    first scored sample of every task, its dynamic heads choosing their blocks from that input
    (``benchmarks/policy.py``'s `measure_recall`, the figure the generator maximises)."""
    import torch
    from policy import measure_recall  # the same folder

    import attnlab
    from attnlab.tasks import task_suite

    torch.set_grad_enabled(False)
    model = attnlab.load_model("smollm2-135m", verbose=False)
    ids = [s.input_ids for s in task_suite(model.tokenizer, tasks, [length], 1, seed=0)]
    policies = {m: method_policy(model, spec) for m, spec in specs.items()}
    out = {}
    for b in sorted({p.block_size for p in policies.values()}):  # measured together per block size
        got = measure_recall(model, {m: p for m, p in policies.items() if p.block_size == b}, ids)
        out.update({m: (float(r.recall.mean()), float(r.density.mean())) for m, r in got.items()})
    return out


def markdown(args, variants, table, tasks, length, n, settings, started, mass=None) -> str:
    from attnlab.sparsity_stats.evaluate import bootstrap_ci, paired_counts, stratified_bootstrap_ci

    methods = list(dict.fromkeys(table.method))
    suite_budgeted = f"budgeted-{TARGET:g}"
    lines = [
        "## Task suite: budgeted policies made another way, on the same samples (`benchmarks/task_suite_variants.py`)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: `{platform.platform()}`, "
        f"{os.cpu_count()} cores (shared); {(time.perf_counter() - started) / 60:.0f} min in all",
        f"- command: `python benchmarks/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}`",
        f"- scored samples: those of the suite run in `{args.suite}` ({settings or 'settings not recorded'}): {n} per task "
        f"at {length} tokens, seed 0; its methods' results are read from it, not re-run",
        "- variants (NAME=PROMPTS:BLOCK[:FLAGS]): "
        + "; ".join(f"**{v['name']}**: {'task-suite samples of seed 2 (' + v['profile']['tasks'] + ')' if v['prompts'] == 'tasks' else 'built-in prompts'}"
                    f", {v['block']}-token blocks{', ' + shlex.join(v['flags']) if v['flags'] else ''} → {v['detail']} "
                    f"({v['minutes']:.0f} min in this invocation; steps cached in `--suite`/variants are not redone)" for v in variants),
        *[f"- {v['name']}: pilot prefill densities at {v['block']}-token blocks (seed 1): "
          + ", ".join(f"{k} {x:.3f}" for k, x in v["grid"].items()) for v in variants if v.get("grid")],
        "",
        "Score per task (mean with a 95% bootstrap interval) and mean achieved prefill density; the mean over tasks "
        "has a stratified interval."
        + (" `kept mass`: the attention mass the method keeps (mean over heads and queries, dynamic heads choosing "
           "from the input) on the first scored sample of each task — what the generator maximises on its profile."
           if mass else ""),
        "",
        "| method | density | " + ("kept mass | " if mass else "") + " | ".join(tasks) + " | **mean** |",
        "|---|---:|" + ("---:|" if mass else "") + "---|" * (len(tasks) + 1),
    ]
    for m in methods:
        cells = []
        for task in tasks:
            x = table[(table.task == task) & (table.method == m)].score
            lo, hi = bootstrap_ci(x.tolist())
            cells.append(f"{x.mean():.2f} [{lo:.2f}, {hi:.2f}]")
        groups = [table[(table.task == t) & (table.method == m)].score.tolist() for t in tasks]
        lo, hi = stratified_bootstrap_ci(groups)
        cells.append(f"**{np.mean([np.mean(g) for g in groups]):.2f}** [{lo:.2f}, {hi:.2f}]")
        if mass:
            cells.insert(0, f"{mass[m][0]:.3f}" if m in mass else "1")
        lines.append(f"| {m} | {table[table.method == m].density.mean():.3f} | " + " | ".join(cells) + " |")
    # pairs: against the suite's budgeted policy, or (a suite run without one) the first variant's
    reference = suite_budgeted if suite_budgeted in methods else f"{variants[0]['name']}: budgeted-{TARGET:g}"
    whose = "the suite's" if reference == suite_budgeted else "the first variant's"
    lines += ["", f"Paired against {whose} `{reference}` on the same samples (exact match; every other method, "
              "the variants' baselines too):", "",
              "| method | task | both right | only reference | only method | neither |", "|---|---|---:|---:|---:|---:|"]
    for name in methods:
        if name in ("dense", reference):
            continue
        for task in tasks:
            a = table[(table.task == task) & (table.method == reference)].sort_values("sample")
            b = table[(table.task == task) & (table.method == name)].sort_values("sample")
            c = paired_counts(a.correct.tolist(), b.correct.tolist())
            lines.append(f"| {name} | {task} | {c['both']} | {c['only_dense']} | {c['only_sparse']} | {c['neither']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
