"""Runs: which runs are there, of which model, with which parameters, and what is missing; and
two runs to compare head by head (the Head atlas then shows A, B and B − A)."""

from __future__ import annotations

import streamlit as st

from attnlab.app import data, state


def compare_picker(ctx: state.PageContext) -> None:
    """Two runs to compare head by head; kept in `state.COMPARE`."""
    readable = ctx.readable
    names = list(readable)
    st.subheader("Compare two runs")
    if len(names) < 2:
        st.caption("a comparison needs two readable runs in this folder")
        st.session_state[state.COMPARE] = None
        return
    stored = st.session_state.get(state.COMPARE)
    if "compare_a" not in st.session_state:  # the page was not drawn on the last run: take the kept choice
        current = ctx.entry.name if ctx.entry is not None and ctx.entry.name in names else names[0]
        st.session_state["compare_a"] = stored[0] if stored and stored[0] in names else current
        st.session_state["compare_b"] = stored[1] if stored and stored[1] in names else state.NO_COMPARISON
    c = st.columns(2)
    a = c[0].selectbox("run A", names, key="compare_a")
    b = c[1].selectbox("run B", [state.NO_COMPARISON, *names], key="compare_b")
    if b == state.NO_COMPARISON:
        st.session_state[state.COMPARE] = None
        st.caption("pick run B to see both runs and their difference on the Head atlas")
        return
    st.session_state[state.COMPARE] = (a, b)
    problem = data.compare_problem(readable[a].run, readable[b].run)
    if problem:
        st.error(problem)
    else:
        st.success(f"the Head atlas shows {a} (A), {b} (B) and B − A side by side")


def render(ctx: state.PageContext) -> None:
    st.caption(f"runs folder: `{ctx.root}`")
    if not ctx.entries:
        st.info(data.no_runs_message(ctx.root))
        return
    st.dataframe(data.runs_overview(list(ctx.entries)), hide_index=True, width="stretch")
    for e in ctx.entries:
        if e.problem:
            st.error(f"{e.name}: {e.problem}")
    if ctx.entry is not None and ctx.entry.run is not None:
        run = ctx.entry.run
        st.subheader(f"{ctx.entry.name}: {run.model.get('name')}")
        if ctx.identity is None:
            st.error(f"run {ctx.entry.name}'s manifest gives no usable model shape: re-create it with `attnlab profile`")
        else:
            n_layers, n_heads, n_kv = ctx.shape
            c = st.columns(4)
            c[0].metric("layers", n_layers)
            c[1].metric("query heads", n_heads)
            c[2].metric("KV heads", n_kv)
            c[3].metric("samples", len(run.manifest.get("parameters", {}).get("lengths", []) or []))
        todo = data.missing_artifacts(run)
        if todo:
            st.info("This run has no " + ", ".join(f"`{a.filename}`" for a, _ in todo) + ". The commands that add them:\n\n"
                    + "\n".join(f"- `{a.filename}`: `{cmd}`" for a, cmd in todo))
        else:
            st.success("this run has every table the dashboard reads")
        with st.expander("manifest: model, parameters, versions"):
            st.json(run.manifest, expanded=1)
    compare_picker(ctx)


ctx = state.page_context(state.RUNS)
if ctx is not None:
    render(ctx)
