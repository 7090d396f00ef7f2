"""The attnlab dashboard: explore heads, design a sparse-attention policy, read its validation.

Start it with ``attnlab dashboard RUNS_DIR`` (or ``streamlit run app/dashboard.py -- RUNS_DIR``,
or with ``$ATTNLAB_RUNS_DIR`` set). It reads the run directories the CLI wrote and never
recomputes what they store; the only computation is the policy studio's budgeted policy, fitted
from the run's stored statistics at the budget the slider picks.

One page per question:

- **Runs** — which runs are there, of which model, with which parameters, and what is missing?
- **Head atlas** — how does a statistic or a detection score vary over layers and heads, and
  what does one head look like?
- **Policy studio** — what does a policy at this budget keep, cost and lose, against baselines?
- **Validation** — how far is each head's sparse output from dense?
- **Retrieval** — which heads retrieve, and does ablating them hurt?
- **Head families** — which heads behave alike?

Every page reports bad input (no runs, a missing table, an old schema, a damaged file) as a
message on the page; the other pages keep working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from attnlab.app import data
from attnlab.errors import AttnlabError
from attnlab.runs import BLOCK_MAPS, DETECTIONS, HEAD_STATS, POLICY

PAGES = ("Runs", "Head atlas", "Policy studio", "Validation", "Retrieval", "Head families")
COMPARE_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
CAUSAL_CHECK = data.CAUSAL_CHECK
CAUSAL_SUMMARY = data.CAUSAL_SUMMARY


# -- cached readers: keyed by the files' modification times, so a re-run CLI stage shows ------
@st.cache_data(show_spinner=False)
def _table(run_path: str, filename: str, key: str) -> pd.DataFrame:
    return data.read_table(run_path, filename)


def table(run_path: str, filename: str) -> pd.DataFrame:
    return _table(run_path, filename, data.file_key(Path(run_path) / filename))


@st.cache_data(show_spinner=False)
def _json(run_path: str, filename: str, key: str):
    return data.read_json(run_path, filename)


def json_file(run_path: str, filename: str):
    return _json(run_path, filename, data.file_key(Path(run_path) / filename))


@st.cache_data(show_spinner=False)
def _head_means(run_path: str, key: str) -> pd.DataFrame:
    return data.head_means(run_path)


@st.cache_data(show_spinner=False)
def _detection_means(run_path: str, key: str) -> pd.DataFrame:
    return data.detection_means(run_path)


@st.cache_data(show_spinner=False)
def _block_maps(run_path: str, key: str) -> dict:
    return data.block_maps(run_path)


@st.cache_data(show_spinner=False)
def _head_values(run_path: str, layer: int, head: int, key: str) -> pd.DataFrame:
    return data.head_values(run_path, layer, head)


@st.cache_resource(show_spinner=False, max_entries=4)
def _curves(run_path: str, key: str):
    """Per-head cost-recall curves of every candidate (from head_stats and block maps)."""
    from attnlab.sparsity_stats import compute_curves

    return compute_curves(run_path)


@st.cache_data(show_spinner=False, max_entries=64)
def _policy(run_path: str, key: str, budget: float, budget_kind: str, gqa: bool, protect: str) -> dict:
    return data.fit_policy(_curves(run_path, key), budget, budget_kind, gqa, protect)


@st.cache_data(show_spinner=False, max_entries=16)
def _compare(run_path: str, key: str, budget_kind: str, gqa: bool, protect: str) -> pd.DataFrame:
    from attnlab.sparsity_stats import compare_policies

    return compare_policies(_curves(run_path, key), list(COMPARE_BUDGETS), budget_kind=budget_kind,
                            gqa_consistent=gqa, protect_retrieval=protect)


@st.cache_data(show_spinner=False)
def _stored_policy(run_path: str, key: str) -> dict:
    return data.stored_policy(run_path)


def stats_key(run_path: str) -> str:
    """What the policy curves depend on: statistics, block maps, retrieval detections."""
    return "|".join(data.file_key(Path(run_path) / f) for f in (HEAD_STATS, BLOCK_MAPS, DETECTIONS))


# -- page helpers -----------------------------------------------------------------------------
def show_problem(exc: BaseException) -> None:
    """A readable message for bad input; never a stack trace."""
    if isinstance(exc, AttnlabError):
        st.error(str(exc))
    else:
        st.error(f"this page could not be drawn: {type(exc).__name__}: {exc}")


def missing(run_path: str, filename: str, what: str) -> None:
    st.info(f"{what} needs `{filename}`, which this run does not have yet. Create it with:\n\n"
            f"`{data.command_for(filename, run_path)}`")


def shape_of(run) -> tuple[int, int, int]:
    m = run.model
    n_layers, n_heads = int(m.get("n_layers") or 0), int(m.get("n_heads") or 0)
    return n_layers, n_heads, int(m.get("n_kv_heads") or n_heads or 1)


def plot(fig: go.Figure, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


# -- pages ------------------------------------------------------------------------------------
def page_runs(ctx: dict) -> None:
    st.header("Runs")
    entries: list[data.RunEntry] = ctx["entries"]
    st.caption(f"runs folder: `{ctx['root']}`")
    if not entries:
        st.info(data.no_runs_message(ctx["root"]))
        return
    st.dataframe(data.runs_overview(entries), hide_index=True, width="stretch")
    for e in entries:
        if e.problem:
            st.error(f"{e.name}: {e.problem}")
    entry = ctx["entry"]
    if entry is None or entry.run is None:
        return
    run = entry.run
    st.subheader(f"{entry.name}: {run.model.get('name')}")
    n_layers, n_heads, n_kv = shape_of(run)
    c = st.columns(4)
    c[0].metric("layers", n_layers)
    c[1].metric("query heads", n_heads)
    c[2].metric("KV heads", n_kv)
    c[3].metric("samples", len(run.manifest.get("parameters", {}).get("lengths", []) or []))
    todo = data.missing_tables(run)
    if todo:
        st.info("This run has no " + ", ".join(f"`{f}`" for f, _ in todo) + ". The commands that add them:\n\n"
                + "\n".join(f"- `{f}`: `{cmd}`" for f, cmd in todo))
    else:
        st.success("this run has every table the dashboard reads")
    with st.expander("manifest: model, parameters, versions"):
        st.json(run.manifest, expanded=1)


def page_atlas(ctx: dict) -> None:
    st.header("Head atlas")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    n_layers, n_heads, n_kv = shape_of(run)
    sources = {}
    problems = []
    stats_ok = False
    for label, fn, filename in (("statistic", _head_means, HEAD_STATS), ("detection score", _detection_means, DETECTIONS)):
        if not run.has(filename):
            continue
        try:
            frame = fn(path, data.file_key(Path(path) / filename))
        except Exception as exc:  # noqa: BLE001 - shown on the page, the other source still works
            problems.append(exc)
            continue
        cols = [c for c in frame.columns if c not in ("layer", "head", "kv_head")]
        stats_ok = stats_ok or filename == HEAD_STATS
        if cols:
            sources[label] = (frame, cols)
    for exc in problems:
        show_problem(exc)
    if not sources:
        if not problems:
            missing(path, HEAD_STATS, "The head atlas")
        return
    _apply_heatmap_click(n_layers, n_heads)
    with st.sidebar:
        st.subheader("Head atlas")
        source = st.radio("colour heads by", list(sources), key="atlas_source", horizontal=True)
        frame, cols = sources[source]
        default = "sink_mass_1" if "sink_mass_1" in cols else ("retrieval" if "retrieval" in cols else cols[0])
        metric = st.selectbox(source, cols, index=cols.index(default), key="atlas_metric")
        layer = st.selectbox("layer", list(range(n_layers)), key="atlas_layer")
        group = max(1, n_heads // max(1, n_kv))
        head = st.selectbox("head", list(range(n_heads)), key="atlas_head",
                            format_func=lambda h: f"{h} (KV head {h // group})")
    z = data.grid(frame, metric, n_layers, n_heads)
    st.plotly_chart(data.head_heatmap(z, f"{metric} per head — {run.model.get('name')}", n_kv, metric, highlight=(layer, head)),
                    width="stretch", key="atlas_heatmap", on_select="rerun", selection_mode="points")
    st.caption("Click a cell, or choose the layer and head in the sidebar, to see that head.")
    if group > 1:
        st.caption(f"GQA: {n_heads} query heads share {n_kv} KV heads, {group} per KV head; white lines separate the groups.")

    st.subheader(f"Layer {layer}, head {head} (reads KV head {head // group})")
    st.metric(metric, "n/a" if pd.isna(z[layer, head]) else f"{z[layer, head]:.4f}")
    left, right = st.columns(2)
    with left:
        if stats_ok:
            try:
                values = _head_values(path, int(layer), int(head), data.file_key(Path(path) / HEAD_STATS))
                st.markdown("**statistics** (over samples)")
                st.dataframe(values, hide_index=True, width="stretch", key="atlas_head_values")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
        if "detection score" in sources:
            det = sources["detection score"][0]
            row = det[(det["layer"] == layer) & (det["head"] == head)].drop(columns=["layer", "head"])
            if not row.empty:
                st.markdown("**detection scores**")
                st.dataframe(row.T.rename(columns={row.index[0]: "score"}), width="stretch")
        if run.has(POLICY):
            try:
                pol = _stored_policy(path, data.file_key(Path(path) / POLICY))
                e = next(h for h in pol["heads"] if h["layer"] == layer and h["head"] == head)
                st.markdown(f"**stored policy**: `{e['kind']}` — {e.get('reason', '')}")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
    with right:
        if run.has(BLOCK_MAPS):
            try:
                maps = _block_maps(path, data.file_key(Path(path) / BLOCK_MAPS))
                plot(data.block_map_figure(maps["mass_sum"][layer, head], maps["count"], maps["block_size"],
                                           f"where L{layer}.H{head} looks (mean block mass)"), "atlas_block_map")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)


def _apply_heatmap_click(n_layers: int, n_heads: int) -> None:
    """A click on the atlas heatmap picks that head. The chart's selection is read before the
    sidebar's head pickers are created (Streamlit refuses changes to a widget already drawn),
    and each click is applied once, so the pickers stay free to change afterwards."""
    state = st.session_state.get("atlas_heatmap")
    try:
        points = state["selection"]["points"] if state else []
    except (KeyError, TypeError):
        points = []
    if not points:
        return
    p = points[0]
    try:
        layer, head = int(round(float(p["y"]))), int(round(float(p["x"])))
    except (KeyError, TypeError, ValueError):
        return
    if st.session_state.get("_atlas_click") == (layer, head):
        return
    st.session_state["_atlas_click"] = (layer, head)
    if 0 <= layer < n_layers and 0 <= head < n_heads:
        st.session_state["atlas_layer"] = layer
        st.session_state["atlas_head"] = head


def page_policy(ctx: dict) -> None:
    st.header("Policy studio")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    for f in (HEAD_STATS, BLOCK_MAPS):
        if not run.has(f):
            missing(path, f, "A policy")
            return
    n_layers, n_heads, n_kv = shape_of(run)
    with st.sidebar:
        st.subheader("Policy")
        budget = st.slider("budget", 0.05, 1.0, 0.5, 0.05, key="policy_budget",
                           help="share of dense causal attention (density) or of the KV cache (kv) the policy may use")
        budget_kind = st.radio("budget of", ("density", "kv"), key="policy_budget_kind", horizontal=True)
        gqa = st.checkbox("heads sharing a KV head share a policy", value=False, key="policy_gqa")
        protect = st.selectbox("retrieval heads", ("dense", "floor", "none"), key="policy_protect",
                               help="keep heads with retrieval score >= 0.1 dense, hold a recall floor, or nothing")
    key = stats_key(path)
    try:  # the checked readers first: a damaged or old table gets its own message and command
        table(path, HEAD_STATS)
        _block_maps(path, data.file_key(Path(path) / BLOCK_MAPS))
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)
        return
    with st.spinner("fitting the policy from the stored statistics"):
        try:
            policy = _policy(path, key, float(budget), budget_kind, gqa, protect)
        except AttnlabError as exc:
            st.error(f"{exc}\n\nMove the budget slider up, or relax the constraints in the sidebar.")
            policy = None
    if policy is not None:
        frame = data.policy_frame(policy)
        s = policy["summary"]
        c = st.columns(4)
        c[0].metric("expected density", f"{s['expected_density']:.3f}")
        c[1].metric("expected recall", f"{s['expected_recall']:.3f}")
        c[2].metric("worst head recall", f"{s['min_head_recall']:.3f}")
        c[3].metric("dense heads", s["dense_heads"])
        st.caption(f"budget {budget_kind} {budget:.2f}; KV share {s['expected_kv']:.3f}; "
                   + ("proven optimal" if s.get("optimal") else f"optimality gap {s['optimality_gap']:.2e}")
                   + (f"; {len(s['protected_heads'])} protected head(s)" if s.get("protected_heads") else ""))
        plot(data.policy_heatmap(frame, n_layers, n_heads, n_kv, f"policy kind per head at budget {budget:.2f}"),
             "policy_grid")
        with st.expander("per-head policy table (pattern, expected recall and density, why)"):
            st.dataframe(frame, hide_index=True, width="stretch", key="policy_table")
        st.download_button("download policy JSON", data.json_text(policy), file_name=f"policy_{budget_kind}_{budget:.2f}.json",
                           mime="application/json", key="download_policy")

    st.subheader("Trade-off against baselines")
    try:
        with st.spinner("comparing against uniform streaming, DuoAttention and MInference styles"):
            cmp = _compare(path, key, budget_kind, gqa, protect)
        from attnlab.sparsity_stats import tradeoff_figure

        fig = tradeoff_figure(cmp.dropna(subset=["density", "expected_recall"]))
        if policy is not None:
            x = policy["summary"]["expected_density"]  # the figure's x axis is density for either budget kind
            fig.add_trace(go.Scatter(x=[x], y=[policy["summary"]["expected_recall"]], mode="markers", name=f"this budget ({budget:.2f})",
                                     marker={"symbol": "star", "size": 18, "color": "black"}))
        plot(fig, "policy_tradeoff")
        st.dataframe(cmp, hide_index=True, width="stretch", key="policy_compare")
        st.download_button("download comparison CSV", cmp.to_csv(index=False), file_name="policy_compare.csv",
                           mime="text/csv", key="download_compare")
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)

    if run.has(POLICY):
        st.subheader("Stored policy (`policy.json`)")
        try:
            stored = _stored_policy(path, data.file_key(Path(path) / POLICY))
            b = stored.get("budget") or {}
            st.caption(f"budget {b.get('kind')} {b.get('value')}, expected recall {stored['summary'].get('expected_recall', float('nan')):.3f}")
            plot(data.policy_heatmap(data.policy_frame(stored), n_layers, n_heads, n_kv, "stored policy kind per head"),
                 "policy_stored_grid")
            st.download_button("download stored policy.json", data.json_text(stored), file_name="policy.json",
                               mime="application/json", key="download_stored")
        except Exception as exc:  # noqa: BLE001
            show_problem(exc)


def page_validation(ctx: dict) -> None:
    st.header("Validation")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    if not run.has(data.VALIDATION_HEADS) and not run.has(data.VALIDATION_SUMMARY):
        missing(path, data.VALIDATION_HEADS, "Validation")
        return
    n_layers, n_heads, n_kv = shape_of(run)
    if run.has(data.VALIDATION_SUMMARY):
        try:
            s = json_file(path, data.VALIDATION_SUMMARY)
            c = st.columns(4)
            c[0].metric("achieved density", _fmt(s.get("density_mean")), help=f"expected {_fmt(s.get('expected_density'))}")
            c[1].metric("head error rel-L2 (mean)", _fmt(s.get("rel_l2_mean")), help=f"max {_fmt(s.get('rel_l2_max'))}")
            c[2].metric("KL(dense‖sparse) nats/token", _fmt(s.get("kl_mean"), 5))
            c[3].metric("perplexity sparse", _fmt(s.get("ppl_sparse")),
                        delta=None if s.get("ppl_delta") is None else f"{s['ppl_delta']:+.3f}", delta_color="inverse")
            if s.get("needle_dense") is not None:
                st.metric("needle accuracy sparse", _fmt(s.get("needle_sparse"), 2),
                          delta=f"{s['needle_sparse'] - s['needle_dense']:+.2f} vs dense")
            st.caption(f"policy {s.get('policy')} on {s.get('model')} with the {s.get('executor')} executor, "
                       f"{s.get('n_prompts')} prompts of {s.get('prompt_tokens')} tokens; "
                       f"dense {_fmt(s.get('time_dense_s'))} s, sparse {_fmt(s.get('time_sparse_s'))} s ({s.get('device')})")
        except Exception as exc:  # noqa: BLE001
            show_problem(exc)
    if run.has(data.VALIDATION_HEADS):
        try:
            heads = table(path, data.VALIDATION_HEADS)
            numeric = [c for c in heads.columns if c not in ("layer", "head", "kv_head") and pd.api.types.is_numeric_dtype(heads[c])]
            if not numeric:
                st.error(f"{data.VALIDATION_HEADS} has no numeric error column")
                return
            metric = st.selectbox("per-head error", numeric, index=numeric.index("rel_l2") if "rel_l2" in numeric else 0,
                                  key="validation_metric")
            per_head = heads.groupby(["layer", "head"], as_index=False)[numeric].mean()
            z = data.grid(per_head, metric, n_layers, n_heads)
            plot(data.head_heatmap(z, f"{metric} per head (sparse vs dense output)", n_kv, metric), "validation_heatmap")
            st.markdown("**worst heads**")
            st.dataframe(heads.sort_values(metric, ascending=False).head(10), hide_index=True, width="stretch")
        except Exception as exc:  # noqa: BLE001
            show_problem(exc)


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v))


def page_retrieval(ctx: dict) -> None:
    st.header("Retrieval")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    if not run.has(DETECTIONS):
        missing(path, DETECTIONS, "The leaderboard")
    else:
        try:
            det = table(path, DETECTIONS)
            types = sorted(det["head_type"].astype(str).unique())
            if not types:
                st.info(f"{DETECTIONS} is empty: run `{data.command_for(DETECTIONS, path)}`")
            else:
                if "retrieval" not in types:
                    st.info("this run has no retrieval detections yet (it has " + ", ".join(types) + "); "
                            f"add them with `{data.command_for(CAUSAL_CHECK, path)}`. Showing another head type.")
                head_type = st.selectbox("head type", types, index=types.index("retrieval") if "retrieval" in types else 0,
                                         key="retrieval_type")
                k = st.slider("heads shown", 5, 50, 20, key="retrieval_k")
                from attnlab.probes.detections import top_heads

                best = top_heads(det.assign(head_type=det["head_type"].astype(str)), head_type, k)
                best.insert(0, "rank", range(1, len(best) + 1))
                best["label"] = [f"L{int(r.layer)}.H{int(r.head)}" for r in best.itertuples()]
                fig = px.bar(best, x="label", y="score", hover_data=["layer", "head", "kv_head"], template="plotly_white",
                             title=f"top {len(best)} {head_type} heads (score, mean over probes)")
                fig.update_layout(xaxis_title="head", yaxis_title=f"{head_type} score")
                plot(fig, "retrieval_bar")
                st.dataframe(best, hide_index=True, width="stretch", key="retrieval_table")
        except Exception as exc:  # noqa: BLE001
            show_problem(exc)
    st.subheader("Causal check: needle accuracy with heads ablated")
    if not run.has(CAUSAL_CHECK):
        missing(path, CAUSAL_CHECK, "The causal check")
        return
    try:
        causal = table(path, CAUSAL_CHECK)
        agg = causal.groupby(["condition", "k"], as_index=False)["accuracy"].agg(["mean", "std"])
        agg.columns = ["condition", "k", "accuracy", "std"]
        fig = px.line(agg, x="k", y="accuracy", color="condition", error_y="std", markers=True, template="plotly_white",
                      title="needle accuracy: dense, top-K retrieval heads ablated, K random heads ablated")
        fig.update_layout(xaxis_title="K heads ablated", yaxis_title="needle accuracy")
        plot(fig, "retrieval_causal")
        st.dataframe(causal, hide_index=True, width="stretch", key="retrieval_causal_table")
        if run.has(CAUSAL_SUMMARY):
            st.json(json_file(path, CAUSAL_SUMMARY), expanded=1)
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)


def page_families(ctx: dict) -> None:
    st.header("Head families")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    if not run.has(data.FAMILIES):
        missing(path, data.FAMILIES, "Head families")
        return
    try:
        fam = table(path, data.FAMILIES)
        fam = fam.assign(family=fam["family"].astype(str), label=[f"L{int(r.layer)}.H{int(r.head)}" for r in fam.itertuples()])
        hover = [c for c in ("layer", "head", "kv_head") if c in fam.columns]
        fig = px.scatter(fam, x="pc1", y="pc2", color="family", hover_name="label", hover_data=hover, template="plotly_white",
                         title="heads on the first two principal components of their features, coloured by family")
        plot(fig, "families_scatter")
        counts = fam.groupby("family", as_index=False).size().rename(columns={"size": "heads"})
        st.dataframe(counts, hide_index=True, key="families_counts")
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)


PAGE_FUNCS: dict[str, Callable[[dict], None]] = {
    "Runs": page_runs,
    "Head atlas": page_atlas,
    "Policy studio": page_policy,
    "Validation": page_validation,
    "Retrieval": page_retrieval,
    "Head families": page_families,
}


def runs_root() -> Path:
    # Streamlit passes the arguments after `--` as sys.argv[1:]; elsewhere (tests) argv is not ours.
    argv = sys.argv[1:] if Path(sys.argv[0]).name == "dashboard.py" else []
    return data.runs_dir_from(argv, os.environ)


def main() -> None:
    st.set_page_config(page_title="attnlab", layout="wide")
    root = runs_root()
    entries = data.list_runs(root)
    with st.sidebar:
        st.title("attnlab")
        page = st.radio("page", PAGES, key="page")
        entry = None
        if entries:
            names = [e.name for e in entries]
            name = st.selectbox("run", names, key="run")
            entry = entries[names.index(name)]
        else:
            st.caption(f"no runs in `{root}`")
    if page != "Runs" and (entry is None or entry.run is None):
        st.header(page)
        if entry is None:
            st.info(data.no_runs_message(root))
        else:
            st.error(f"run {entry.name} cannot be read: {entry.problem}")
        return
    try:
        PAGE_FUNCS[page](dict(root=root, entries=entries, entry=entry))
    except Exception as exc:  # noqa: BLE001 - any surprise is a message, never a trace
        show_problem(exc)


main()
