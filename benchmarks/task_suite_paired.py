"""One policy against the others on the same task-suite samples, paired: the table RESULTS.md's
"Task suite at 2k" sections report, from a finished (or merged) ``attnlab eval`` run.

``attnlab eval --compare`` answers "how far is each method from dense" (its paired gap). This
answers the issue's other question, "is the pick below a baseline", sample by sample: for every
task, each method's score with a 95% bootstrap interval, the reference minus the method on the
samples both answered (``bootstrap_ci`` of the differences), and how many samples only one of the
two gets fully right. The mean row averages the tasks where dense scores at least ``--floor`` (the
issue's rule: 0.2), with stratified intervals (each task's samples resampled). Under the table:
each method's paired gap to dense over the same tasks, and whether it is shown within
``--margin``. Only samples every shown method (and dense) answered are used, so a partial baseline
is compared on its own samples, never against a different set.

    attnlab merge benchmarks/data/eval-2k-seed4/s* --out merged
    python benchmarks/task_suite_paired.py merged --reference p68n2k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from attnlab.sparsity_stats.evaluate import (
    DENSE,
    GAP_MARGIN,
    HEADLINE_FLOOR,
    MEAN,
    bootstrap_ci,
    paired_counts,
    stratified_bootstrap_ci,
)


def common_samples(samples: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """The rows of ``methods`` on the samples every one of them answered (per task and length)."""
    part = samples[samples.method.isin(methods)]
    answered = part.groupby(["task", "length", "sample"]).method.nunique()
    keep = answered[answered == len(methods)].index
    return part.set_index(["task", "length", "sample"]).loc[lambda d: d.index.isin(keep)].reset_index()


def paired_table(samples: pd.DataFrame, reference: str, methods: list[str], *, floor: float = HEADLINE_FLOOR) -> pd.DataFrame:
    """Per task (and a ``mean`` row over the tasks where dense ≥ ``floor``) and length: ``n``, each
    method's ``score:M`` with ``low:M``/``high:M``, and for each method ``diff:M`` (reference −
    method, paired) with its interval and ``only_ref:M``/``only:M`` counts; ``gap:M`` (dense −
    method, paired) with its interval; ``in_mean``."""
    shown = [DENSE, reference, *methods]
    known = sorted(set(samples.method))
    unknown = [m for m in shown if m not in known]
    if unknown:
        raise SystemExit(f"task_suite_paired: the run has no answers of {', '.join(unknown)}; "
                         f"it holds {', '.join(known)}: name those in --reference and --methods")
    twice = samples[samples.method.isin(shown)].duplicated(["task", "length", "sample", "method"])
    if twice.any():
        raise SystemExit(f"task_suite_paired: {int(twice.sum())} sample(s) were answered twice by the same method "
                         "(the run's rows are not one per sample): merge shards with `attnlab merge`, not by hand")
    data = common_samples(samples, shown)
    if data.empty:
        raise SystemExit(f"task_suite_paired: no sample was answered by all of {', '.join(shown)}: "
                         "leave out with --methods a method that answered other samples")
    rows = []
    for length, at in data.groupby("length", sort=True):
        by = {m: at[at.method == m].pivot_table(index=["task", "sample"], values=["score", "correct"],
                                                 aggfunc="first").sort_index() for m in shown}
        tasks = list(dict.fromkeys(at.task))
        per_task: dict[str, dict] = {}
        for task in tasks:
            s = {m: by[m].loc[task] for m in shown}
            r = {"task": task, "length": int(length), "n": len(s[DENSE]),
                 "in_mean": bool(s[DENSE].score.mean() >= floor)}
            for m in shown:
                r[f"score:{m}"] = float(s[m].score.mean())
                r[f"low:{m}"], r[f"high:{m}"] = bootstrap_ci(s[m].score.tolist())
            for m in [reference, *methods]:
                gap = (s[DENSE].score - s[m].score).to_numpy(float)
                r[f"gap:{m}"] = float(gap.mean())
                r[f"gap_low:{m}"], r[f"gap_high:{m}"] = bootstrap_ci(gap.tolist())
                r[f"_gap:{m}"] = gap
            for m in methods:
                diff = (s[reference].score - s[m].score).to_numpy(float)
                r[f"diff:{m}"] = float(diff.mean())
                r[f"diff_low:{m}"], r[f"diff_high:{m}"] = bootstrap_ci(diff.tolist())
                r[f"_diff:{m}"] = diff
                c = paired_counts(s[reference].correct.astype(bool).tolist(), s[m].correct.astype(bool).tolist())
                r[f"only_ref:{m}"], r[f"only:{m}"] = c["only_dense"], c["only_sparse"]
            per_task[task] = r
            rows.append(r)
        used = [per_task[t] for t in tasks if per_task[t]["in_mean"]]
        if used:
            mean = {"task": MEAN, "length": int(length), "n": sum(r["n"] for r in used), "in_mean": True}
            for m in shown:
                groups = [by[m].loc[r["task"]].score.tolist() for r in used]
                mean[f"score:{m}"] = float(np.mean([np.mean(g) for g in groups]))
                mean[f"low:{m}"], mean[f"high:{m}"] = stratified_bootstrap_ci(groups)
            for key, names in (("gap", [reference, *methods]), ("diff", methods)):
                for m in names:
                    groups = [r[f"_{key}:{m}"] for r in used]
                    mean[f"{key}:{m}"] = float(np.mean([g.mean() for g in groups]))
                    mean[f"{key}_low:{m}"], mean[f"{key}_high:{m}"] = stratified_bootstrap_ci(groups)
            rows.append(mean)
    table = pd.DataFrame(rows)
    return table.drop(columns=[c for c in table.columns if c.startswith("_")])


def _ci(lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.2f}"
    return f"[{f.format(lo)}, {f.format(hi)}]"


def markdown(table: pd.DataFrame, samples: pd.DataFrame, reference: str, methods: list[str], *,
             floor: float = HEADLINE_FLOOR, margin: float = GAP_MARGIN) -> str:
    shown = [DENSE, reference, *methods]
    common = common_samples(samples, shown)
    density = {m: common[common.method == m].density.mean() for m in shown}
    lines = []
    for length, part in table.groupby("length", sort=True):
        head = ["task", "n", *[m if m == DENSE else f"{m} ({density[m]:.3f})" for m in shown]]
        head += [f"{reference} − {m}, paired" for m in methods]
        head += [f"only {reference} / only {m} (fully right)" for m in methods]
        lines += [f"At {length} tokens:", "", "| " + " | ".join(head) + " |",
                  "|---|---:|" + "---|" * (len(head) - 2)]
        for r in part.to_dict("records"):
            mean = r["task"] == MEAN
            name = f"**mean, {int(part.in_mean.sum()) - 1} tasks**" if mean else (
                r["task"] if r["in_mean"] else f"{r['task']} (dense < {floor:g}: left out)")
            cells = [name, str(r["n"])]
            for m in shown:
                v = f"{r[f'score:{m}']:.2f}"
                cells.append(f"{f'**{v}**' if mean else v} {_ci(r[f'low:{m}'], r[f'high:{m}'])}")
            for m in methods:
                v = f"{r[f'diff:{m}']:+.3f}"
                cells.append(f"{f'**{v}**' if mean else v} {_ci(r[f'diff_low:{m}'], r[f'diff_high:{m}'], True)}")
            cells += ["" if mean else f"{int(r[f'only_ref:{m}'])} / {int(r[f'only:{m}'])}" for m in methods]
            lines.append("| " + " | ".join(cells) + " |")
        mean = part[part.task == MEAN]
        if not mean.empty:
            r = mean.iloc[0]
            lines += ["", "Paired gap to dense over the mean's tasks (dense minus the method, same samples):", ""]
            for m in [reference, *methods]:
                lo, hi = r[f"gap_low:{m}"], r[f"gap_high:{m}"]
                lines.append(f"- {m}: {100 * r[f'gap:{m}']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: "
                             + (f"within {100 * margin:g} shown" if hi < margin else f"within {100 * margin:g} not shown"))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an `attnlab eval` run folder (or `attnlab merge`'s output)")
    p.add_argument("--reference", required=True, help="the method the others are paired against (e.g. the pick)")
    p.add_argument("--methods", default="", help="comma-separated methods to set beside it (default: every other one)")
    p.add_argument("--floor", type=float, default=HEADLINE_FLOOR, help="tasks where dense scores below this are left out of the mean")
    p.add_argument("--margin", type=float, default=GAP_MARGIN, help="'within' margin for the gap to dense (default 0.05)")
    args = p.parse_args(argv)
    if not 0 <= args.floor <= 1 or not 0 < args.margin <= 1:
        p.error(f"--floor must be in [0, 1] and --margin in (0, 1] (scores are fractions): got {args.floor:g} and {args.margin:g}")
    path = args.run / "eval_samples.parquet"
    if not path.is_file():
        raise SystemExit(f"task_suite_paired: {path} does not exist: pass an `attnlab eval --out` or `attnlab merge --out` folder")
    samples = pd.read_parquet(path)
    methods = [m for m in args.methods.split(",") if m] or [
        m for m in dict.fromkeys(samples.method) if m not in (DENSE, args.reference)]
    table = paired_table(samples, args.reference, methods, floor=args.floor)
    sys.stdout.write(markdown(table, samples, args.reference, methods, floor=args.floor, margin=args.margin))


if __name__ == "__main__":
    main()
