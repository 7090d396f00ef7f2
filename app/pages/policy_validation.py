"""Validation: how the validated policies of this runs folder trade density for error,
perplexity and needle accuracy (the Pareto front), how far each head's sparse output is from
dense, and, for decode-phase validations, accuracy against the KV cache kept."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, VALIDATION_HEADS, VALIDATION_SUMMARY


def pareto(ctx: state.PageContext) -> None:
    """Every validated policy of this run's model in the runs folder: density against a chosen cost."""
    overview = data.validation_overview(list(ctx.entries), ctx.run)
    if overview.empty:
        return
    st.subheader("Validated policies in this runs folder")
    measures = [m for m in data.PARETO_MEASURES if overview[m].notna().any()]
    measure = st.selectbox("against density", measures, key="pareto_measure",
                           format_func=lambda m: data.PARETO_MEASURES[m][0])
    label, lower = data.PARETO_MEASURES[measure]
    df = overview.dropna(subset=[measure]).sort_values("density")
    front = data.pareto_front(df["density"].to_numpy(), df[measure].to_numpy(), lower_is_better=lower)
    state.plot(figures.pareto_figure(df, measure, label, front), "validation_pareto")
    st.dataframe(overview.sort_values("density"), hide_index=True, width="stretch")
    st.caption(f"One point per run holding `{VALIDATION_SUMMARY.filename}` (`attnlab validate POLICY --out RUN`); red "
               "points are on the Pareto front. Validate baselines the same way (`attnlab import` or `attnlab policy "
               "compare`) to see them here.")


def summary(s: dict) -> None:
    f = state.fmt
    c = st.columns(4)
    c[0].metric("achieved density", f(s.get("density_mean")), help=f"expected {f(s.get('expected_density'))}")
    c[1].metric("head error rel-L2 (mean)", f(s.get("rel_l2_mean")), help=f"max {f(s.get('rel_l2_max'))}")
    c[2].metric("KL(dense‖sparse) nats/token", f(s.get("kl_mean"), 5))
    c[3].metric("perplexity sparse", f(s.get("ppl_sparse")),
                delta=None if s.get("ppl_delta") is None else f"{s['ppl_delta']:+.3f}", delta_color="inverse")
    if s.get("needle_dense") is not None:
        st.metric("needle accuracy sparse", f(s.get("needle_sparse"), 2),
                  delta=f"{s['needle_sparse'] - s['needle_dense']:+.2f} vs dense")
    st.caption(f"policy {s.get('policy')} on {s.get('model')} with the {s.get('executor')} executor, "
               f"{s.get('n_prompts')} prompts of {s.get('prompt_tokens')} tokens; "
               f"dense {f(s.get('time_dense_s'))} s, sparse {f(s.get('time_sparse_s'))} s ({s.get('device')})")


def per_head(ctx: state.PageContext) -> None:
    heads = data.cached_artifact(ctx.run, VALIDATION_HEADS)
    numeric = [c for c in heads.columns if c not in ("layer", "head", "kv_head") and pd.api.types.is_numeric_dtype(heads[c])]
    if not numeric:
        st.error(f"{VALIDATION_HEADS.filename} has no numeric error column")
        return
    metric = st.selectbox("per-head error", numeric, index=numeric.index("rel_l2") if "rel_l2" in numeric else 0,
                          key="validation_metric")
    n_layers, n_heads, n_kv = ctx.shape
    means = heads.groupby(["layer", "head"], as_index=False)[numeric].mean()
    z = data.grid(means, metric, n_layers, n_heads)
    state.plot(figures.head_heatmap(z, f"{metric} per head (sparse vs dense output)", n_kv, metric), "validation_heatmap")
    st.markdown("**worst heads**")
    st.dataframe(heads.sort_values(metric, ascending=False).head(10), hide_index=True, width="stretch")


