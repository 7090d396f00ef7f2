"""Tasks: the task suite's scores (``attnlab eval``) — score against achieved density per task and
method with 95% intervals and the Pareto front, the iso-density report when the run has one
(``attnlab eval --compare``), and the samples a policy changed (each can be opened in the head
inspector)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from attnlab.app import data, figures, live, state
from attnlab.errors import AttnlabError
from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, ISO_DENSITY
from attnlab.shards import describe_partial, partial_record

ALL_TASKS = "all tasks (mean)"


def changed_samples(ctx: state.PageContext, samples: pd.DataFrame, methods: list[str]) -> None:
    """The samples where a method and dense disagree, and a button to read one in the inspector."""
    sparse = [m for m in methods if m != "dense"]
    if not sparse or "dense" not in methods:
        return
    st.subheader("Samples a policy changed")
    method = st.selectbox("policy", sparse, key="tasks_method")
    table = data.changed_samples(samples, method)
    if table.empty:
        st.success(f"{method} answered every sample as dense did (right or wrong).")
        return
    st.dataframe(table, hide_index=True, width="stretch")
    name = st.selectbox("open a sample in the head inspector", table["sample"].tolist(), key="tasks_sample")
    if st.button("open in the inspector", key="tasks_open"):
        params = ctx.run.manifest.get("stages", {}).get("eval", {}).get("parameters", {})
        try:
            text = data.task_prompt_text(live.model(live.identity_key(ctx.identity)).tokenizer, name, int(params.get("seed", 0)))
        except AttnlabError as exc:
            state.show_problem(exc)
            return
        st.session_state["inspector_prompt_source"] = "own text"
        st.session_state["inspector_text"] = text
        st.switch_page(state.INSPECTOR.file)


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    if not run.has(EVAL_SUMMARY):
        state.missing(run, EVAL_SUMMARY, "The task suite")
        return
    try:
        summary = data.cached_artifact(run, EVAL_SUMMARY)
        samples = data.cached_artifact(run, EVAL_SAMPLES) if run.has(EVAL_SAMPLES) else None
    except AttnlabError as exc:
        state.show_problem(exc)
        return
    partial = partial_record(run)
    if partial is not None:
        st.warning(describe_partial(partial) + f": merge all {partial['count']} shards again when they are done.")
    tasks = list(dict.fromkeys(summary["task"]))
    lengths = sorted(set(int(n) for n in summary["length"]))
    c = st.columns(2)
    task = c[0].selectbox("task", [ALL_TASKS, *tasks], key="tasks_task")
    length = c[1].selectbox("length (tokens)", lengths, key="tasks_length")
    frame = data.task_points(summary, None if task == ALL_TASKS else task, int(length))
    front = data.pareto_front(frame["density"].to_numpy(), frame["score"].to_numpy(), lower_is_better=False)
    state.plot(figures.task_score_figure(frame, front, task, int(length)), "tasks_scores")
    st.dataframe(summary[summary["length"] == length], hide_index=True, width="stretch")
    st.caption("Score: RULER's string match (share of the references in the greedy answer), mean over samples with a "
               "95% bootstrap interval; density: the achieved prefill density. Paired columns count, on the same "
               "samples, both right / only dense right / only the policy right / neither.")
    iso_density(run)
    if samples is not None:
        changed_samples(ctx, samples, list(dict.fromkeys(summary["method"])))


def iso_density(run) -> None:
    """The iso-density report's tables (every method at the same achieved densities), or the
    command that writes them."""
    st.subheader("At equal density")
    report = run.file(ISO_DENSITY).with_suffix(".md")
    if not run.has(ISO_DENSITY) or not report.is_file():
        st.caption(f"Compare every method at the same achieved densities, per task and length: "
                   f"`attnlab eval --compare {run.path} --densities 0.1,0.2,0.3,0.5` (writes the tables and an HTML plot "
                   "into the run).")
        return
    with st.expander("iso-density report", expanded=False):
        st.markdown(report.read_text().split("\n", 2)[-1])  # without its title line


ctx = state.page_context(state.TASKS)
if ctx is not None:
    render(ctx)
