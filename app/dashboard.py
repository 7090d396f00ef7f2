"""The attnlab dashboard: explore heads, design a sparse-attention policy, read its validation.

Start it with ``attnlab dashboard RUNS_DIR`` (or ``streamlit run app/dashboard.py -- RUNS_DIR``,
or with ``$ATTNLAB_RUNS_DIR`` set). It reads the run directories the CLI wrote and never
recomputes what they store; the only computations are the policy studio's budgeted policy, fitted
from the run's stored statistics at the budget the slider picks, and the head inspector's one
head on one prompt.

One page per question:

- **Runs** — which runs are there, of which model, with which parameters, and what is missing?
- **Head atlas** — how does a statistic or a detection score vary over layers and heads, and
  what does one head look like? With two runs picked on the Runs page: how do they differ?
- **Head inspector** — what does this head attend to on this prompt, token by token (or block
  by block for a long prompt), and what do its statistics, detections and family say?
- **Policy studio** — what does a policy at this budget keep, cost and lose, against baselines?
- **Validation** — how do the validated policies of this runs folder trade density for error,
  perplexity and needle accuracy (the Pareto front), and how far is each head's sparse output from dense?
- **Retrieval** — which heads retrieve, and does ablating them hurt?
- **Head families** — which heads behave alike?
- **Circuits** — which heads carry a task, with which effects, and how faithful is the circuit?

The head selected on one page (atlas, inspector, circuits) is the head of the others. The model
is loaded only by the head inspector, only when it draws a live prompt (`st.cache_resource`).

Every page reports bad input (no runs, a missing table, an old schema, a damaged file) as a
message on the page; the other pages keep working.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from attnlab.app import data, inspector
from attnlab.errors import AttnlabError, PromptError
from attnlab.runs import BLOCK_MAPS, DETECTIONS, HEAD_STATS, POLICY, Run

PAGES = ("Runs", "Head atlas", "Head inspector", "Policy studio", "Validation", "Retrieval", "Head families", "Circuits")
#: Session-state keys shared by the pages: the selected ``(layer, head)`` and the runs compared.
SELECTED_HEAD = "selected_head"
COMPARE = "compare_runs"
NO_COMPARISON = "(no comparison)"
#: Widgets whose value outlives a visit to another page (Streamlit forgets the value of a widget
#: that a script run did not draw, unless it is written back to the session state first).
KEEP_WIDGETS = ("inspector_prompt_source", "inspector_kind", "inspector_tokens", "inspector_seed", "inspector_text",
                "policy_budget", "policy_budget_kind", "policy_gqa", "policy_protect")
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


@st.cache_data(show_spinner=False)
def _circuit(run_path: str, key: str):
    return data.read_circuit(run_path)


@st.cache_resource(show_spinner=False, max_entries=2)
def _model(identity: str):
    """The run's model (``identity``: the manifest's model entry as JSON); loaded once."""
    return inspector.load_run_model(json.loads(identity))


@st.cache_data(show_spinner=False, max_entries=32)
def _prompt_ids(identity: str, source: str, kind: str, n_tokens: int, seed: int, text: str) -> tuple[int, ...]:
    model = _model(identity)
    if source == "built-in":
        ids = inspector.builtin_prompt_ids(model, kind, int(n_tokens), int(seed))
    else:
        ids = inspector.text_prompt_ids(model, text)
    return tuple(int(i) for i in ids.reshape(-1).tolist())


@st.cache_data(show_spinner=False, max_entries=32)
def _token_labels(identity: str, ids: tuple[int, ...]) -> list[str]:
    return inspector.token_labels(_model(identity).tokenizer, list(ids))


@st.cache_data(show_spinner=False, max_entries=8)
def _layer_qk(identity: str, ids: tuple[int, ...], layer: int) -> inspector.LayerQK:
    import torch

    return inspector.capture_layer_qk(_model(identity), torch.tensor([ids]), layer)


@st.cache_data(show_spinner=False, max_entries=64)
def _token_pattern(identity: str, ids: tuple[int, ...], layer: int, head: int, q_range, k_range) -> np.ndarray:
    return inspector.token_pattern(_layer_qk(identity, ids, layer), head, q_range, k_range)


@st.cache_data(show_spinner=False, max_entries=64)
def _block_pattern(identity: str, ids: tuple[int, ...], layer: int, head: int, block: int) -> np.ndarray:
    return inspector.block_pattern(_layer_qk(identity, ids, layer), head, block)


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


def missing(run_path: str, filename: str, what: str, model: str | None = None) -> None:
    if model is None:  # the command names the run's own model
        try:
            model = Run.open(run_path).model.get("name")
        except AttnlabError:
            model = None
    st.info(f"{what} needs `{filename}`, which this run does not have yet. Create it with:\n\n"
            f"`{data.command_for(filename, run_path, model)}`")


def shape_of(run) -> tuple[int, int, int]:
    m = run.model
    n_layers, n_heads = int(m.get("n_layers") or 0), int(m.get("n_heads") or 0)
    return n_layers, n_heads, int(m.get("n_kv_heads") or n_heads or 1)


def plot(fig: go.Figure, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


def head_pickers(prefix: str, n_layers: int, n_heads: int, n_kv: int, entered: bool) -> tuple[int, int]:
    """Layer and head selectboxes (keys ``{prefix}_layer``, ``{prefix}_head``) that start from the
    head selected on another page and make theirs the selected head. Streamlit forgets a
    widget's value when its page is not drawn, so the selection lives in `SELECTED_HEAD`."""
    lk, hk = f"{prefix}_layer", f"{prefix}_head"
    sel = st.session_state.get(SELECTED_HEAD)
    if sel is not None and (entered or lk not in st.session_state):
        st.session_state[lk], st.session_state[hk] = int(sel[0]), int(sel[1])
    for k, n in ((lk, n_layers), (hk, n_heads)):  # another run may have fewer layers or heads
        v = st.session_state.get(k)
        if v is not None and not (isinstance(v, (int, np.integer)) and 0 <= v < n):
            st.session_state[k] = max(0, min(int(v) if isinstance(v, (int, np.integer)) else 0, n - 1))
    group = max(1, n_heads // max(1, n_kv))
    layer = st.selectbox("layer", list(range(n_layers)), key=lk)
    head = st.selectbox("head", list(range(n_heads)), key=hk, format_func=lambda h: f"{h} (KV head {h // group})")
    st.session_state[SELECTED_HEAD] = (int(layer), int(head))
    return int(layer), int(head)


def default(key: str, value) -> dict:
    """``value=`` for a kept widget (`KEEP_WIDGETS`) only on its first drawing: Streamlit warns
    about a default given to a widget whose value the session state already holds."""
    return {} if key in st.session_state else {"value": value}


def inspect_head(layer: int, head: int) -> None:
    """Button callback: make ``(layer, head)`` the selected head and open the head inspector."""
    st.session_state[SELECTED_HEAD] = (int(layer), int(head))
    st.session_state["page"] = "Head inspector"


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
        compare_picker(ctx)
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
    compare_picker(ctx)


def compare_picker(ctx: dict) -> None:
    """Two runs to compare head by head (the atlas then shows A, B and B − A); kept in `COMPARE`."""
    names = [e.name for e in ctx["entries"] if e.run is not None]
    st.subheader("Compare two runs")
    if len(names) < 2:
        st.caption("a comparison needs two readable runs in this folder")
        st.session_state[COMPARE] = None
        return
    stored = st.session_state.get(COMPARE)
    if ctx["entered"] or "compare_a" not in st.session_state:
        current = ctx["entry"].name if ctx["entry"] is not None and ctx["entry"].name in names else names[0]
        st.session_state["compare_a"] = stored[0] if stored and stored[0] in names else current
        st.session_state["compare_b"] = stored[1] if stored and stored[1] in names else NO_COMPARISON
    c = st.columns(2)
    a = c[0].selectbox("run A", names, key="compare_a")
    b = c[1].selectbox("run B", [NO_COMPARISON, *names], key="compare_b")
    if b == NO_COMPARISON:
        st.session_state[COMPARE] = None
        st.caption("pick run B to see both runs and their difference on the Head atlas")
        return
    st.session_state[COMPARE] = (a, b)
    runs = {e.name: e.run for e in ctx["entries"] if e.run is not None}
    problem = data.shape_mismatch(runs[a], runs[b])
    if problem:
        st.error(problem)
    else:
        st.success(f"the Head atlas shows {a} (A), {b} (B) and B − A side by side")


def _source_frame(label: str, path: str) -> pd.DataFrame:
    if label == "statistic":
        return _head_means(path, data.file_key(Path(path) / HEAD_STATS))
    return _detection_means(path, data.file_key(Path(path) / DETECTIONS))


def atlas_compare(ctx: dict, source: str, metric: str) -> None:
    """Run A, run B and B − A of the atlas's value, when two runs are picked on the Runs page."""
    pair = st.session_state.get(COMPARE)
    if not pair:
        return
    runs = {e.name: e for e in ctx["entries"] if e.run is not None}
    st.subheader(f"Run A vs run B: {metric}")
    if pair[0] not in runs or pair[1] not in runs:
        st.info(f"the runs picked for comparison ({pair[0]}, {pair[1]}) are not both readable any more: pick two on the Runs page")
        return
    a, b = runs[pair[0]], runs[pair[1]]
    problem = data.shape_mismatch(a.run, b.run)
    if problem:
        st.error(problem)
        return
    filename = HEAD_STATS if source == "statistic" else DETECTIONS
    grids = []
    for e in (a, b):
        if not e.run.has(filename):
            missing(str(e.path), filename, f"Comparing by {source}", e.run.model.get("name"))
            return
        try:
            frame = _source_frame(source, str(e.path))
        except Exception as exc:  # noqa: BLE001
            show_problem(exc)
            return
        if metric not in frame.columns:
            st.info(f"run {e.name} has no {source} `{metric}`: pick a {source} both runs have")
            return
        grids.append(data.grid(frame, metric, *shape_of(e.run)[:2]))
    n_kv = shape_of(a.run)[2]
    plot(data.compare_figure(grids[0], grids[1], (a.name, b.name), metric, n_kv), "atlas_compare")
    diff = grids[1] - grids[0]
    if np.isfinite(diff).any():
        la, h = np.unravel_index(np.nanargmax(np.abs(diff)), diff.shape)
        c = st.columns(3)
        c[0].metric("mean |B − A|", f"{np.nanmean(np.abs(diff)):.4f}")
        c[1].metric("largest change", f"{diff[la, h]:+.4f}", help=f"{metric}: A {grids[0][la, h]:.4f}, B {grids[1][la, h]:.4f}")
        c[2].metric("at head", f"L{la}.H{h}")


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
        layer, head = head_pickers("atlas", n_layers, n_heads, n_kv, ctx["entered"])
    group = max(1, n_heads // max(1, n_kv))
    z = data.grid(frame, metric, n_layers, n_heads)
    st.plotly_chart(data.head_heatmap(z, f"{metric} per head — {run.model.get('name')}", n_kv, metric, highlight=(layer, head)),
                    width="stretch", key="atlas_heatmap", on_select="rerun", selection_mode="points")
    st.caption("Click a cell, or choose the layer and head in the sidebar, to see that head.")
    if group > 1:
        st.caption(f"GQA: {n_heads} query heads share {n_kv} KV heads, {group} per KV head; white lines separate the groups.")
    atlas_compare(ctx, source, metric)

    st.subheader(f"Layer {layer}, head {head} (reads KV head {head // group})")
    c = st.columns([1, 1])
    c[0].metric(metric, "n/a" if pd.isna(z[layer, head]) else f"{z[layer, head]:.4f}")
    c[1].button("open in the head inspector", key="atlas_inspect", on_click=inspect_head, args=(layer, head),
                help="its attention on a prompt, token by token, with its detections and family")
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


def page_inspector(ctx: dict) -> None:
    st.header("Head inspector")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    n_layers, n_heads, n_kv = shape_of(run)
    if not n_layers or not n_heads:
        st.error(f"run {ctx['entry'].name}'s manifest gives no model shape (layers, heads): re-create it with `attnlab profile`")
        return
    group = max(1, n_heads // max(1, n_kv))
    from attnlab.prompts import KINDS

    n_ctx = int(run.model.get("n_ctx") or inspector.MAX_PROMPT_TOKENS)
    limit = min(n_ctx, inspector.MAX_PROMPT_TOKENS)
    if int(st.session_state.get("inspector_tokens", 2)) > limit:  # kept from a run of a longer-context model
        st.session_state["inspector_tokens"] = limit
    with st.sidebar:
        st.subheader("Head inspector")
        layer, head = head_pickers("inspector", n_layers, n_heads, n_kv, ctx["entered"])
        source = st.radio("prompt", ("built-in", "own text"), key="inspector_prompt_source", horizontal=True)
        kind, n_tokens, seed, text = KINDS[0], 0, 0, ""
        if source == "built-in":
            kind = st.selectbox("kind of text", KINDS, key="inspector_kind")
            n_tokens = st.number_input("tokens", min_value=2, max_value=limit, step=64, key="inspector_tokens",
                                       **default("inspector_tokens", min(128, limit)),
                                       help=f"up to {limit:,}; prompts over {int(inspector.MAX_CELLS ** 0.5)} tokens are pooled to blocks")
            seed = st.number_input("seed", min_value=0, max_value=1_000_000, key="inspector_seed")
        else:
            text = st.text_area("prompt text", key="inspector_text", height=160,
                                help=f"at most {inspector.MAX_PROMPT_CHARS:,} characters and {limit:,} tokens")
    st.subheader(f"Layer {layer}, head {head} (reads KV head {head // group}): attention on a prompt")
    live_pattern(run, layer, head, source, kind, int(n_tokens), int(seed), text)
    st.subheader("What the run stored about this head")
    head_summary(run, path, layer, head)


def live_pattern(run, layer: int, head: int, source: str, kind: str, n_tokens: int, seed: int, text: str) -> None:
    """Run the run's model on the prompt and draw the head's attention (tokens, or blocks + zoom)."""
    identity = json.dumps(run.model, sort_keys=True, default=str)
    try:
        with st.spinner(f"loading {run.model.get('name')} (once per session)"):
            model = _model(identity)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded is a message
        show_problem(exc)
        return
    try:
        ids = _prompt_ids(identity, source, kind, int(n_tokens), int(seed), text)
    except PromptError as exc:
        (st.info if not text.strip() else st.error)(str(exc))
        return
    n = len(ids)
    with st.spinner(f"running {model.name} to layer {layer} on {n} tokens"):
        labels = _token_labels(identity, ids)
        if n * n <= inspector.MAX_CELLS:
            z = _token_pattern(identity, ids, layer, head, None, None)
            plot(inspector.token_figure(z, labels, labels, f"L{layer}.H{head} on {n} tokens (query × key)"), "inspector_token_map")
            st.caption(f"{n} tokens: the whole {n} × {n} map, token by token ({n * n:,} cells). Hover a cell for its "
                       "query and key tokens; blank cells are future keys (causal).")
            top = np.nanargmax(z[-1])
            st.caption(f"the last token `{labels[-1]}` puts {z[-1, top]:.1%} of its attention on `{labels[top]}`")
            return
        block_pool(run, identity, ids, labels, layer, head)


def block_pool(run, identity: str, ids: tuple[int, ...], labels: list[str], layer: int, head: int) -> None:
    """A long prompt: the head's block map (pooled), and a zoomed region at token level."""
    n = len(ids)
    preferred = int(((run.manifest.get("parameters") or {}).get("stat_config") or {}).get("block_size") or 64)
    sizes = inspector.block_sizes(n, preferred)
    c = st.columns([1, 3])
    block = c[0].selectbox("block size (tokens)", sizes, key="inspector_block",
                           help=f"{preferred} is the run's block size; smaller blocks show more detail")
    nb = -(-n // block)
    z = _block_pattern(identity, ids, layer, head, block)
    c[1].caption(f"{n} tokens are too many to draw token by token ({n * n:,} cells; the limit is "
                 f"{inspector.MAX_CELLS:,}): pooled to {nb} × {nb} blocks of {block} tokens. Each cell is the mean "
                 "over the block's queries of their attention on the block's keys, so each row sums to 1.")
    plot(inspector.block_figure(z, block, n, f"L{layer}.H{head} on {n} tokens, pooled to blocks of {block}"), "inspector_block_map")

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
    zz = _token_pattern(identity, ids, layer, head, q_range, k_range)
    plot(inspector.token_figure(zz, labels[q_range[0]:q_range[1]], labels[k_range[0]:k_range[1]],
                                f"queries {q_range[0]}–{q_range[1] - 1} × keys {k_range[0]}–{k_range[1] - 1}"),
         "inspector_zoom_map")
    note = (f" (clipped to {q_range[1] - q_range[0]} × {k_range[1] - k_range[0]} tokens to stay within "
            f"{inspector.MAX_CELLS:,} cells)") if clipped else ""
    st.caption(f"tokens {q_range[0]}–{q_range[1] - 1} (queries) × {k_range[0]}–{k_range[1] - 1} (keys){note}")


def head_summary(run, path: str, layer: int, head: int) -> None:
    """The head's stored statistics, detection scores with their evidence, family and policy."""
    left, right = st.columns(2)
    with left:
        if run.has(HEAD_STATS):
            try:
                values = _head_values(path, int(layer), int(head), data.file_key(Path(path) / HEAD_STATS))
                st.markdown("**statistics** (over the run's samples)")
                st.dataframe(values, hide_index=True, width="stretch", key="inspector_stats")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
        else:
            missing(path, HEAD_STATS, "The head's statistics", run.model.get("name"))
        if run.has(POLICY):
            try:
                pol = _stored_policy(path, data.file_key(Path(path) / POLICY))
                e = next((h for h in pol["heads"] if h["layer"] == layer and h["head"] == head), None)
                if e is not None:
                    st.markdown(f"**stored policy**: `{e['kind']}` — {e.get('reason', '')}")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
    with right:
        if run.has(DETECTIONS):
            try:
                det = data.head_detections(path, layer, head)
                st.markdown("**detection scores and evidence**")
                if det.empty:
                    st.caption("no detection of this head in the run")
                else:
                    st.dataframe(det, hide_index=True, width="stretch", key="inspector_detections")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
        else:
            missing(path, DETECTIONS, "Detection scores", run.model.get("name"))
        if run.has(data.FAMILIES):
            try:
                family, others = data.head_family(path, layer, head)
                if family is None:
                    st.caption("this head has no family in families.parquet")
                else:
                    names = ", ".join(f"L{r.layer}.H{r.head}" for r in others.head(12).itertuples())
                    more = f" and {len(others) - 12} more" if len(others) > 12 else ""
                    st.markdown(f"**family**: {family}")
                    st.caption(f"{len(others)} other head(s) in it: {names}{more}" if len(others) else "the only head in it")
            except Exception as exc:  # noqa: BLE001
                show_problem(exc)
        else:
            missing(path, data.FAMILIES, "The head's family", run.model.get("name"))


def page_circuits(ctx: dict) -> None:
    st.header("Circuits")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    model_name = run.model.get("name") or "MODEL"
    if not run.has(data.CIRCUIT):
        st.info(f"This run has no `{data.CIRCUIT}`. Discover a head-level circuit for a task (ioi, induction, "
                f"greater_than or a .jsonl file) with:\n\n`{data.command_for(data.CIRCUIT, path, model_name)}`")
        return
    try:
        circuit = _circuit(path, data.file_key(Path(path) / data.CIRCUIT))
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)
        return
    from attnlab.circuits.circuit import circuit_figure

    n_layers, n_heads, _ = shape_of(run)
    task = circuit.task or {}
    faith = circuit.faithfulness or {}
    c = st.columns(5)
    c[0].metric("task", str(task.get("name", "?")), help=task.get("description") or None)
    c[1].metric("heads", len(circuit.nodes), help=f"of {n_layers * n_heads}; threshold {circuit.threshold}")
    c[2].metric("edges", len(circuit.edges))
    c[3].metric("circuit faithfulness", _fmt(faith.get("circuit_f")),
                help="share of the clean−ablated metric the circuit alone keeps (1 = all)")
    c[4].metric("completeness", _fmt(faith.get("completeness")),
                help="faithfulness of every head but the circuit's (0 = the circuit is all there is)")
    st.caption(f"{circuit.method} patching ({circuit.direction}) on {task.get('n_examples', '?')} examples; logit "
               f"difference clean {circuit.clean_metric:.3f}, corrupted {circuit.corrupted_metric:.3f}")
    left, right = st.columns(2)
    with left:
        if circuit.nodes:
            fig = circuit_figure(circuit, n_layers=n_layers or None, n_heads=n_heads or None)
            fig.update_layout(template="plotly_white", height=max(360, 26 * n_layers + 160),
                              yaxis={"title": "layer", "range": [-0.7, n_layers + 0.7]},
                              xaxis={"title": "head", "range": [-0.7, max(n_heads, 1) - 0.3]})
            fig.data[-1].hovertemplate = "%{text}<extra></extra>"
            plot(fig, "circuit_graph")
            st.caption("heads at (head, layer), the logits on top; a line's width is its edge's effect (hover for it)")
        else:
            st.info(f"the circuit has no heads at threshold {circuit.threshold}: discover it again with a lower "
                    f"`--threshold` (`{data.command_for(data.CIRCUIT, path, model_name)} --threshold 0.2`)")
    with right:
        if faith.get("sizes"):
            plot(data.faithfulness_figure(faith, len(circuit.nodes)), "circuit_faithfulness")
            st.caption(f"smallest top-k reaching f ≥ {faith.get('level')}: {faith.get('smallest_at_level')}; "
                       f"CPR {_fmt(faith.get('cpr'))}, CMD {_fmt(faith.get('cmd'))}")
        else:
            st.info("this circuit was discovered without its faithfulness curve (`--no-faithfulness`); run "
                    f"`{data.command_for(data.CIRCUIT, path, model_name)}` without it to measure the curve")
    nodes = data.circuit_nodes(circuit, path)
    st.markdown("**heads** (effect = the head's patching score)")
    st.dataframe(nodes, hide_index=True, width="stretch", key="circuit_nodes")
    if circuit.edges:
        st.markdown("**edges**")
        st.dataframe(data.circuit_edges(circuit), hide_index=True, width="stretch", key="circuit_edges")
    if circuit.nodes:
        c = st.columns([2, 1])
        pick = c[0].selectbox("inspect a circuit head", list(nodes["name"]), key="circuit_pick")
        r = nodes[nodes["name"] == pick].iloc[0]
        c[1].button("open in the head inspector", key="circuit_inspect", on_click=inspect_head,
                    args=(int(r["layer"]), int(r["head"])))


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
        budget = st.slider("budget", 0.05, 1.0, step=0.05, key="policy_budget", **default("policy_budget", 0.5),
                           help="share of dense causal attention (density) or of the KV cache (kv) the policy may use")
        budget_kind = st.radio("budget of", ("density", "kv"), key="policy_budget_kind", horizontal=True)
        gqa = st.checkbox("heads sharing a KV head share a policy", key="policy_gqa")
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


def validation_pareto(ctx: dict) -> None:
    """Every validated policy of this model in the runs folder: density against a chosen cost."""
    try:
        overview = data.validation_overview(ctx["entries"], ctx["entry"].run.model)
    except Exception as exc:  # noqa: BLE001
        show_problem(exc)
        return
    if overview.empty:
        return
    st.subheader("Validated policies in this runs folder")
    measures = [m for m in data.PARETO_MEASURES if overview[m].notna().any()]
    measure = st.selectbox("against density", measures, key="pareto_measure",
                           format_func=lambda m: data.PARETO_MEASURES[m][0])
    plot(data.pareto_figure(overview, measure), "validation_pareto")
    st.dataframe(overview.sort_values("density"), hide_index=True, width="stretch")
    st.caption("One point per run holding `validation.json` (`attnlab validate POLICY --out RUN`); red points are "
               "on the Pareto front. Validate baselines the same way (`attnlab import` or `attnlab policy compare`) "
               "to see them here.")


def page_validation(ctx: dict) -> None:
    st.header("Validation")
    run, path = ctx["entry"].run, str(ctx["entry"].path)
    validation_pareto(ctx)
    if not run.has(data.VALIDATION_HEADS) and not run.has(data.VALIDATION_SUMMARY):
        missing(path, data.VALIDATION_HEADS, "Validation")
        return
    st.subheader(f"Run {ctx['entry'].name}")
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
    "Head inspector": page_inspector,
    "Policy studio": page_policy,
    "Validation": page_validation,
    "Retrieval": page_retrieval,
    "Head families": page_families,
    "Circuits": page_circuits,
}


def runs_root() -> Path:
    # Streamlit passes the arguments after `--` as sys.argv[1:]; elsewhere (tests) argv is not ours.
    try:
        ours = Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    except (OSError, NameError):
        ours = False
    argv = sys.argv[1:] if ours else []
    return data.runs_dir_from(argv, os.environ)


def main() -> None:
    st.set_page_config(page_title="attnlab", layout="wide")
    for k in KEEP_WIDGETS:
        if k in st.session_state:
            st.session_state[k] = st.session_state[k]
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
    # A page just opened (or its run changed) takes the selections other pages made.
    entered = st.session_state.get("_shown") != (page, entry.name if entry else None)
    st.session_state["_shown"] = (page, entry.name if entry else None)
    if page != "Runs" and (entry is None or entry.run is None):
        st.header(page)
        if entry is None:
            st.info(data.no_runs_message(root))
        else:
            st.error(f"run {entry.name} cannot be read: {entry.problem}")
        return
    try:
        PAGE_FUNCS[page](dict(root=root, entries=entries, entry=entry, entered=entered))
    except Exception as exc:  # noqa: BLE001 - any surprise is a message, never a trace
        show_problem(exc)


main()
