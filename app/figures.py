"""Every figure the dashboard draws: plotly figures from arrays and tables, no Streamlit.

Colour: every attention or mass heatmap (the head inspector's token and block maps, a run's
block maps) and every per-head value grid (the head atlas, the validation errors) uses ONE
colour scale, `ATTENTION_SCALE` (plotly's "Viridis"). It is perceptually uniform and its
lightness rises monotonically from the lowest value (dark purple) to the highest (yellow), so
a stronger cell always reads lighter, and blank cells (future keys, unmeasured blocks: NaN)
stay white, unlike any value. Attention maps start the scale at 0 (`ATTENTION_RANGE`), so that
a weak head does not look strong. Two scales only are not this one: the signed ``B − A``
difference of two runs (a diverging red-blue scale centred on 0) and the policy-kind grid (one
categorical colour per kind).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnlab.app.inspector import check_cells

#: The one colour scale of attention maps and per-head value grids (see the module docstring).
ATTENTION_SCALE = "Viridis"
#: The diverging scale of a signed difference (``B − A``), centred on 0.
DIFFERENCE_SCALE = "RdBu"
#: An attention probability or block mass: the scale starts at 0.
ATTENTION_RANGE = {"zmin": 0.0}

#: The colour of each policy kind on the policy grid (categorical, not a scale).
KIND_COLORS = {
    "dense": "#d62728", "streaming": "#1f77b4", "a_shape": "#17becf", "vertical_slash": "#ff7f0e",
    "block_topk": "#2ca02c", "gamma": "#9467bd",
}


# -- per-head grids ------------------------------------------------------------------------------
def _head_ticks(n_heads: int, n_kv_heads: int) -> list[str]:
    group = max(1, n_heads // max(1, n_kv_heads))
    return [f"H{h}·KV{h // group}" for h in range(n_heads)]


def _kv_separators(fig: go.Figure, n_heads: int, n_kv_heads: int, n_layers: int) -> None:
    """Vertical lines between the query-head groups that share a KV head (GQA)."""
    group = max(1, n_heads // max(1, n_kv_heads))
    if group <= 1:
        return
    for g in range(1, n_kv_heads):
        x = g * group - 0.5
        fig.add_shape(type="line", x0=x, x1=x, y0=-0.5, y1=n_layers - 0.5, line={"color": "white", "width": 3})


def head_heatmap(z: np.ndarray, title: str, n_kv_heads: int, colorbar: str, *, highlight: tuple[int, int] | None = None) -> go.Figure:
    """Layer × head heatmap of one value per head; KV-head groups separated by white lines, one head outlined."""
    n_layers, n_heads = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale=ATTENTION_SCALE, colorbar={"title": colorbar},
            hoverinfo="skip",  # the markers below carry the hover, so that a click selects them
        )
    )
    # Heatmaps are not selectable in plotly: one invisible marker per cell makes a click pick a head.
    layers, heads = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    fig.add_trace(go.Scatter(
        x=heads.ravel(), y=layers.ravel(), mode="markers", customdata=z.ravel(), showlegend=False, name="heads",
        marker={"size": max(8, min(40, 600 // max(n_layers, n_heads))), "opacity": 0, "symbol": "square"},
        hovertemplate="layer %{y}, head %{x}<br>" + colorbar + " %{customdata:.4f}<extra></extra>",
    ))
    _kv_separators(fig, n_heads, n_kv_heads, n_layers)
    if highlight is not None:
        la, h = highlight
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=la - 0.5, y1=la + 0.5, line={"color": "red", "width": 3})
    fig.update_layout(
        title=title, template="plotly_white", height=max(320, 22 * n_layers + 140),
        xaxis={"title": "query head (· KV head it reads)", "tickmode": "array", "tickvals": list(range(n_heads)),
               "ticktext": _head_ticks(n_heads, n_kv_heads), "range": [-0.5, n_heads - 0.5], "showgrid": False,
               "zeroline": False},
        yaxis={"title": "layer", "range": [n_layers - 0.5, -0.5], "tickmode": "linear", "dtick": 1, "showgrid": False,
               "zeroline": False},
    )
    return fig


def compare_figure(z_a: np.ndarray, z_b: np.ndarray, names: tuple[str, str], metric: str, n_kv_heads: int) -> go.Figure:
    """Run A, run B and ``B − A`` of one per-head value, side by side (``[layers, heads]`` each)."""
    n_layers, n_heads = z_a.shape
    diff = z_b - z_a
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(f"A: {names[0]}", f"B: {names[1]}", "B − A"))
    finite = np.isfinite(z_a).any() or np.isfinite(z_b).any()
    lo = float(np.nanmin([np.nanmin(z_a), np.nanmin(z_b)])) if finite else 0.0
    hi = float(np.nanmax([np.nanmax(z_a), np.nanmax(z_b)])) if finite else 1.0
    span = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    span = span or 1e-12
    hover = "layer %{y}, head %{x}<br>" + metric + " %{z:.4f}<extra></extra>"
    for col, (z, axis) in enumerate(((z_a, "coloraxis"), (z_b, "coloraxis"), (diff, "coloraxis2")), start=1):
        fig.add_trace(go.Heatmap(z=z, x=list(range(n_heads)), y=list(range(n_layers)), hovertemplate=hover, coloraxis=axis),
                      row=1, col=col)
    fig.update_layout(
        template="plotly_white", height=max(320, 22 * n_layers + 160), title=f"{metric} per head: A, B and B − A",
        coloraxis={"colorscale": ATTENTION_SCALE, "cmin": lo, "cmax": hi,
                   "colorbar": {"title": metric, "x": 1.0, "len": 0.45, "y": 0.78}},
        coloraxis2={"colorscale": DIFFERENCE_SCALE, "reversescale": True, "cmin": -span, "cmax": span,
                    "colorbar": {"title": "B − A", "x": 1.0, "len": 0.45, "y": 0.22}},
    )
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    group = max(1, n_heads // max(1, n_kv_heads))
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="query head", row=1, col=col)
        if group > 1:
            for g in range(1, n_kv_heads):
                fig.add_vline(x=g * group - 0.5, line={"color": "white", "width": 2}, row=1, col=col)
    return fig


def policy_heatmap(frame: pd.DataFrame, n_layers: int, n_heads: int, n_kv_heads: int, title: str) -> go.Figure:
    """Layer × head grid of policy kinds (a categorical colour per kind), hover: pattern, recall, density."""
    kinds = sorted(frame["kind"].unique(), key=lambda k: list(KIND_COLORS).index(k) if k in KIND_COLORS else 99)
    code = {k: i for i, k in enumerate(kinds)}
    z = np.full((n_layers, n_heads), np.nan)
    text = np.full((n_layers, n_heads), "", dtype=object)
    hover = np.full((n_layers, n_heads), "", dtype=object)
    for r in frame.itertuples():
        z[r.layer, r.head] = code[r.kind]
        text[r.layer, r.head] = r.kind
        hover[r.layer, r.head] = f"{r.policy}<br>recall {r.expected_recall:.3f}, density {r.expected_density:.3f}"
    n = max(1, len(kinds))
    colorscale = []
    palette = list(KIND_COLORS.values())
    for i, k in enumerate(kinds):
        c = KIND_COLORS.get(k, palette[i % len(palette)])
        colorscale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=-0.5, zmax=n - 0.5, colorscale=colorscale,
            text=text, texttemplate="%{text}" if n_layers * n_heads <= 64 else None, customdata=hover,
            hovertemplate="layer %{y}, head %{x}: %{text}<br>%{customdata}<extra></extra>",
            colorbar={"title": "kind", "tickmode": "array", "tickvals": list(range(n)), "ticktext": kinds},
        )
    )
    _kv_separators(fig, n_heads, n_kv_heads, n_layers)
    fig.update_layout(
        title=title, template="plotly_white", height=max(320, 22 * n_layers + 140),
        xaxis={"title": "query head (· KV head it reads)", "tickmode": "array", "tickvals": list(range(n_heads)),
               "ticktext": _head_ticks(n_heads, n_kv_heads)},
        yaxis={"title": "layer", "autorange": "reversed", "tickmode": "linear", "dtick": 1},
    )
    return fig


# -- attention maps ------------------------------------------------------------------------------
def block_map_figure(mass: np.ndarray, count: np.ndarray, block_size: int, title: str) -> go.Figure:
    """One head's stored block map ``[q_blocks, k_blocks]``, unmeasured cells blank."""
    z = np.where(count > 0, mass, np.nan)
    fig = go.Figure(go.Heatmap(z=z, colorscale=ATTENTION_SCALE, colorbar={"title": "mass"}, **ATTENTION_RANGE,
                               hovertemplate="query block %{y}, key block %{x}<br>mass %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=420,
                      xaxis={"title": f"key block ({block_size} tokens)"},
                      yaxis={"title": f"query block ({block_size} tokens)", "autorange": "reversed"})
    return fig


def token_figure(z: np.ndarray, q_labels: list[str], k_labels: list[str], title: str) -> go.Figure:
    """Token × token attention map; the axes are the tokens (position and text). Refuses a map
    over the inspector's cell limit (`attnlab.app.inspector.check_cells`)."""
    check_cells(*z.shape)
    fig = go.Figure(go.Heatmap(z=z, x=k_labels, y=q_labels, colorscale=ATTENTION_SCALE, colorbar={"title": "attention"},
                               **ATTENTION_RANGE,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=min(900, max(420, 12 * len(q_labels) + 160)),
                      xaxis={"title": "key token", "type": "category", "tickangle": -60},
                      yaxis={"title": "query token", "type": "category", "autorange": "reversed"})
    return fig


def block_figure(z: np.ndarray, block: int, n: int, title: str) -> go.Figure:
    """A prompt's attention pooled to blocks ``[q_blocks, k_blocks]``; hover names each block's token range."""
    check_cells(*z.shape)
    starts = np.arange(z.shape[0]) * block
    fig = go.Figure(go.Heatmap(z=z, x=starts, y=starts, colorscale=ATTENTION_SCALE, colorbar={"title": "mass"},
                               **ATTENTION_RANGE,
                               hovertemplate="queries from token %{y}, keys from token %{x}<br>block mass %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=520,
                      xaxis={"title": f"key block (first token; {block} tokens per block, {n} tokens)"},
                      yaxis={"title": f"query block (first token; {block} tokens per block)", "autorange": "reversed"})
    return fig


def figure_cells(spec: dict) -> int:
    """Heatmap cells a plotly figure (as JSON) carries: what the inspector's cell limit is about."""
    total = 0
    for trace in spec.get("data", []):
        if trace.get("type") == "heatmap":
            z = trace.get("z")
            if isinstance(z, dict) and "shape" in z:
                total += int(np.prod([int(s) for s in str(z["shape"]).split(",")]))
            elif isinstance(z, dict) and "bdata" in z:
                total += len(z["bdata"]) * 3 // 4 // np.dtype(z["dtype"]).itemsize
            elif z is not None:
                total += int(np.asarray(z, dtype=object).size)
    return total


# -- retrieval, families, validation, circuits ---------------------------------------------------
def leaderboard_figure(best: pd.DataFrame, head_type: str) -> go.Figure:
    """Bar chart of the top heads of one type (``label, score``, hover layer/head/kv_head)."""
    import plotly.express as px

    fig = px.bar(best, x="label", y="score", hover_data=["layer", "head", "kv_head"], template="plotly_white",
                 title=f"top {len(best)} {head_type} heads (score, mean over probes)")
    fig.update_layout(xaxis_title="head", yaxis_title=f"{head_type} score")
    return fig


def causal_figure(agg: pd.DataFrame) -> go.Figure:
    """Needle accuracy against the number of heads ablated, one line per condition (``condition, k, accuracy, std``)."""
    import plotly.express as px

    fig = px.line(agg, x="k", y="accuracy", color="condition", error_y="std", markers=True, template="plotly_white",
                  title="needle accuracy: dense, top-K retrieval heads ablated, K random heads ablated")
    fig.update_layout(xaxis_title="K heads ablated", yaxis_title="needle accuracy")
    return fig


def families_figure(fam: pd.DataFrame) -> go.Figure:
    """Heads on their first two principal components, coloured by family (``pc1, pc2, family, label``)."""
    import plotly.express as px

    hover = [c for c in ("layer", "head", "kv_head") if c in fam.columns]
    return px.scatter(fam, x="pc1", y="pc2", color="family", hover_name="label", hover_data=hover, template="plotly_white",
                      title="heads on the first two principal components of their features, coloured by family")


def pareto_figure(frame: pd.DataFrame, measure: str, label: str, front: np.ndarray, *, x: str = "density",
                  x_title: str = "achieved density (share of dense causal attention)",
                  x_name: str = "achieved density") -> go.Figure:
    """``x`` (achieved density by default; the KV share held for decode) against one measure for
    every validated policy (``frame`` sorted by ``x``), the Pareto front (``front``, a mask over
    ``frame``'s rows) joined by a line."""
    fig = go.Figure()
    how = "executor" if "executor" in frame.columns else "phase"
    fig.add_trace(go.Scatter(x=frame[x], y=frame[measure], mode="markers", name="validated policy",
                             marker={"size": 11, "color": ["#d62728" if f else "#7f7f7f" for f in front]},
                             text=[f"{r.run}: {r.policy} ({getattr(r, how)}, {r.prompt_tokens} tokens)" for r in frame.itertuples()],
                             hovertemplate="%{text}<br>" + x + " %{x:.3f}<br>" + label + " %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=frame[x][front], y=frame[measure][front], mode="lines", name="Pareto front",
                             line={"color": "#d62728", "dash": "dot"}))
    fig.update_layout(title=f"{label} against {x_name} ({len(frame)} validated policies)",
                      xaxis_title=x_title, yaxis_title=label)
    return fig


def task_score_figure(frame: pd.DataFrame, front: np.ndarray, task: str, length: int) -> go.Figure:
    """Score against achieved density, one point per method with its 95% interval, the Pareto
    front (``front``, a mask over ``frame``'s rows) joined by a line."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=frame["density"], y=frame["score"], mode="markers+text", name="method", text=frame["method"],
        textposition="top center",
        error_y={"type": "data", "symmetric": False, "array": frame["ci_high"] - frame["score"],
                 "arrayminus": frame["score"] - frame["ci_low"]},
        marker={"size": 11, "color": ["#d62728" if f else "#7f7f7f" for f in front]},
        hovertemplate="%{text}<br>density %{x:.3f}<br>score %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=frame["density"][front], y=frame["score"][front], mode="lines", name="Pareto front",
                             line={"color": "#d62728", "dash": "dot"}))
    fig.update_layout(title=f"{task} at {length} tokens: score against achieved density",
                      xaxis_title="achieved prefill density", yaxis_title="score (string match)",
                      yaxis_range=[-0.05, 1.05])
    return fig


def faithfulness_figure(faith: dict[str, Any], circuit_size: int) -> go.Figure:
    """Faithfulness ``f`` of the top-``k`` heads against ``k``, with the level, the smallest size
    reaching it, and the selected circuit (size, its own ``f``)."""
    sizes, f = [int(k) for k in faith["sizes"]], [float(v) for v in faith["f"]]
    fig = go.Figure(go.Scatter(x=sizes, y=f, mode="lines+markers", name="top-k heads by score",
                               hovertemplate="%{x} heads kept: f = %{y:.3f}<extra></extra>"))
    level = faith.get("level")
    if level is not None:
        fig.add_hline(y=float(level), line={"dash": "dash", "color": "grey"}, annotation_text=f"level {level}")
    if faith.get("smallest_at_level") is not None:
        k = int(faith["smallest_at_level"])
        fig.add_vline(x=k, line={"dash": "dot", "color": "green"}, annotation_text=f"smallest reaching: {k}")
    if faith.get("circuit_f") is not None:
        fig.add_trace(go.Scatter(x=[circuit_size], y=[float(faith["circuit_f"])], mode="markers", name="the circuit",
                                 marker={"symbol": "star", "size": 16, "color": "black"}))
    fig.update_layout(title="faithfulness of the top-k heads", template="plotly_white",
                      xaxis_title="heads kept (the others mean-ablated)", yaxis_title="share of the task metric kept (f)",
                      height=420, legend={"orientation": "h", "y": -0.25})
    return fig


def circuit_graph(circuit: Any, n_layers: int, n_heads: int) -> go.Figure:
    """The circuit's graph (`attnlab.circuits.circuit.circuit_figure`) laid out for the page."""
    from attnlab.circuits.circuit import circuit_figure

    fig = circuit_figure(circuit, n_layers=n_layers or None, n_heads=n_heads or None)
    fig.update_layout(template="plotly_white", height=max(360, 26 * n_layers + 160),
                      yaxis={"title": "layer", "range": [-0.7, n_layers + 0.7]},
                      xaxis={"title": "head", "range": [-0.7, max(n_heads, 1) - 0.3]})
    fig.data[-1].hovertemplate = "%{text}<extra></extra>"
    return fig


def star(fig: go.Figure, x: float, y: float, name: str) -> go.Figure:
    """Mark one point (the policy at the slider's budget) on a trade-off figure."""
    fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=name, marker={"symbol": "star", "size": 18, "color": "black"}))
    return fig

