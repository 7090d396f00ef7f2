"""Head inspector: what one head attends to on a prompt, token by token (or block by block for
a long prompt), and what the run stored about it (statistics, detections, family, policy).

A link ``/inspector?run=NAME&head=L18.H6`` opens it on that run and head."""

from __future__ import annotations

import numpy as np
import streamlit as st

from attnlab.app import data, figures, inspector, live, state
from attnlab.errors import AttnlabError, PromptError
from attnlab.names import head_label
from attnlab.prompts import KINDS
from attnlab.runs import DETECTIONS, FAMILIES, HEAD_STATS, Run


def live_pattern(ctx: state.PageContext, layer: int, head: int, source: str, kind: str, n_tokens: int, seed: int, text: str) -> None:
    """Run the run's model on the prompt and draw the head's attention (tokens, or blocks + zoom)."""
    identity = live.identity_key(ctx.identity)
    try:
        with st.spinner(f"loading {ctx.identity.name} (once per session)"):
            model = live.model(identity)
    except AttnlabError as exc:  # a model that cannot be loaded is a message
        state.show_problem(exc)
        return
    try:
        ids = live.prompt_ids(identity, source, kind, int(n_tokens), int(seed), text)
    except PromptError as exc:
        (st.info if not text.strip() else st.error)(str(exc))
        return
    n = len(ids)
    label = head_label(layer, head)
    with st.spinner(f"running {model.name} to layer {layer} on {n} tokens"):
        labels = live.token_labels(identity, ids)
        if n * n <= inspector.MAX_CELLS:
            z = live.token_pattern(identity, ids, layer, head, None, None)
            state.plot(figures.token_figure(z, labels, labels, f"{label} on {n} tokens (query × key)"), "inspector_token_map")
            st.caption(f"{n} tokens: the whole {n} × {n} map, token by token ({n * n:,} cells). Hover a cell for its "
                       "query and key tokens; blank cells are future keys (causal).")
            top = np.nanargmax(z[-1])
            st.caption(f"the last token `{labels[-1]}` puts {z[-1, top]:.1%} of its attention on `{labels[top]}`")
            return
        block_pool(ctx.run, identity, ids, labels, layer, head)


