"""Policy studio: what a policy at this budget keeps, costs and loses, against baselines; fitted
from the run's stored statistics at the budget the slider picks."""

from __future__ import annotations

import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.runs import BLOCK_MAPS, HEAD_STATS, POLICY, POLICY_COMPARE

COMPARE_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    for art in (HEAD_STATS, BLOCK_MAPS):
        if not run.has(art):
            state.missing(run, art, "A policy")
            return
    n_layers, n_heads, n_kv = ctx.shape
    with st.sidebar:
        st.subheader("Policy")
        budget = st.slider("budget", 0.05, 1.0, step=0.05, key="policy_budget", **state.default("policy_budget", 0.5),
                           help="share of dense causal attention (density) or of the KV cache (kv) the policy may use")
        budget_kind = st.radio("budget of", ("density", "kv"), key="policy_budget_kind", horizontal=True)
        gqa = st.checkbox("heads sharing a KV head share a policy", key="policy_gqa")
        protect = st.selectbox("retrieval heads", ("dense", "floor", "none"), key="policy_protect",
                               help="keep heads with retrieval score >= 0.1 dense, hold a recall floor, or nothing")
        layers = tuple(sorted(st.multiselect(
            "protect layers", list(range(n_layers)), key="policy_protect_layers",
            help="keep every head of these layers dense (paid from the budget, by the baselines too): the layers "
                 "`attnlab policy sensitivity --focus-last 64` finds your answers depend on")))
    try:  # the checked readers first: a damaged or old table gets its own message and command
        data.cached_artifact(run, HEAD_STATS)
        data.cached_block_maps(run)
    except AttnlabError as exc:
        state.show_problem(exc)
        return
    with st.spinner("fitting the policy from the stored statistics"):
        try:
            policy = data.cached_policy(run, budget, budget_kind, gqa, protect, layers)
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
        state.plot(figures.policy_heatmap(frame, n_layers, n_heads, n_kv, f"policy kind per head at budget {budget:.2f}"),
                   "policy_grid")
        with st.expander("per-head policy table (pattern, expected recall and density, why)"):
            st.dataframe(frame, hide_index=True, width="stretch", key="policy_table")
        st.download_button("download policy JSON", data.json_text(policy), file_name=f"policy_{budget_kind}_{budget:.2f}.json",
                           mime="application/json", key="download_policy")

    st.subheader("Trade-off against baselines")
    try:
        with st.spinner("comparing against uniform streaming, DuoAttention and MInference styles"):
            cmp = data.cached_compare(run, COMPARE_BUDGETS, budget_kind, gqa, protect, layers)
        from attnlab.sparsity_stats import tradeoff_figure

        fig = tradeoff_figure(cmp.dropna(subset=["density", "expected_recall"]))
        if policy is not None:  # the figure's x axis is density for either budget kind
            figures.star(fig, policy["summary"]["expected_density"], policy["summary"]["expected_recall"],
                         f"this budget ({budget:.2f})")
        state.plot(fig, "policy_tradeoff")
        st.dataframe(cmp, hide_index=True, width="stretch", key="policy_compare")
        st.download_button("download comparison CSV", cmp.to_csv(index=False), file_name=POLICY_COMPARE.filename,
                           mime="text/csv", key="download_compare")
    except AttnlabError as exc:
        state.show_problem(exc)

    if run.has(POLICY):
        st.subheader(f"Stored policy (`{POLICY.filename}`)")
        try:
            stored = data.cached_stored_policy(run)
            b = stored.get("budget") or {}
            st.caption(f"budget {b.get('kind')} {b.get('value')}, expected recall {stored['summary'].get('expected_recall', float('nan')):.3f}")
            state.plot(figures.policy_heatmap(data.policy_frame(stored), n_layers, n_heads, n_kv, "stored policy kind per head"),
                       "policy_stored_grid")
            st.download_button(f"download stored {POLICY.filename}", data.json_text(stored), file_name=POLICY.filename,
                               mime="application/json", key="download_stored")
        except AttnlabError as exc:
            state.show_problem(exc)


ctx = state.page_context(state.POLICY_STUDIO)
if ctx is not None:
    render(ctx)
