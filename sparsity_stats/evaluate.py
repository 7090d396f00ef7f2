"""``attnlab eval``: dense attention and sparse policies on the same task samples, paired.

Every sample of the task suite (`attnlab.tasks`) is answered greedily once densely and once
under each policy (sparse prefill through an executor, dense decode — as the policies run
today), graded by RULER's string match, and stored one row per (sample, method). The summary
gives per task, length and method: the mean score with a 95% bootstrap interval, the achieved
prefill density, and the paired outcome against dense on the same samples (both right, only
dense, only sparse, neither) — the honest comparison on few samples.

`iso_density` (``attnlab eval --compare RUN``) reads those rows back and reports every method
at the same achieved densities per task and length (the Sparse Frontier's iso-density tables):
each method's measured setting nearest each target density, within a tolerance, never an
interpolated point.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.attention import route_attention
from attnlab.models import LoadedModel, forward_with_cache
from attnlab.probes.needle import continue_greedy, stop_token_ids
from attnlab.tasks import TaskSample

from .executors import PolicyExecutor
from .policy import Policy

DENSE = "dense"
SAMPLE_COLUMNS = ("sample", "task", "length", "n_tokens", "method", "score", "correct", "density", "reply")
BOOTSTRAP = 2000


def _stop(model: LoadedModel, sample: TaskSample) -> Callable[[list[int]], bool]:
    """End of turn, every reference found, or (one-answer tasks) a finished line."""
    eos = stop_token_ids(model)

    def stop(generated: list[int]) -> bool:
        if generated[-1] in eos:
            return True
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        if sample.score(text) == 1.0:
            return True
        return len(sample.answers) == 1 and "\n" in text.strip()

    return stop


@torch.no_grad()
def answer(model: LoadedModel, sample: TaskSample, executor: PolicyExecutor | None = None) -> tuple[str, float]:
    """``(reply, prefill density)``: greedy decoding after a dense or a sparse prefill."""
    from transformers import DynamicCache

    with route_attention(model, None if executor is None else executor.attention):
        cache = DynamicCache(config=model.hf_model.config)
        ids = sample.input_ids.to(model.device)
        logits = forward_with_cache(model.hf_model, ids, cache, logits_to_keep=1).logits
        generated = continue_greedy(model, cache, int(logits[0, -1].argmax()),
                                    max_new_tokens=sample.max_new_tokens, generated=[], stop=_stop(model, sample))
    text = model.tokenizer.decode(generated, skip_special_tokens=True)
    if executor is None:
        return text, 1.0
    layouts = list(executor.layouts_.values())
    density = float(torch.cat([lay.density.float().flatten() for lay in layouts]).mean()) if layouts else float("nan")
    return text, density


def evaluate(model: LoadedModel, samples: Sequence[TaskSample], policies: Mapping[str, Policy], *,
             executor: str = "flex", progress: bool = True,
             done: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """One row per (sample, method): dense first, then each policy by its name. ``done``: the
    (sample name, method) pairs already answered (`earlier_answers`), skipped."""
    executors = {}
    for name, policy in policies.items():
        ex = PolicyExecutor(policy, executor)
        ex.check_model(model, name)
        executors[name] = ex
    rows: list[dict[str, Any]] = []
    methods: list[tuple[str, PolicyExecutor | None]] = [(DENSE, None), *executors.items()]
    todo = [(sample, method, ex) for sample in samples for method, ex in methods if (sample.name, method) not in done]
    bar = tqdm(total=len(todo), desc="eval", unit="answer", disable=not progress)
    for sample, method, ex in todo:
        reply, density = answer(model, sample, ex)
        score = sample.score(reply)
        rows.append({"sample": sample.name, "task": sample.task, "length": sample.context_length,
                     "n_tokens": sample.n_tokens, "method": method, "score": score,
                     "correct": score == 1.0, "density": density, "reply": reply})
        bar.update()
    bar.close()
    return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))


# -- adding to an eval run ----------------------------------------------------------------------
def method_digest(policy: Policy, executor: str) -> str:
    """What a method's answers depend on besides the sample: the policy (all of it but its
    creation time, so a baseline built again digests the same) and the executor. `eval` keeps
    an earlier answer of a method only under the same digest."""
    d = policy.to_dict()
    d.pop("created", None)
    blob = json.dumps({"policy": d, "executor": executor}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def earlier_answers(out, *, seed: int, digests: Mapping[str, str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The answers an existing eval run at ``out`` holds, for `eval` to keep rather than answer
    again (dense is answered once for any number of methods added later), and the eval parameters
    recorded with them (``digests``: `method_digest` by method). An empty table when ``out``
    holds none.

    A sample's name does not say its seed, so answers of another ``--seed`` cannot be kept or
    mixed; a method named as one in the run but with another digest (another policy under the
    same file name, another executor, or answers from before digests were recorded) cannot be
    kept either: both raise `RunError`, before any answer is computed."""
    from pathlib import Path

    from attnlab.errors import RunError
    from attnlab.runs import EVAL_SAMPLES, Run

    empty = pd.DataFrame(columns=list(SAMPLE_COLUMNS))
    if not Path(out).is_dir():
        return empty, {}
    run = Run.open(out)
    if not run.has(EVAL_SAMPLES):
        return empty, {}
    params: dict[str, Any] = run.manifest.get("stages", {}).get("eval", {}).get("parameters", {})
    if params.get("seed") != seed:
        raise RunError(f"{out} holds eval answers of --seed {params.get('seed')}, and this eval is of --seed {seed} "
                       f"(the samples share names, not prompts): use --seed {params.get('seed')} to add to it, or "
                       "another --out")
    table = run.read(EVAL_SAMPLES)
    recorded = params.get("digests", {})
    held = set(table["method"])
    for name, digest in digests.items():
        if name in held and recorded.get(name) != digest:
            raise RunError(f"{out} already holds answers named {name!r} from another policy or executor (or from "
                           "before eval recorded which): give the policy file another name, or use another --out")
    return table, params