def block_pool(run: Run, identity: str, ids: tuple[int, ...], labels: list[str], layer: int, head: int) -> None:
    """A long prompt: the head's block map (pooled), and a zoomed region at token level."""
    n = len(ids)
    preferred = int(((run.manifest.get("parameters") or {}).get("stat_config") or {}).get("block_size") or 64)
    sizes = inspector.block_sizes(n, preferred)
    c = st.columns([1, 3])
    block = c[0].selectbox("block size (tokens)", sizes, key="inspector_block",
                           help=f"{preferred} is the run's block size; smaller blocks show more detail")
    nb = -(-n // block)
    z = live.block_pattern(identity, ids, layer, head, block)
    c[1].caption(f"{n} tokens are too many to draw token by token ({n * n:,} cells; the limit is "
                 f"{inspector.MAX_CELLS:,}): pooled to {nb} × {nb} blocks of {block} tokens. Each cell is the mean "
                 "over the block's queries of their attention on the block's keys, so each row sums to 1.")
    state.plot(figures.block_figure(z, block, n, f"{head_label(layer, head)} on {n} tokens, pooled to blocks of {block}"),
               "inspector_block_map")

    st.markdown("**zoom: a region at token level**")
    want = max(1, -(-256 // block))  # about 256 tokens by default: the last queries and their local keys
    if nb > 1:
        c = st.columns(2)
        qb = c[0].slider("query blocks", 0, nb - 1, (max(0, nb - want), nb - 1), key=f"inspector_zoom_q_{n}_{block}")
        kb = c[1].slider("key blocks", 0, nb - 1, (max(0, nb - want), nb - 1), key=f"inspector_zoom_k_{n}_{block}")
    else:
        qb = kb = (0, 0)
    q_range = (qb[0] * block, min(n, (qb[1] + 1) * block))
    k_range = (kb[0] * block, min(n, (kb[1] + 1) * block))
    q_range, k_range, clipped = inspector.clip_region(q_range, k_range)
    zz = live.token_pattern(identity, ids, layer, head, q_range, k_range)
    state.plot(figures.token_figure(zz, labels[q_range[0]:q_range[1]], labels[k_range[0]:k_range[1]],
                                    f"queries {q_range[0]}–{q_range[1] - 1} × keys {k_range[0]}–{k_range[1] - 1}"),
               "inspector_zoom_map")
    note = (f" (clipped to {q_range[1] - q_range[0]} × {k_range[1] - k_range[0]} tokens to stay within "
            f"{inspector.MAX_CELLS:,} cells)") if clipped else ""
    st.caption(f"tokens {q_range[0]}–{q_range[1] - 1} (queries) × {k_range[0]}–{k_range[1] - 1} (keys){note}")


def head_summary(run: Run, layer: int, head: int) -> None:
    """The head's stored statistics, detection scores with their evidence, family and policy."""
    left, right = st.columns(2)
    with left:
        if run.has(HEAD_STATS):
            try:
                values = data.cached_head_values(run, layer, head)
                st.markdown("**statistics** (over the run's samples)")
                st.dataframe(values, hide_index=True, width="stretch", key="inspector_stats")
            except AttnlabError as exc:
                state.show_problem(exc)
        else:
            state.missing(run, HEAD_STATS, "The head's statistics")
        state.show_stored_policy(run, layer, head)
    with right:
        if run.has(DETECTIONS):
            try:
                det = data.head_detections(run, layer, head)
                st.markdown("**detection scores and evidence**")
                if det.empty:
                    st.caption("no detection of this head in the run")
                else:
                    st.dataframe(det, hide_index=True, width="stretch", key="inspector_detections")
            except AttnlabError as exc:
                state.show_problem(exc)
        else:
            state.missing(run, DETECTIONS, "Detection scores")
        if run.has(FAMILIES):
            try:
                family, others = data.head_family(run, layer, head)
                if family is None:
                    st.caption(f"this head has no family in {FAMILIES.filename}")
                else:
                    names = ", ".join(head_label(r.layer, r.head) for r in others.head(12).itertuples())
                    more = f" and {len(others) - 12} more" if len(others) > 12 else ""
                    st.markdown(f"**family**: {family}")
                    st.caption(f"{len(others)} other head(s) in it: {names}{more}" if len(others) else "the only head in it")
            except AttnlabError as exc:
                state.show_problem(exc)
        else:
            state.missing(run, FAMILIES, "The head's family")


def render(ctx: state.PageContext) -> None:
    n_layers, n_heads, n_kv = ctx.shape
    group = max(1, n_heads // max(1, n_kv))
    limit = min(ctx.identity.n_ctx or inspector.MAX_PROMPT_TOKENS, inspector.MAX_PROMPT_TOKENS)
    if int(st.session_state.get("inspector_tokens", 2)) > limit:  # kept from a run of a longer-context model
        st.session_state["inspector_tokens"] = limit
    with st.sidebar:
        st.subheader("Head inspector")
        layer, head = state.head_pickers("inspector", n_layers, n_heads, n_kv)
        source = st.radio("prompt", ("built-in", "own text"), key="inspector_prompt_source", horizontal=True)
        kind, n_tokens, seed, text = KINDS[0], 0, 0, ""
        if source == "built-in":
            kind = st.selectbox("kind of text", KINDS, key="inspector_kind")
            n_tokens = st.number_input("tokens", min_value=2, max_value=limit, step=64, key="inspector_tokens",
                                       **state.default("inspector_tokens", min(128, limit)),
                                       help=f"up to {limit:,}; prompts over {int(inspector.MAX_CELLS ** 0.5)} tokens are pooled to blocks")
            seed = st.number_input("seed", min_value=0, max_value=1_000_000, key="inspector_seed")
        else:
            text = st.text_area("prompt text", key="inspector_text", height=160,
                                help=f"at most {inspector.MAX_PROMPT_CHARS:,} characters and {limit:,} tokens")
    st.subheader(f"Layer {layer}, head {head} (reads KV head {head // group}): attention on a prompt")
    live_pattern(ctx, layer, head, source, kind, int(n_tokens), int(seed), text)
    st.subheader("What the run stored about this head")
    head_summary(ctx.run, layer, head)


ctx = state.page_context(state.INSPECTOR)
if ctx is not None:
    render(ctx)