def decode_pareto(ctx: state.PageContext) -> None:
    """Every decode-phase validation of this run's model in the runs folder: KV cache kept against a measure."""
    overview = data.decode_overview(list(ctx.entries), ctx.run)
    if overview.empty:
        return
    st.subheader("Decode phase: accuracy against the KV cache kept")
    measures = [m for m in data.DECODE_MEASURES if overview[m].notna().any()]
    if not measures:
        return
    measure = st.selectbox("against KV kept", measures, key="decode_measure",
                           format_func=lambda m: data.DECODE_MEASURES[m][0])
    label, lower = data.DECODE_MEASURES[measure]
    df = overview.dropna(subset=[measure]).sort_values("kv_fraction")
    front = data.pareto_front(df["kv_fraction"].to_numpy(), df[measure].to_numpy(), lower_is_better=lower)
    state.plot(figures.pareto_figure(df, measure, label, front, x="kv_fraction", x_name="KV cache kept",
                                     x_title="KV bytes held, share of the dense cache"), "decode_pareto")
    st.dataframe(overview.sort_values("kv_fraction"), hide_index=True, width="stretch")
    st.caption(f"One point per run holding `{DECODE_SUMMARY.filename}` (`attnlab validate POLICY --phase decode --needle N "
               "--out RUN`); red points are on the Pareto front. `kv_vs_predicted` is the KV held over the "
               "policy's prediction (1.0 = exact).")


def decode_summary(run, s: dict) -> None:
    """This run's decode-phase validation: agreement, KV held, speed, and the needle samples it changed."""
    f = state.fmt
    st.markdown("**Decode phase** (compressed KV cache vs the full cache)")
    c = st.columns(4)
    c[0].metric("KV cache kept", f(s.get("kv_fraction")), help=f"predicted {f(s.get('kv_fraction_predicted'))}")
    c[1].metric("greedy tokens equal to dense", f(s.get("token_match")),
                help=f"first divergence at token {f(s.get('first_divergence'), 1)} on average")
    c[2].metric("KL teacher-forced, nats/token", f(s.get("kl_mean"), 5))
    c[3].metric("decode tokens/s", f(s.get("tokens_per_s_compressed"), 2),
                help=f"dense {f(s.get('tokens_per_s_dense'), 2)} tokens/s")
    if s.get("needle_dense") is not None:
        st.metric("needle accuracy compressed", f(s.get("needle_compressed"), 2),
                  delta=f"{s['needle_compressed'] - s['needle_dense']:+.2f} vs dense")
        st.caption(f"paired over {s.get('needle_n')} samples: both right {s.get('needle_both')}, only dense "
                   f"{s.get('needle_dense_only')}, only compressed {s.get('needle_compressed_only')}, neither "
                   f"{s.get('needle_neither')}")
    if run.has(DECODE_SAMPLES):
        changed = data.changed_decode_samples(data.cached_artifact(run, DECODE_SAMPLES))
        if len(changed):
            st.markdown(f"**Needle samples the compressed cache changed** ({len(changed)})")
            st.dataframe(changed, hide_index=True, width="stretch")
    st.caption(f"policy {s.get('policy')} on {s.get('model')}, phase {s.get('phase')}; {s.get('note') or ''}")


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    pareto(ctx)
    decode_pareto(ctx)
    if not (run.has(VALIDATION_HEADS) or run.has(VALIDATION_SUMMARY) or run.has(DECODE_SUMMARY)):
        state.missing(run, VALIDATION_HEADS, "Validation")
        return
    st.subheader(f"Run {ctx.entry.name}")
    if run.has(VALIDATION_SUMMARY):
        try:
            s = data.cached_artifact(run, VALIDATION_SUMMARY)
            if isinstance(s, dict):
                summary(s)
            else:
                st.error(f"{run.file(VALIDATION_SUMMARY)} is not a validation summary (a JSON object); re-create it with "
                         f"`{run.command_for(VALIDATION_SUMMARY)}`")
        except AttnlabError as exc:
            state.show_problem(exc)
    if run.has(DECODE_SUMMARY):
        try:
            s = data.cached_artifact(run, DECODE_SUMMARY)
            if isinstance(s, dict):
                decode_summary(run, s)
            else:
                st.error(f"{run.file(DECODE_SUMMARY)} is not a decode validation summary (a JSON object); re-create it "
                         f"with `{run.command_for(DECODE_SUMMARY)}`")
        except AttnlabError as exc:
            state.show_problem(exc)
    if run.has(VALIDATION_HEADS):
        try:
            per_head(ctx)
        except AttnlabError as exc:
            state.show_problem(exc)


ctx = state.page_context(state.VALIDATION)
if ctx is not None:
    render(ctx)
