"""Circuits: which heads carry a task, with which effects, and how faithful is the circuit?"""

from __future__ import annotations

import streamlit as st

from attnlab.app import data, figures, state
from attnlab.errors import AttnlabError
from attnlab.runs import CIRCUIT


def render(ctx: state.PageContext) -> None:
    run = ctx.run
    command = run.command_for(CIRCUIT)
    if not run.has(CIRCUIT):
        st.info(f"This run has no `{CIRCUIT.filename}`. Discover a head-level circuit for a task (ioi, induction, "
                f"greater_than or a .jsonl file) with:\n\n`{command}`")
        return
    try:
        circuit = data.cached_circuit(run)
    except AttnlabError as exc:
        state.show_problem(exc)
        return
    n_layers, n_heads, _ = ctx.shape
    task = circuit.task or {}
    faith = circuit.faithfulness or {}
    fmt = state.fmt
    c = st.columns(5)
    c[0].metric("task", str(task.get("name", "?")), help=task.get("description") or None)
    c[1].metric("heads", len(circuit.nodes), help=f"of {n_layers * n_heads}; threshold {circuit.threshold}")
    c[2].metric("edges", len(circuit.edges))
    c[3].metric("circuit faithfulness", fmt(faith.get("circuit_f")),
                help="share of the clean−ablated metric the circuit alone keeps (1 = all)")
    c[4].metric("completeness", fmt(faith.get("completeness")),
                help="faithfulness of every head but the circuit's (0 = the circuit is all there is)")
    st.caption(f"{circuit.method} patching ({circuit.direction}) on {task.get('n_examples', '?')} examples; logit "
               f"difference clean {circuit.clean_metric:.3f}, corrupted {circuit.corrupted_metric:.3f}")
    left, right = st.columns(2)
    with left:
        if circuit.nodes:
            state.plot(figures.circuit_graph(circuit, n_layers, n_heads), "circuit_graph")
            st.caption("heads at (head, layer), the logits on top; a line's width is its edge's effect (hover for it)")
        else:
            st.info(f"the circuit has no heads at threshold {circuit.threshold}: discover it again with a lower "
                    f"`--threshold` (`{command} --threshold 0.2`)")
    with right:
        if faith.get("sizes"):
            state.plot(figures.faithfulness_figure(faith, len(circuit.nodes)), "circuit_faithfulness")
            st.caption(f"smallest top-k reaching f ≥ {faith.get('level')}: {faith.get('smallest_at_level')}; "
                       f"CPR {fmt(faith.get('cpr'))}, CMD {fmt(faith.get('cmd'))}")
        else:
            st.info("this circuit was discovered without its faithfulness curve (`--no-faithfulness`); run "
                    f"`{command}` without it to measure the curve")
    nodes = data.circuit_nodes(circuit, run)
    st.markdown("**heads** (effect = the head's patching score)")
    st.dataframe(nodes, hide_index=True, width="stretch", key="circuit_nodes")
    if circuit.edges:
        st.markdown("**edges**")
        st.dataframe(data.circuit_edges(circuit), hide_index=True, width="stretch", key="circuit_edges")
    if circuit.nodes:
        c = st.columns([2, 1])
        pick = c[0].selectbox("inspect a circuit head", list(nodes["name"]), key="circuit_pick")
        r = nodes[nodes["name"] == pick].iloc[0]
        if c[1].button("open in the head inspector", key="circuit_inspect"):
            state.open_in_inspector(int(r["layer"]), int(r["head"]))


ctx = state.page_context(state.CIRCUITS)
if ctx is not None:
    render(ctx)
