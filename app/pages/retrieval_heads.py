"""Retrieval: which heads retrieve (the detection leaderboard), and does ablating them hurt (the causal check)?"""

from __future__ import annotations

import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.names import head_label
from attnlab.probes import top_heads
from attnlab.runs import CAUSAL_CHECK, CAUSAL_SUMMARY, DETECTIONS


def leaderboard(ctx: state.PageContext) -> None:
    run = ctx.run
    det = data.cached_artifact(run, DETECTIONS)
    types = sorted(det["head_type"].astype(str).unique())
    if not types:
        st.info(f"{DETECTIONS.filename} is empty: run `{run.command_for(DETECTIONS)}`")
        return
    if "retrieval" not in types:
        st.info("this run has no retrieval detections yet (it has " + ", ".join(types) + "); "
                f"add them with `{run.command_for(CAUSAL_CHECK)}`. Showing another head type.")
    head_type = st.selectbox("head type", types, index=types.index("retrieval") if "retrieval" in types else 0,
                             key="retrieval_type")
    k = st.slider("heads shown", 5, 50, 20, key="retrieval_k")
    best = top_heads(det.assign(head_type=det["head_type"].astype(str)), head_type, k)
    best.insert(0, "rank", range(1, len(best) + 1))
    best["label"] = [head_label(r.layer, r.head) for r in best.itertuples()]
    state.plot(figures.leaderboard_figure(best, head_type), "retrieval_bar")
    st.dataframe(best, hide_index=True, width="stretch", key="retrieval_table")


def causal(ctx: state.PageContext) -> None:
    run = ctx.run
    table = data.cached_artifact(run, CAUSAL_CHECK)
    agg = table.groupby(["condition", "k"], as_index=False)["accuracy"].agg(["mean", "std"])
    agg.columns = ["condition", "k", "accuracy", "std"]
    state.plot(figures.causal_figure(agg), "retrieval_causal")
    st.dataframe(table, hide_index=True, width="stretch", key="retrieval_causal_table")
    if run.has(CAUSAL_SUMMARY):
        st.json(data.cached_artifact(run, CAUSAL_SUMMARY), expanded=1)


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    if not run.has(DETECTIONS):
        state.missing(run, DETECTIONS, "The leaderboard")
    else:
        try:
            leaderboard(ctx)
        except AttnlabError as exc:
            state.show_problem(exc)
    st.subheader("Causal check: needle accuracy with heads ablated")
    if not run.has(CAUSAL_CHECK):
        state.missing(run, CAUSAL_CHECK, "The causal check")
        return
    try:
        causal(ctx)
    except AttnlabError as exc:
        state.show_problem(exc)


ctx = state.page_context(state.RETRIEVAL)
if ctx is not None:
    render(ctx)
