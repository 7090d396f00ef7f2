"""The trade-off table and plot: budgeted policy against the usual uniform choices.

`compare_policies` fits a `PolicyGenerator` at each budget and the three baselines
(`attnlab.sparsity_stats.baselines`) at the same budget, all estimated from the same run; each
baseline takes the whole blocks it costs and has its free parameters tuned on that run (the
``tuned`` column says over which grid). The
baselines' own choices are offered to the optimiser as extra candidates, so at equal budget the
budgeted policy's expected recall is never below a baseline that fits the budget, unless heads
are protected (retrieval heads kept dense spend budget on what recall does not measure); then a
``budgeted_unprotected`` row shows the same optimiser without protection, which always is. `tradeoff_figure` draws density against expected recall.

With ``head_weights`` (``--head-weights``, `attnlab.sparsity_stats.sensitivity`) every method is
tuned on, and the claim above holds for, the weighted recall (column ``weighted_recall``); the
plain mean stays in ``expected_recall``.

Heads the user protects (``protected_heads``, ``protected_layers``) are kept dense by every
baseline too, paid from its budget (`requested_dense_heads`, `tuned_baselines`): that knowledge
is the user's, not the budgeted method's, so a baseline without it would be a weakened one.
The budgeted policy's retrieval-head protection stays its own.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab.runs import Run, atomic_path

from .baselines import (
    BaselineResult,
    duo_attention_style,
    minference_style,
    uniform_streaming,
    with_dense_heads,
)
from .curves import HeadCurves, ProfileEstimator, compute_curves, retrieval_scores_from_run
from .errors import PolicyError
from .generator import PolicyGenerator, check_block_granularity, check_budget

METHODS = ("budgeted", "budgeted_unprotected", "uniform_streaming", "duo_attention", "minference")
COLUMNS = ("budget", "method", "density", "kv_share", "expected_recall", "min_head_recall", "dense_heads",
           "within_budget", "optimality_gap", "detail", "tuned", "weighted_recall")


def _weighted(recall: np.ndarray, weights: np.ndarray | None) -> float:
    """The weighted objective (NaN without ``--head-weights``: the plain mean is ``expected_recall``)."""
    return float("nan") if weights is None else float(np.average(recall, weights=weights))


def _row(budget: float, r: BaselineResult, weights: np.ndarray | None = None) -> dict[str, Any]:
    dense = sum(1 for row in r.choices for c in row if c.kind == "dense")
    return {
        "budget": budget, "method": r.name, "density": r.mean_density, "kv_share": r.mean_kv,
        "expected_recall": r.mean_recall, "min_head_recall": float(r.recall.min()), "dense_heads": dense,
        "within_budget": r.within_budget, "optimality_gap": float("nan"), "detail": r.detail, "tuned": r.tuned,
        "weighted_recall": _weighted(r.recall, weights),
    }


def _gen_row(budget: float, gen: PolicyGenerator, method: str) -> dict[str, Any]:
    kinds = Counter(gen.curves_.candidates[int(i)].kind for i in gen.choice_.reshape(-1))
    detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    if gen.protected_ and method == "budgeted":
        detail += f" ({len(gen.protected_)} protected)"
    return {
        "budget": budget, "method": method, "density": float(gen.expected_density_.mean()),
        "kv_share": float(gen.expected_kv_.mean()), "expected_recall": float(gen.expected_recall_.mean()),
        "min_head_recall": float(gen.expected_recall_.min()), "dense_heads": int(kinds.get("dense", 0)),
        "within_budget": True, "optimality_gap": gen.optimality_gap_ / gen.choice_.size, "detail": detail,
        "tuned": "", "weighted_recall": _weighted(gen.expected_recall_, gen.head_weights),
    }


def compare_policies(
    run: Run | str | os.PathLike | HeadCurves,
    budgets: Sequence[float],
    *,
    budget_kind: str = "density",
    progress: bool = False,
    policies_out: str | os.PathLike | None = None,
    **generator_kwargs: Any,
) -> pd.DataFrame:
    """One row per (budget, method): mean density, KV share, expected recall (mean and worst
    head), dense heads, whether the budget holds, the optimiser's gap, what was chosen, and
    (baselines) what was tuned over which grid on the same profile (``tuned``).

    ``generator_kwargs`` go to `PolicyGenerator` (constraints, kinds, block size, ...).
    ``policies_out``: a folder to save every compared policy into as ``{method}-{budget}.json``
    (budgeted and baselines alike), ready for ``attnlab validate``. The table's ``attrs`` hold the
    ``block_size`` and ``eval_lengths`` the policies were built at.
    """
    save_dir = None if policies_out is None else Path(policies_out)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    budgets = [check_budget(b) for b in budgets]
    if isinstance(run, HeadCurves):
        curves = run
    else:
        run = Run.coerce(run)
        est = ProfileEstimator.from_run(run, block_size=generator_kwargs.get("block_size"),
                                        eval_lengths=generator_kwargs.get("eval_lengths"),
                                        focus_last=generator_kwargs.get("focus_last"),
                                        focus_weight=generator_kwargs.get("focus_weight", 0.5))
        check_block_granularity(est, run)  # a too-coarse block size is named as such, first
        curves = compute_curves(
            est, kinds=generator_kwargs.get("kinds", PolicyGenerator().kinds), min_sink=int(generator_kwargs.get("min_sink", 4)),
            elastic=generator_kwargs.get("elastic", "auto"), progress=progress,
        )
        curves.retrieval_scores = retrieval_scores_from_run(run)
    est = curves.estimator
    rows = []
    it = budgets
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(budgets, desc="budgets", unit="budget", disable=None)
    min_sink = int(generator_kwargs.get("min_sink", 4))
    dense_heads = requested_dense_heads(generator_kwargs, est.n_layers, est.n_heads)
    for b in it:
        base = tuned_baselines(curves, b, min_sink=min_sink, budget_kind=budget_kind,
                               head_weights=generator_kwargs.get("head_weights"), dense_heads=dense_heads)
        extra = [c for r in base if r.within_budget for c in r.candidates()]
        kwargs = dict(generator_kwargs)
        kwargs["extra_candidates"] = list(kwargs.get("extra_candidates", ())) + extra
        try:
            gen = PolicyGenerator(budget=b, budget_kind=budget_kind, **kwargs).fit(curves)
            rows.append(_gen_row(b, gen, "budgeted"))
            if save_dir is not None:
                gen.emit().save(save_dir / f"budgeted-{b:g}.json")
        except PolicyError as exc:  # a budget below the constraints' minimum: say so in the table
            gen = None
            rows.append({"budget": b, "method": "budgeted", "density": float("nan"), "kv_share": float("nan"),
                         "expected_recall": float("nan"), "min_head_recall": float("nan"), "dense_heads": 0,
                         "within_budget": False, "optimality_gap": float("nan"), "detail": f"infeasible: {exc}",
                         "tuned": ""})
        protecting = kwargs.get("protect_retrieval", "dense") != "none" or kwargs.get("protected_heads") or kwargs.get("protected_layers")
        if protecting and (gen is None or gen.protected_):
            # the same optimiser without protected heads: what protection costs in recall
            free = {**kwargs, "protect_retrieval": "none", "protected_heads": (), "protected_layers": ()}
            try:
                rows.append(_gen_row(b, PolicyGenerator(budget=b, budget_kind=budget_kind, **free).fit(curves), "budgeted_unprotected"))
            except PolicyError:
                pass
        rows.extend(_row(b, r, generator_kwargs.get("head_weights")) for r in base)
        if save_dir is not None:
            for r in base:
                r.to_policy(curves, b, budget_kind).save(save_dir / f"{r.name}-{b:g}.json")
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs.update(block_size=int(est.block_size), eval_lengths=[int(x) for x in est.eval_lengths])
    return table


def tuned_baselines(curves: HeadCurves, budget: float, *, min_sink: int = 4,
                    budget_kind: str = "density", head_weights: np.ndarray | None = None,
                    dense_heads: np.ndarray | None = None) -> list[BaselineResult]:
    """The baselines `compare_policies` sets against the budgeted policy at ``budget``, each
    tuned on ``curves``' profile (its best shot): uniform streaming, DuoAttention-style (by
    ``curves.retrieval_scores``) and, under a density budget, MInference-style. With
    ``head_weights`` every one is tuned on the weighted recall the budgeted policy maximises;
    with ``dense_heads`` (bool ``[L, H]``: the user's protected heads) every one keeps those
    heads dense and pays for them from its budget (`with_dense_heads`)."""
    est = curves.estimator
    w = head_weights
    base = [
        with_dense_heads(est, dense_heads, uniform_streaming, budget, min_sink=max(4, min_sink), budget_kind=budget_kind,
                         head_weights=w),
        with_dense_heads(est, dense_heads, duo_attention_style, budget, retrieval_scores=curves.retrieval_scores,
                         min_sink=max(4, min_sink), budget_kind=budget_kind, head_weights=w),
    ]
    if budget_kind == "density":
        base.append(with_dense_heads(est, dense_heads, minference_style, budget, budget_kind=budget_kind, head_weights=w))
    return base


def requested_dense_heads(generator_kwargs: dict[str, Any], n_layers: int, n_heads: int) -> np.ndarray | None:
    """bool ``[L, H]``: the heads the user protects (``protected_heads``, ``protected_layers``;
    not the generator's retrieval heads), checked as the generator checks them; None if none."""
    if not (generator_kwargs.get("protected_heads") or generator_kwargs.get("protected_layers")):
        return None
    asked = PolicyGenerator(protect_retrieval="none", protected_heads=generator_kwargs.get("protected_heads", ()),
                            protected_layers=generator_kwargs.get("protected_layers", ()))
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for lay, head, _why in asked._protected(None, n_layers, n_heads):
        mask[lay, head] = True
    return mask


def format_table(table: pd.DataFrame) -> str:
    """The comparison as fixed-width text (what ``attnlab policy compare`` prints), then one
    line per baseline and grid saying what was tuned on the profile."""
    show = table.drop(columns=["tuned"], errors="ignore").copy()
    if "weighted_recall" in show and show["weighted_recall"].isna().all():
        show = show.drop(columns=["weighted_recall"])
    for col in ("density", "kv_share", "expected_recall", "min_head_recall", "weighted_recall"):
        if col not in show:
            continue
        show[col] = show[col].map(lambda v: f"{v:.4f}")
    show["optimality_gap"] = show["optimality_gap"].map(lambda v: "" if pd.isna(v) else f"{v:.1e}")
    show["within_budget"] = show["within_budget"].map(lambda v: "yes" if v else "NO")
    text = show.to_string(index=False)
    if "tuned" in table:
        notes: dict[tuple[str, str], list[str]] = {}
        for r in table.itertuples():
            if isinstance(r.tuned, str) and r.tuned:
                notes.setdefault((str(r.method), r.tuned), []).append(f"{r.budget:g}")
        if notes:
            what = "weighted expected recall" if table["weighted_recall"].notna().any() else "expected recall"
            text += f"\nbaselines tuned on the same profile (highest {what} within the budget):"
            for (method, tuned), budgets in notes.items():
                text += f"\n  {method} (budget {', '.join(budgets)}): {tuned}"
    return text


def tradeoff_figure(table: pd.DataFrame, title: str = "Expected recall vs density"):
    """Plotly figure: density (x) against expected recall (y), one line per method."""
    import plotly.graph_objects as go

    fig = go.Figure()
    symbols = {"budgeted": "star", "budgeted_unprotected": "star-open", "uniform_streaming": "circle", "duo_attention": "square", "minference": "diamond"}
    for method, sub in table.groupby("method", sort=False):
        sub = sub.sort_values("density")
        fig.add_trace(
            go.Scatter(
                x=sub["density"], y=sub["expected_recall"], mode="lines+markers", name=str(method),
                marker={"symbol": symbols.get(str(method), "circle"), "size": 10 if method == "budgeted" else 8},
                customdata=sub[["budget", "min_head_recall", "detail"]].to_numpy(),
                hovertemplate=("budget %{customdata[0]}<br>density %{x:.4f}<br>expected recall %{y:.4f}"
                               "<br>worst head %{customdata[1]:.3f}<br>%{customdata[2]}<extra>%{fullData.name}</extra>"),
            )
        )
    fig.update_layout(title=title, xaxis_title="density (share of causal blocks computed)",
                      yaxis_title="expected recall (attention mass kept)", template="plotly_white",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def write_tradeoff_html(table: pd.DataFrame, path: str | os.PathLike, title: str = "Expected recall vs density") -> Path:
    """Write `tradeoff_figure` as a self-contained HTML file, atomically."""
    path = Path(path)
    fig = tradeoff_figure(table, title)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path
