"""Head atlas: how a statistic or a detection score varies over layers and heads, what one head
looks like, and, with two runs picked on the Runs page, how the two runs differ."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.runs import BLOCK_MAPS, DETECTIONS, HEAD_STATS

STATISTIC, DETECTION = "statistic", "detection score"


def _source_frame(source: str, run) -> pd.DataFrame:
    return data.cached_head_means(run) if source == STATISTIC else data.cached_detection_means(run)


def apply_heatmap_click(n_layers: int, n_heads: int) -> None:
    """A click on the heatmap selects that head; each click is applied once, so the pickers
    stay free to change afterwards (the chart's selection is read before they are drawn)."""
    chart = st.session_state.get("atlas_heatmap")
    try:
        points = chart["selection"]["points"] if chart else []
        p = points[0] if points else None
        picked = None if p is None else (int(round(float(p["y"]))), int(round(float(p["x"]))))
    except (KeyError, TypeError, ValueError, IndexError):
        picked = None
    if picked is None or st.session_state.get("_atlas_click") == picked:
        return
    st.session_state["_atlas_click"] = picked
    if 0 <= picked[0] < n_layers and 0 <= picked[1] < n_heads:
        state.select_head(*picked)


def compare(ctx: state.PageContext, source: str, metric: str) -> None:
    """Run A, run B and B − A of the atlas's value, when two runs are picked on the Runs page."""
    pair = ctx.compare
    if not pair:
        return
    st.subheader(f"Run A vs run B: {metric}")
    readable = ctx.readable
    if pair[0] not in readable or pair[1] not in readable:
        st.info(f"the runs picked for comparison ({pair[0]}, {pair[1]}) are not both readable any more: pick two on the Runs page")
        return
    a, b = readable[pair[0]], readable[pair[1]]
    problem = data.compare_problem(a.run, b.run)
    if problem:
        st.error(problem)
        return
    art = HEAD_STATS if source == STATISTIC else DETECTIONS
    grids = []
    for e in (a, b):
        if not e.run.has(art):
            state.missing(e.run, art, f"Comparing by {source}")
            return
        try:
            frame = _source_frame(source, e.run)
        except AttnlabError as exc:
            state.show_problem(exc)
            return
        if metric not in frame.columns:
            st.info(f"run {e.name} has no {source} `{metric}`: pick a {source} both runs have")
            return
        ident = e.run.identity
        grids.append(data.grid(frame, metric, ident.n_layers, ident.n_heads))
    state.plot(figures.compare_figure(grids[0], grids[1], (a.name, b.name), metric, a.run.identity.n_kv_heads), "atlas_compare")
    diff = grids[1] - grids[0]
    if np.isfinite(diff).any():
        la, h = np.unravel_index(np.nanargmax(np.abs(diff)), diff.shape)
        c = st.columns(3)
        c[0].metric("mean |B − A|", f"{np.nanmean(np.abs(diff)):.4f}")
        c[1].metric("largest change", f"{diff[la, h]:+.4f}", help=f"{metric}: A {grids[0][la, h]:.4f}, B {grids[1][la, h]:.4f}")
        c[2].metric("at head", head_label(la, h))


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    n_layers, n_heads, n_kv = ctx.shape
    sources: dict[str, tuple[pd.DataFrame, list[str]]] = {}
    problems: list[AttnlabError] = []
    for source, art in ((STATISTIC, HEAD_STATS), (DETECTION, DETECTIONS)):
        if not run.has(art):
            continue
        try:
            frame = _source_frame(source, run)
        except AttnlabError as exc:  # shown on the page, the other source still works
            problems.append(exc)
            continue
        cols = [c for c in frame.columns if c not in ("layer", "head", "kv_head")]
        if cols:
            sources[source] = (frame, cols)
    for exc in problems:
        state.show_problem(exc)
    if not sources:
        if not problems:
            state.missing(run, HEAD_STATS, "The head atlas")
        return
    apply_heatmap_click(n_layers, n_heads)
    with st.sidebar:
        st.subheader("Head atlas")
        source = st.radio("colour heads by", list(sources), key="atlas_source", horizontal=True)
        frame, cols = sources[source]
        first = "sink_mass_1" if "sink_mass_1" in cols else ("retrieval" if "retrieval" in cols else cols[0])
        metric = st.selectbox(source, cols, index=cols.index(first), key="atlas_metric")
        layer, head = state.head_pickers("atlas", n_layers, n_heads, n_kv)
    group = max(1, n_heads // max(1, n_kv))
    z = data.grid(frame, metric, n_layers, n_heads)
    st.plotly_chart(figures.head_heatmap(z, f"{metric} per head — {run.model.get('name')}", n_kv, metric, highlight=(layer, head)),
                    width="stretch", key="atlas_heatmap", on_select="rerun", selection_mode="points")
    st.caption("Click a cell, or choose the layer and head in the sidebar, to see that head.")
    if group > 1:
        st.caption(f"GQA: {n_heads} query heads share {n_kv} KV heads, {group} per KV head; white lines separate the groups.")
    compare(ctx, source, metric)

    st.subheader(f"Layer {layer}, head {head} (reads KV head {head // group})")
    c = st.columns([1, 1])
    c[0].metric(metric, "n/a" if pd.isna(z[layer, head]) else f"{z[layer, head]:.4f}")
    if c[1].button("open in the head inspector", key="atlas_inspect",
                   help="its attention on a prompt, token by token, with its detections and family"):
        state.open_in_inspector(layer, head)
    left, right = st.columns(2)
    with left:
        if STATISTIC in sources:
            values = data.cached_head_values(run, layer, head)
            st.markdown("**statistics** (over samples)")
            st.dataframe(values, hide_index=True, width="stretch", key="atlas_head_values")
        if DETECTION in sources:
            det = sources[DETECTION][0]
            row = det[(det["layer"] == layer) & (det["head"] == head)].drop(columns=["layer", "head"])
            if not row.empty:
                st.markdown("**detection scores**")
                st.dataframe(row.T.rename(columns={row.index[0]: "score"}), width="stretch")
        state.show_stored_policy(run, layer, head)
    with right:
        if run.has(BLOCK_MAPS):
            try:
                maps = data.cached_block_maps(run)
                state.plot(figures.block_map_figure(maps["mass_sum"][layer, head], maps["count"], maps["block_size"],
                                                    f"where {head_label(layer, head)} looks (mean block mass)"), "atlas_block_map")
            except AttnlabError as exc:
                state.show_problem(exc)


ctx = state.page_context(state.ATLAS)
if ctx is not None:
    render(ctx)