def combine_answers(earlier: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``earlier`` and ``new`` answers in one table: grouped by sample (the earlier samples in
    their order, then the new ones), dense first in each, then the methods in order of first
    appearance."""
    parts = [t for t in (earlier, new) if not t.empty]
    if len(parts) < 2:
        return (parts[0] if parts else new).reset_index(drop=True)
    table = pd.concat(parts, ignore_index=True)
    samples = {name: i for i, name in enumerate(dict.fromkeys(table["sample"]))}
    methods = {name: i for i, name in enumerate(dict.fromkeys([DENSE, *table["method"]]))}
    key = table["sample"].map(samples) * len(methods) + table["method"].map(methods)
    return table.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the same data give the same interval)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_counts(dense: Sequence[bool], sparse: Sequence[bool]) -> dict[str, int]:
    """How the same samples fared: both right, only dense right, only sparse right, neither."""
    d = np.asarray(dense, dtype=bool)
    s = np.asarray(sparse, dtype=bool)
    if d.shape != s.shape:
        raise ValueError(f"paired outcomes need the same samples: {d.shape} vs {s.shape}")
    return {"both": int((d & s).sum()), "only_dense": int((d & ~s).sum()),
            "only_sparse": int((~d & s).sum()), "neither": int((~d & ~s).sum())}


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (task, length, method): n, mean score with its 95% interval, accuracy (all references
    found), mean density, and the paired outcome against dense on the same samples."""
    rows = []
    for (task, length), group in samples.groupby(["task", "length"], sort=False):
        dense = group[group.method == DENSE].set_index("sample")
        for method, part in group.groupby("method", sort=False):
            part = part.set_index("sample")
            lo, hi = bootstrap_ci(part.score.to_numpy())
            row = {"task": task, "length": int(length), "method": method, "n": len(part),
                   "score": float(part.score.mean()), "ci_low": lo, "ci_high": hi,
                   "accuracy": float(part.correct.mean()), "density": float(part.density.mean())}
            if method != DENSE and len(dense):
                common = part.index.intersection(dense.index)
                row.update(paired_counts(dense.loc[common, "correct"], part.loc[common, "correct"]))
            rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """A plain-text table: one line per task, length and method."""
    lines = [f"{'task':<18} {'length':>6} {'method':<16} {'n':>4} {'score':>6} {'95% CI':>15} {'density':>8}  paired vs dense"]
    for r in summary.itertuples():
        paired = "" if r.method == DENSE else (
            f"both {r.both}, only dense {r.only_dense}, only sparse {r.only_sparse}, neither {r.neither}")
        lines.append(f"{r.task:<18} {r.length:>6} {r.method:<16} {r.n:>4} {r.score:>6.3f} "
                     f"[{r.ci_low:.3f}, {r.ci_high:.3f}] {r.density:>8.3f}  {paired}")
    return "\n".join(lines)


def merge_eval_shards(shards: list, merged) -> None:
    """`attnlab merge` of ``eval`` shards: the answers in the single-process order, the summary
    recomputed from them (what one process would have written)."""
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY
    from attnlab.shards import full_order

    position = full_order(shards)
    table = pd.concat([run.read(EVAL_SAMPLES) for run in shards], ignore_index=True)
    table = table.iloc[table["sample"].map(position).argsort(kind="stable")].reset_index(drop=True)
    merged.write(EVAL_SAMPLES, table)
    merged.write(EVAL_SUMMARY, summarize(table))


# -- the iso-density report -------------------------------------------------------------------
#: Target densities of the iso-density report (`iso_density`).
ISO_DENSITIES = (0.1, 0.2, 0.3, 0.5)
#: How far a measured setting's achieved density may be from a target and still stand for it.
ISO_TOLERANCE = 0.05
#: Tasks where dense scores below this are reported but left out of the mean over tasks.
HEADLINE_FLOOR = 0.2
MEAN = "mean"
#: The headline's margin: a method is shown within this of dense when the upper end of its paired
#: gap's interval is below it (issue 16's "within 5 points of dense").
GAP_MARGIN = 0.05
ISO_COLUMNS = ("task", "length", "target", "method", "setting", "density", "n", "score", "ci_low", "ci_high",
               "reference", "in_mean", "gap", "gap_low", "gap_high", "n_paired")


def method_family(name: str) -> str:
    """The method a result name belongs to, its setting stripped: ``xattention:tau=0.95`` →
    ``xattention``, ``budgeted-0.3`` (``policy compare --save-policies``' names) → ``budgeted``."""
    base = name.split(":", 1)[0]
    return re.sub(r"[-_@](\d+(\.\d*)?|\.\d+)(e-?\d+)?$", "", base) or base


def stratified_bootstrap_ci(groups: Sequence[Sequence[float]], *, level: float = 0.95, n: int = BOOTSTRAP,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of group means, resampling within each group
    (the mean over tasks, each task's samples resampled); seeded like `bootstrap_ci`."""
    xs = [np.asarray(g, dtype=float) for g in groups]
    if not xs or any(x.size == 0 for x in xs):
        return float("nan"), float("nan")
    if all(np.all(x == x[0]) for x in xs):
        v = float(np.mean([x[0] for x in xs]))
        return v, v
    rng = np.random.default_rng(seed)
    means = np.mean([x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1) for x in xs], axis=0)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def iso_density(samples: pd.DataFrame, densities: Sequence[float] = ISO_DENSITIES, *, tolerance: float = ISO_TOLERANCE,
                floor: float = HEADLINE_FLOOR) -> pd.DataFrame:
    """Every method at the same achieved densities, per task and length (`ISO_COLUMNS`).

    Results are grouped into methods by `method_family` (a method run at several budgets or
    parameters has several *settings*). For each task, length, method and target density the
    row is the setting whose achieved density (the mean over that task's samples at that
    length) is nearest the target, if it is within ``tolerance``: its own setting name, achieved
    density, score and 95% bootstrap interval (`bootstrap_ci` of its per-sample scores). Nothing
    is interpolated: a method with no setting that near has no row there. Dense is a
    ``reference`` row at every target (density 1). Rows with task ``"mean"`` average the tasks
    where dense scores at least ``floor`` (``in_mean``), for methods present on all of them, with
    a stratified bootstrap interval (`stratified_bootstrap_ci`).

    ``gap``, ``gap_low``, ``gap_high``: dense's score minus the method's on the same samples (the
    paired difference, positive when dense is ahead), with its 95% interval; on a ``"mean"`` row
    the mean of the tasks' gaps, its interval resampling each task's paired differences. NaN on
    dense's own rows and where the run holds no dense answers for those samples. ``n_paired``: how
    many samples the gap pairs (fewer than ``n`` when dense did not answer them all).

    Raises `AttnlabError` naming the targets no method (dense aside) comes within ``tolerance`` of.
    """
    from attnlab.errors import AttnlabError

    missing = [c for c in ("task", "length", "method", "score", "density", "sample") if c not in samples.columns]
    if missing:
        raise AttnlabError(f"the per-sample eval results lack column(s) {', '.join(missing)}: re-create them with `attnlab eval`")
    settings = []
    for (task, length, method), part in samples.groupby(["task", "length", "method"], sort=False):
        settings.append({"task": task, "length": int(length), "method": method_family(str(method)), "setting": str(method),
                         "density": 1.0 if method == DENSE else float(part.density.mean()),
                         "scores": part.score.to_numpy(float),
                         "by_sample": part.groupby("sample", sort=False).score.mean()})
    rows: list[dict[str, Any]] = []
    reached: dict[float, bool] = {float(t): False for t in densities}
    dense_score = {(s["task"], s["length"]): float(s["scores"].mean()) for s in settings if s["setting"] == DENSE}
    dense_by_sample = {(s["task"], s["length"]): s["by_sample"] for s in settings if s["setting"] == DENSE}
    for t in densities:
        t = float(t)
        by_cell: dict[tuple[str, int, str], dict[str, Any]] = {}
        for s in settings:
            gap = abs(s["density"] - t)
            if s["setting"] != DENSE and gap > tolerance + 1e-12:
                continue
            key = (s["task"], s["length"], s["method"])
            best = by_cell.get(key)
            if best is None or gap < abs(best["density"] - t) - 1e-12:
                by_cell[key] = s
        for (task, length, method), s in by_cell.items():
            reference = s["setting"] == DENSE and abs(1.0 - t) > tolerance + 1e-12
            reached[t] |= not reference
            lo, hi = bootstrap_ci(s["scores"])
            diffs = _paired_diffs(dense_by_sample.get((task, length)), s)
            g_lo, g_hi = bootstrap_ci(diffs)
            rows.append({"task": task, "length": length, "target": t, "method": method, "setting": s["setting"],
                         "density": s["density"], "n": len(s["scores"]), "score": float(s["scores"].mean()),
                         "ci_low": lo, "ci_high": hi, "reference": reference,
                         "in_mean": dense_score.get((task, length), 1.0) >= floor, "_scores": s["scores"],
                         "gap": float(diffs.mean()) if diffs.size else float("nan"), "gap_low": g_lo, "gap_high": g_hi,
                         "n_paired": int(diffs.size), "_diffs": diffs})
    far = [t for t, ok in reached.items() if not ok]
    if far:
        measured = sorted(s["density"] for s in settings if s["setting"] != DENSE)
        span = f"{measured[0]:.3f} to {measured[-1]:.3f}" if measured else "none: the run holds dense results only"
        raise AttnlabError(f"density {', '.join(f'{t:g}' for t in far)}: no method's achieved density is within {tolerance:g} of it "
                           f"(measured per task and length: {span}); choose densities in that range, widen --tolerance, "
                           "or evaluate policies at those budgets")
    table = pd.DataFrame(rows)
    means = []
    for (length, t, method), part in table.groupby(["length", "target", "method"], sort=False):
        kept = {task for (task, ln), v in dense_score.items() if ln == length and v >= floor}
        part = part[part.task.isin(kept)]
        if not kept or set(part.task) != kept:
            continue
        lo, hi = stratified_bootstrap_ci(list(part["_scores"]))
        diffs = list(part["_diffs"])
        paired = all(d.size for d in diffs)
        g_lo, g_hi = stratified_bootstrap_ci(diffs) if paired else (float("nan"), float("nan"))
        names = sorted(set(part.setting))
        means.append({"task": MEAN, "length": length, "target": t, "method": method,
                      "setting": names[0] if len(names) == 1 else "per task: " + ", ".join(names),
                      "density": float(part.density.mean()), "n": int(part.n.sum()), "score": float(part.score.mean()),
                      "ci_low": lo, "ci_high": hi, "reference": bool(part.reference.all()), "in_mean": True,
                      "gap": float(np.mean([d.mean() for d in diffs])) if paired else float("nan"),
                      "gap_low": g_lo, "gap_high": g_hi, "n_paired": int(sum(d.size for d in diffs))})
    table = pd.concat([table.drop(columns=["_scores", "_diffs"]), pd.DataFrame(means)], ignore_index=True)
    return table[list(ISO_COLUMNS)]


def _paired_diffs(dense: pd.Series | None, setting: dict[str, Any]) -> np.ndarray:
    """Dense's score minus the setting's, sample by sample, on the samples both answered (empty
    for dense itself or without dense answers)."""
    if dense is None or setting["setting"] == DENSE:
        return np.zeros(0)
    mine = setting["by_sample"]
    common = mine.index.intersection(dense.index)
    return (dense.loc[common] - mine.loc[common]).to_numpy(float)


def _cell(r: Any) -> str:
    text = f"{r.score:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"
    return text if r.method == DENSE else f"{text} ({r.setting} @ {r.density:.3f})"


def format_iso_density(table: pd.DataFrame, *, title: str = "", tolerance: float = ISO_TOLERANCE,
                       floor: float = HEADLINE_FLOOR, margin: float = GAP_MARGIN) -> str:
    """The report as markdown: one table per length and target density, tasks by methods, then
    each method's paired gap to dense over the mean's tasks and whether it is shown within
    ``margin`` (the interval's upper end below it)."""
    methods = [DENSE] + [m for m in dict.fromkeys(table.method) if m != DENSE] if DENSE in set(table.method) else list(dict.fromkeys(table.method))
    left_out = sorted({r.task for r in table.itertuples() if r.task != MEAN and not r.in_mean})
    lines = [f"# Iso-density report{': ' + title if title else ''}", "",
             "Score (RULER string match; mean with a 95% bootstrap interval) of every method at the same achieved "
             "prefill density, per task and length. A cell is the method's measured setting whose achieved density on "
             f"that task and length is nearest the target, within ±{tolerance:g}: its setting and achieved density are "
             "shown. An empty cell: no setting measured that near (nothing is interpolated). Dense (density 1) is the "
             f"reference. The mean is over the tasks where dense scores at least {floor:g}"
             + (f"; left out: {', '.join(left_out)}." if left_out else " (all of them).") + " Its interval resamples "
             "each task's samples.", ""]
    for length in sorted(set(table.length)):
        for t in sorted(set(table.target)):
            part = table[(table.length == length) & (table.target == t)]
            if part.empty:
                continue
            lines += [f"## {length} tokens, density {t:g}", "", "| task | " + " | ".join(methods) + " |",
                      "|---|" + "---|" * len(methods)]
            tasks = [x for x in dict.fromkeys(part.task) if x != MEAN] + ([MEAN] if MEAN in set(part.task) else [])
            for task in tasks:
                cells = {r.method: _cell(r) for r in part[part.task == task].itertuples()}
                name = f"**{MEAN}**" if task == MEAN else (task if task not in left_out else f"{task} (dense < {floor:g})")
                lines.append(f"| {name} | " + " | ".join(cells.get(m, "") for m in methods) + " |")
            lines.append("")
            gaps = part[(part.task == MEAN) & (part.method != DENSE)]
            gaps = gaps[np.isfinite(gaps.gap.astype(float))]
            if not gaps.empty:
                lines += [f"Paired gap to dense over the mean's tasks (dense's score minus the method's on the same "
                          f"samples; the interval resamples each task's differences). Within {margin:g}: the "
                          "interval's upper end is below it.", "",
                          f"| method | setting | density | paired samples | gap to dense | within {margin:g} |",
                          "|---|---|---:|---:|---|---|"]
                for r in gaps.itertuples():
                    lines.append(f"| {r.method} | {r.setting} | {r.density:.3f} | {r.n_paired} of {r.n} | {r.gap:+.3f} "
                                 f"[{r.gap_low:+.3f}, {r.gap_high:+.3f}] | {'yes' if r.gap_high < margin else 'not shown'} |")
                lines.append("")
    return "\n".join(lines)


def iso_density_figure(samples: pd.DataFrame, table: pd.DataFrame, title: str = "Score vs achieved density"):
    """Plotly figure: one panel per task and length (and the mean), score against achieved
    density for every measured setting of every method (with 95% intervals), the points the
    report picked circled, the target densities as dotted lines."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    summary = summarize(samples)
    summary["family"] = summary.method.map(lambda m: method_family(str(m)))
    panels = [(task, int(length)) for task, length in dict.fromkeys(zip(summary.task, summary.length, strict=True))]
    panels += [(MEAN, int(length)) for length in sorted(set(table.length[table.task == MEAN]))]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[f"{task} · {length}" for task, length in panels],
                        shared_xaxes=True)
    families = [DENSE] + [f for f in dict.fromkeys(summary.family) if f != DENSE]
    color = {f: qualitative.Plotly[i % len(qualitative.Plotly)] for i, f in enumerate(families)}
    shown: set[str] = set()
    for i, (task, length) in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        if task == MEAN:
            points = table[(table.task == MEAN) & (table.length == length)].rename(columns={"method": "family", "setting": "method"})
            points = points.drop_duplicates(["family", "method"])
        else:
            points = summary[(summary.task == task) & (summary.length == length)]
        for fam in families:
            sub = points[points.family == fam].sort_values("density")
            if sub.empty:
                continue
            fig.add_trace(go.Scatter(
                x=sub.density, y=sub.score, mode="lines+markers", name=fam, legendgroup=fam, showlegend=fam not in shown,
                marker={"color": color[fam], "size": 8}, line={"color": color[fam]},
                error_y={"type": "data", "symmetric": False, "array": sub.ci_high - sub.score, "arrayminus": sub.score - sub.ci_low},
                customdata=sub[["method"]].to_numpy(),
                hovertemplate="%{customdata[0]}<br>density %{x:.3f}<br>score %{y:.3f}<extra>" + fam + "</extra>"),
                row=row, col=col)
            shown.add(fam)
        picked = table[(table.task == task) & (table.length == length) & ~table.reference]
        if not picked.empty:
            fig.add_trace(go.Scatter(
                x=picked.density, y=picked.score, mode="markers", name="at a target density", legendgroup="picked",
                showlegend="picked" not in shown, marker={"symbol": "circle-open", "size": 16, "color": "black"},
                customdata=picked[["method", "setting", "target"]].to_numpy(),
                hovertemplate="%{customdata[0]} (%{customdata[1]}) for density %{customdata[2]}<extra></extra>"),
                row=row, col=col)
            shown.add("picked")
        for t in sorted(set(table.target)):
            fig.add_vline(x=float(t), line={"dash": "dot", "color": "grey", "width": 1}, row=row, col=col)
    fig.update_layout(title=title, template="plotly_white", height=320 * nrows + 120,
                      legend={"orientation": "h", "y": -0.08})
    fig.update_xaxes(title_text="achieved density", range=[0, 1.05])
    fig.update_yaxes(title_text="score", range=[-0.05, 1.05])
    return fig


def write_iso_density(run, densities: Sequence[float] = ISO_DENSITIES, *, tolerance: float = ISO_TOLERANCE,
                      floor: float = HEADLINE_FLOOR, margin: float = GAP_MARGIN) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """Read an eval run's per-sample results, build the iso-density report and write it into
    the run: the table (`ISO_DENSITY`, CSV), the markdown beside it (``.md``) and a
    self-contained HTML plot (``.html``, plotly inlined: it opens offline). Returns
    ``(table, markdown, paths)``."""
    from attnlab.runs import EVAL_SAMPLES, ISO_DENSITY, Run, atomic_path
    from attnlab.shards import describe_partial, partial_record

    run = Run.coerce(run)
    samples = run.read(EVAL_SAMPLES)
    table = iso_density(samples, densities, tolerance=tolerance, floor=floor)
    partial = partial_record(run)
    title = f"{run.identity.name or run.name}: {run.name}"
    if partial is not None:
        title += f" (partial: {len(partial['shards'])} of {partial['count']} shards)"
    markdown = format_iso_density(table, title=title, tolerance=tolerance, floor=floor, margin=margin)
    if partial is not None:  # under the heading, before the first table
        heading, _, rest = markdown.partition("\n")
        markdown = f"{heading}\n\n**{describe_partial(partial)}.**\n{rest}"
    csv_path = run.write(ISO_DENSITY, table)
    md_path, html_path = csv_path.with_suffix(".md"), csv_path.with_suffix(".html")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown + "\n")
    fig = iso_density_figure(samples, table, f"{title} — score vs achieved density (targets {', '.join(f'{t:g}' for t in densities)})")
    with atomic_path(html_path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return table, markdown, {"csv": csv_path, "markdown": md_path, "html": html_path}
