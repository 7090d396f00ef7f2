"""What the dashboard reads: run directories, their tables, and the figures drawn from them.

Everything here is plain Python (no Streamlit), so it can be tested on its own and cached by
the dashboard. Readers only read what the CLI stored; the one thing computed here is a policy
at the budget the user picks, from the run's stored statistics (``PolicyGenerator``), which is
what the policy studio is for. Every reader raises `attnlab.errors.AttnlabError` (a `RunError`)
with a message that says which command creates or repairs the missing piece.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab.errors import AttnlabError, RunError
from attnlab.runs import BLOCK_MAPS, DETECTIONS, HEAD_STATS, MANIFEST, POLICY, Run, find_runs

RUNS_DIR_ENV = "ATTNLAB_RUNS_DIR"
FAMILIES = "families.parquet"
CAUSAL_CHECK = "causal_check.parquet"
CAUSAL_SUMMARY = "causal_check.json"
VALIDATION_HEADS = "validation_heads.parquet"
VALIDATION_SUMMARY = "validation.json"
CIRCUIT = "circuit.json"  # `attnlab.circuits.circuit.CIRCUIT_FILE`

#: Each file a later stage adds, and the command that adds it (``{run}`` is the run's path).
TABLE_COMMANDS: dict[str, str] = {
    HEAD_STATS: "attnlab profile --model MODEL --out {run} --force",
    BLOCK_MAPS: "attnlab profile --model MODEL --out {run} --force",
    DETECTIONS: "attnlab probe all --model MODEL --out {run}",
    CAUSAL_CHECK: "attnlab probe retrieval --model MODEL --out {run}",
    FAMILIES: "attnlab probe families --model MODEL --out {run}",
    POLICY: "attnlab policy {run} --budget 0.15",
    VALIDATION_HEADS: "attnlab validate {run}/policy.json --model MODEL --out {run}",
    VALIDATION_SUMMARY: "attnlab validate {run}/policy.json --model MODEL --out {run}",
    CIRCUIT: "attnlab circuit --task ioi --model MODEL --out {run}",
}

#: Columns each table must have for the dashboard to draw it.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    HEAD_STATS: ("layer", "head", "statistic", "value"),
    DETECTIONS: ("layer", "head", "head_type", "score"),
    FAMILIES: ("layer", "head", "pc1", "pc2", "family"),
    CAUSAL_CHECK: ("condition", "k", "accuracy"),
    VALIDATION_HEADS: ("layer", "head"),
}

_ERR_COLUMNS = "{path} lacks the column(s) {missing} (it has {have}): it was written by an older attnlab; re-create it with `{command}`"
_ERR_NO_RUNS = "no attnlab runs in {root}: create one with `attnlab profile --model smollm2-135m --out {root}/demo`"


def runs_dir_from(argv: list[str], environ: dict[str, str] | os._Environ) -> Path:
    """The runs folder: the first script argument (after ``--``), else ``$ATTNLAB_RUNS_DIR``, else ``runs``."""
    args = [a for a in argv if not a.startswith("-")]
    if args:
        return Path(args[0])
    return Path(environ.get(RUNS_DIR_ENV) or "runs")


def command_for(filename: str, run_path: str | Path, model: str | None = None) -> str:
    """The command that writes ``filename`` into the run; ``model`` (the manifest's) replaces ``MODEL``."""
    cmd = TABLE_COMMANDS.get(filename, "the stage that writes it").format(run=run_path)
    return cmd.replace("MODEL", model) if model else cmd


def file_key(path: str | Path) -> str:
    """A cache key that changes when the file does: ``path:mtime_ns:size`` (``path:absent`` if missing)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return f"{p}:absent"
    return f"{p}:{st.st_mtime_ns}:{st.st_size}"


def run_key(run_path: str | Path) -> str:
    """A cache key for a whole run: every file's `file_key`."""
    p = Path(run_path)
    try:
        files = sorted(f for f in p.iterdir() if f.is_file())
    except OSError:
        return f"{p}:absent"
    return "|".join(file_key(f) for f in files)


# -- runs ----------------------------------------------------------------------------------
@dataclass
class RunEntry:
    """One folder with a manifest under the runs folder: the opened `Run`, or why it cannot be."""

    path: Path
    run: Run | None
    problem: str | None

    @property
    def name(self) -> str:
        return self.path.name


def list_runs(root: str | Path) -> list[RunEntry]:
    """Every run folder under ``root``, opened; one that cannot be opened carries its reason."""
    out = []
    for p in find_runs(root):
        try:
            out.append(RunEntry(p, Run.open(p), None))
        except AttnlabError as exc:
            out.append(RunEntry(p, None, str(exc)))
    return out


def no_runs_message(root: str | Path) -> str:
    if not Path(root).is_dir():
        return f"the runs folder {root} does not exist: pass an existing folder (`attnlab dashboard RUNS_DIR`) or create a run with `attnlab profile --model smollm2-135m --out {root}/demo`"
    return _ERR_NO_RUNS.format(root=root)


def runs_overview(entries: list[RunEntry]) -> pd.DataFrame:
    """One row per run: model, shape, parameters, which tables it has, and any problem."""
    rows = []
    for e in entries:
        row: dict[str, Any] = {"run": e.name}
        if e.run is None:
            row.update({"model": None, "problem": e.problem})
        else:
            m, params = e.run.model, e.run.manifest.get("parameters", {}) or {}
            row.update(
                {
                    "model": m.get("name"),
                    "layers": m.get("n_layers"),
                    "heads": m.get("n_heads"),
                    "kv_heads": m.get("n_kv_heads"),
                    "kind": e.run.manifest.get("kind"),
                    "samples": len(params.get("lengths", []) or []),
                    "lengths": ", ".join(str(x) for x in sorted(set(params.get("lengths", []) or []))),
                    "path": params.get("path"),
                    "stages": ", ".join(sorted((e.run.manifest.get("stages") or {}).keys())),
                    "created": e.run.manifest.get("created"),
                    "tables": ", ".join(f for f in TABLE_COMMANDS if e.run.has(f)),
                    "problem": None,
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def missing_tables(run: Run) -> list[tuple[str, str]]:
    """``(file, command that creates it)`` for every table a later stage could add to ``run``."""
    out, seen = [], set()
    for name in TABLE_COMMANDS:
        if not run.has(name):
            out.append((name, command_for(name, run.path, run.model.get("name"))))
            seen.add(name)
    return out


# -- tables ----------------------------------------------------------------------------------
def check_columns(df: pd.DataFrame, filename: str, run_path: str | Path) -> pd.DataFrame:
    need = REQUIRED_COLUMNS.get(filename, ())
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise RunError(_ERR_COLUMNS.format(path=Path(run_path) / filename, missing=missing, have=list(df.columns),
                                           command=command_for(filename, run_path)))
    return df


def read_table(run_path: str | Path, filename: str) -> pd.DataFrame:
    """A run's Parquet table, its columns checked; `RunError` names the command that makes it."""
    run = Run.open(run_path)
    hint = f"create it with `{command_for(filename, run_path)}`"
    if run.has(filename):
        try:
            df = run.read_table(filename, hint)
        except RunError as exc:  # damaged: say which command writes it again
            raise RunError(f"{exc} with `{command_for(filename, run_path)}`") from exc
    else:
        df = run.read_table(filename, hint)
    return check_columns(df, filename, run_path)


def read_json(run_path: str | Path, filename: str) -> Any:
    run = Run.open(run_path)
    return run.read_json(filename, f"create it with `{command_for(filename, run_path)}`")


def head_means(run_path: str | Path) -> pd.DataFrame:
    """Mean of each statistic over samples: one row per (layer, head), one column per statistic
    (the same reduction as `attnlab.profile.head_means`, on the checked table)."""
    table = read_table(run_path, HEAD_STATS)
    if "kv_head" not in table.columns:
        table = table.assign(kv_head=-1)
    table = table.assign(statistic=table["statistic"].astype(str))
    wide = table.pivot_table(index=["layer", "head", "kv_head"], columns="statistic", values="value", aggfunc="mean")
    wide.columns.name = None
    return wide.reset_index()


def detection_means(run_path: str | Path) -> pd.DataFrame:
    """Detection scores per query head (mean over probes): one row per (layer, head), one column
    per head type. Per-KV-head rows (``head = -1``) are left out."""
    det = read_table(run_path, DETECTIONS)
    det = det[det["head"] >= 0].assign(head_type=det["head_type"].astype(str))
    wide = det.pivot_table(index=["layer", "head"], columns="head_type", values="score", aggfunc="mean")
    wide.columns.name = None
    return wide.reset_index()


def block_maps(run_path: str | Path) -> dict[str, Any]:
    """The run's block maps as numpy: ``mass_sum``, ``mass_max`` ``[layers, heads, q_blocks, k_blocks]``,
    ``count`` ``[q_blocks, k_blocks]``, ``block_size``."""
    run = Run.open(run_path)
    try:
        maps = run.block_maps()
    except AttnlabError:
        raise
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise RunError(f"{run.file(BLOCK_MAPS)} is not a readable block-map file ({type(exc).__name__}: {exc}); "
                       f"re-create it with `{command_for(BLOCK_MAPS, run_path)}`") from exc
    return {"block_size": maps.block_size, "mass_sum": maps.mass_sum.numpy(), "mass_max": maps.mass_max.numpy(),
            "count": maps.count.numpy()}


def head_values(run_path: str | Path, layer: int, head: int) -> pd.DataFrame:
    """Every statistic of one head over samples: ``statistic, mean, std, min, max, samples``."""
    table = read_table(run_path, HEAD_STATS)
    sel = table[(table["layer"] == layer) & (table["head"] == head)]
    sel = sel.assign(statistic=sel["statistic"].astype(str))
    out = sel.groupby("statistic", sort=False)["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "samples"})


# -- policies --------------------------------------------------------------------------------
def fit_policy(curves: Any, budget: float, budget_kind: str = "density", gqa: bool = False,
               protect: str = "dense") -> dict[str, Any]:
    """Fit `PolicyGenerator` on precomputed cost-recall curves; the emitted policy as a dict."""
    from attnlab.sparsity_stats import PolicyGenerator

    gen = PolicyGenerator(budget=budget, budget_kind=budget_kind, gqa_consistent=gqa, protect_retrieval=protect).fit(curves)
    return gen.emit().to_dict()


def policy_frame(policy: dict[str, Any]) -> pd.DataFrame:
    """One row per head of a policy dict (validated through `Policy.from_dict`)."""
    from attnlab.sparsity_stats import Policy

    return Policy.from_dict(policy).to_frame()


def stored_policy(run_path: str | Path) -> dict[str, Any]:
    """The run's ``policy.json``, validated, as a dict."""
    from attnlab.sparsity_stats import Policy

    raw = read_json(run_path, POLICY)
    return Policy.from_dict(raw, path=str(Path(run_path) / POLICY)).to_dict()


# -- figures ---------------------------------------------------------------------------------
def _head_labels(n_heads: int, n_kv_heads: int) -> list[str]:
    group = max(1, n_heads // max(1, n_kv_heads))
    return [f"H{h}·KV{h // group}" for h in range(n_heads)]


def _kv_separators(fig, n_heads: int, n_kv_heads: int, n_layers: int) -> None:
    """Vertical lines between the query-head groups that share a KV head (GQA)."""
    group = max(1, n_heads // max(1, n_kv_heads))
    if group <= 1:
        return
    for g in range(1, n_kv_heads):
        x = g * group - 0.5
        fig.add_shape(type="line", x0=x, x1=x, y0=-0.5, y1=n_layers - 0.5, line={"color": "white", "width": 3})


def grid(frame: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    """``[layers, heads]`` array of ``frame[column]`` (NaN where a head has no row)."""
    z = np.full((n_layers, n_heads), np.nan)
    ok = (frame["layer"] >= 0) & (frame["layer"] < n_layers) & (frame["head"] >= 0) & (frame["head"] < n_heads)
    sub = frame[ok]
    z[sub["layer"].to_numpy(int), sub["head"].to_numpy(int)] = pd.to_numeric(sub[column], errors="coerce").to_numpy(float)
    return z


def head_heatmap(z: np.ndarray, title: str, n_kv_heads: int, colorbar: str, *, highlight: tuple[int, int] | None = None):
    """Plotly layer × head heatmap; KV-head groups separated by white lines, one head outlined."""
    import plotly.graph_objects as go

    n_layers, n_heads = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis", colorbar={"title": colorbar},
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
               "ticktext": _head_labels(n_heads, n_kv_heads), "range": [-0.5, n_heads - 0.5], "showgrid": False,
               "zeroline": False},
        yaxis={"title": "layer", "range": [n_layers - 0.5, -0.5], "tickmode": "linear", "dtick": 1, "showgrid": False,
               "zeroline": False},
    )
    return fig


KIND_COLORS = {
    "dense": "#d62728", "streaming": "#1f77b4", "a_shape": "#17becf", "vertical_slash": "#ff7f0e",
    "block_topk": "#2ca02c", "gamma": "#9467bd",
}


def policy_heatmap(frame: pd.DataFrame, n_layers: int, n_heads: int, n_kv_heads: int, title: str):
    """Layer × head grid of policy kinds (a discrete colour per kind), hover: pattern, recall, density."""
    import plotly.graph_objects as go

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
               "ticktext": _head_labels(n_heads, n_kv_heads)},
        yaxis={"title": "layer", "autorange": "reversed", "tickmode": "linear", "dtick": 1},
    )
    return fig


def block_map_figure(mass: np.ndarray, count: np.ndarray, block_size: int, title: str):
    """One head's block map ``[q_blocks, k_blocks]``, unmeasured cells blank."""
    import plotly.graph_objects as go

    z = np.where(count > 0, mass, np.nan)
    fig = go.Figure(go.Heatmap(z=z, colorscale="Magma", reversescale=True, colorbar={"title": "mass"},
                               hovertemplate="query block %{y}, key block %{x}<br>mass %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=420,
                      xaxis={"title": f"key block ({block_size} tokens)"},
                      yaxis={"title": f"query block ({block_size} tokens)", "autorange": "reversed"})
    return fig


# -- one head ---------------------------------------------------------------------------------
def head_detections(run_path: str | Path, layer: int, head: int) -> pd.DataFrame:
    """Every detection of one query head (and of the KV head it reads, ``head = -1`` rows are
    per KV head): ``head_type, score, probe, evidence``, best score first."""
    det = read_table(run_path, DETECTIONS)
    sel = det[(det["layer"] == layer) & (det["head"] == head)]
    cols = [c for c in ("head_type", "score", "probe", "evidence") if c in sel.columns]
    out = sel[cols].assign(head_type=sel["head_type"].astype(str))
    return out.sort_values("score", ascending=False).reset_index(drop=True)


def head_family(run_path: str | Path, layer: int, head: int) -> tuple[str | None, pd.DataFrame]:
    """The head's family in ``families.parquet`` and the other heads of that family (``layer, head``)."""
    fam = read_table(run_path, FAMILIES)
    fam = fam.assign(family=fam["family"].astype(str))
    row = fam[(fam["layer"] == layer) & (fam["head"] == head)]
    if row.empty:
        return None, fam.iloc[0:0][["layer", "head"]]
    name = str(row["family"].iloc[0])
    members = fam[(fam["family"] == name) & ~((fam["layer"] == layer) & (fam["head"] == head))]
    return name, members[["layer", "head"]].reset_index(drop=True)


# -- circuits -----------------------------------------------------------------------------------
_ERR_CIRCUIT = "{path} is not a circuit attnlab can read ({why}); re-create it with `{command}`"


def read_circuit(run_path: str | Path):
    """The run's ``circuit.json`` as an `attnlab.circuits.circuit.Circuit`, checked against the
    run's model shape; `RunError` (naming `attnlab circuit`) when missing or damaged."""
    from attnlab.circuits.circuit import Circuit

    run = Run.open(run_path)
    command = command_for(CIRCUIT, run_path, run.model.get("name"))
    raw = run.read_json(CIRCUIT, f"discover one with `{command}`")
    path = run.file(CIRCUIT)
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        circuit = Circuit.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        why = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise RunError(_ERR_CIRCUIT.format(path=path, why=why, command=command)) from exc
    n_layers, n_heads = int(run.model.get("n_layers") or 0), int(run.model.get("n_heads") or 0)
    outside = [n for n in circuit.nodes if not (0 <= n[0] < n_layers and 0 <= n[1] < n_heads)]
    if n_layers and n_heads and outside:
        raise RunError(_ERR_CIRCUIT.format(path=path, command=command,
                                           why=f"heads {outside} are outside the run's {n_layers} layers × {n_heads} heads"))
    f = circuit.faithfulness
    if f is not None and (not isinstance(f, dict) or len(f.get("sizes", [])) != len(f.get("f", [])) or not f.get("sizes")):
        raise RunError(_ERR_CIRCUIT.format(path=path, command=command,
                                           why="its faithfulness curve has no sizes, or sizes and f of different lengths"))
    return circuit


def circuit_nodes(circuit, run_path: str | Path | None = None) -> pd.DataFrame:
    """One row per circuit head: ``layer, head, name, score`` (its effect), edges in and out, and
    the head's best detection and family when the run has them."""
    ins: dict[tuple[int, int], int] = {}
    outs: dict[tuple[int, int], int] = {}
    for s, r in circuit.edges:
        outs[s] = outs.get(s, 0) + 1
        if r != "logits":
            ins[r] = ins.get(r, 0) + 1
    frame = pd.DataFrame([
        {"layer": n[0], "head": n[1], "name": f"L{n[0]}.H{n[1]}", "score": circuit.node_scores.get(n, float("nan")),
         "edges_in": ins.get(n, 0), "edges_out": outs.get(n, 0),
         "to_logits": any(s == n and r == "logits" for s, r in circuit.edges)}
        for n in circuit.nodes
    ], columns=["layer", "head", "name", "score", "edges_in", "edges_out", "to_logits"])
    if run_path is not None and not frame.empty:
        run = Run.open(run_path)
        if run.has(DETECTIONS):
            try:
                det = detection_means(run_path).set_index(["layer", "head"])
                best = det.idxmax(axis=1)
                frame["best_detection"] = [best.get((r.layer, r.head)) for r in frame.itertuples()]
            except (AttnlabError, ValueError):
                pass
        if run.has(FAMILIES):
            try:
                fam = read_table(run_path, FAMILIES).set_index(["layer", "head"])["family"].astype(str)
                frame["family"] = [fam.get((r.layer, r.head)) for r in frame.itertuples()]
            except AttnlabError:
                pass
    return frame.sort_values("score", ascending=False).reset_index(drop=True)


def circuit_edges(circuit) -> pd.DataFrame:
    def name(n):
        return n if isinstance(n, str) else f"L{n[0]}.H{n[1]}"

    return pd.DataFrame([{"from": name(s), "to": name(r), "score": circuit.edge_scores.get((s, r), float("nan"))}
                         for s, r in circuit.edges], columns=["from", "to", "score"]).sort_values("score", ascending=False)


def faithfulness_figure(faith: dict, circuit_size: int):
    """Faithfulness ``f`` of the top-``k`` heads against ``k``, with the level, the smallest size
    reaching it, and the selected circuit (size, its own ``f``)."""
    import plotly.graph_objects as go

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


# -- two runs ------------------------------------------------------------------------------------
def shape_mismatch(run_a: Run, run_b: Run) -> str | None:
    """Why two runs cannot be compared head by head (another model shape), or None."""
    keys = ("n_layers", "n_heads", "n_kv_heads")
    a, b = ({k: r.model.get(k) for k in keys} for r in (run_a, run_b))
    if a == b:
        return None
    return (f"runs {run_a.name} and {run_b.name} have different model shapes ({run_a.model.get('name')} {a} vs "
            f"{run_b.model.get('name')} {b}): a head-by-head comparison needs two runs of the same model shape")


def compare_figure(z_a: np.ndarray, z_b: np.ndarray, names: tuple[str, str], metric: str, n_kv_heads: int):
    """Run A, run B and ``B − A`` of one per-head value, side by side (``[layers, heads]`` each)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_layers, n_heads = z_a.shape
    diff = z_b - z_a
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=(f"A: {names[0]}", f"B: {names[1]}", "B − A"))
    lo = float(np.nanmin([np.nanmin(z_a), np.nanmin(z_b)])) if np.isfinite(z_a).any() or np.isfinite(z_b).any() else 0.0
    hi = float(np.nanmax([np.nanmax(z_a), np.nanmax(z_b)])) if np.isfinite(z_a).any() or np.isfinite(z_b).any() else 1.0
    span = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    span = span or 1e-12
    hover = "layer %{y}, head %{x}<br>" + metric + " %{z:.4f}<extra></extra>"
    for col, (z, kw) in enumerate((
        (z_a, {"coloraxis": "coloraxis"}), (z_b, {"coloraxis": "coloraxis"}),
        (diff, {"coloraxis": "coloraxis2"}),
    ), start=1):
        fig.add_trace(go.Heatmap(z=z, x=list(range(n_heads)), y=list(range(n_layers)), hovertemplate=hover, **kw),
                      row=1, col=col)
    fig.update_layout(
        template="plotly_white", height=max(320, 22 * n_layers + 160), title=f"{metric} per head: A, B and B − A",
        coloraxis={"colorscale": "Viridis", "cmin": lo, "cmax": hi, "colorbar": {"title": metric, "x": 1.0, "len": 0.45, "y": 0.78}},
        coloraxis2={"colorscale": "RdBu", "reversescale": True, "cmin": -span, "cmax": span,
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


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def manifest_path(run_path: str | Path) -> Path:
    return Path(run_path) / MANIFEST


#: What the Validation page's Pareto plot can put against density (column, label, lower is better).
PARETO_MEASURES = {
    "rel_l2_mean": ("per-head output error, rel-L2 (mean)", True),
    "kl_mean": ("KL(dense‖sparse), nats/token", True),
    "ppl_delta": ("perplexity change", True),
    "needle_delta": ("needle accuracy change (sparse − dense)", False),
    "recall_mean": ("attention mass kept per head (mean)", False),
}


def validation_overview(entries: list[RunEntry], model: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per run holding ``validation.json`` (of ``model``'s shape when given): the policy,
    its achieved density and what it cost (`PARETO_MEASURES`). Unreadable summaries are skipped."""
    rows = []
    shape = None if model is None else (model.get("n_layers"), model.get("n_heads"))
    for e in entries:
        if e.run is None or not e.run.has(VALIDATION_SUMMARY):
            continue
        if shape is not None and (e.run.model.get("n_layers"), e.run.model.get("n_heads")) != shape:
            continue
        try:
            s = read_json(e.path, VALIDATION_SUMMARY)
            density = float(s["density_mean"])
        except Exception:  # noqa: BLE001 - a damaged summary is reported on its own run's page
            continue
        nd, ns = s.get("needle_dense"), s.get("needle_sparse")
        rows.append({
            "run": e.name, "policy": s.get("policy", ""), "executor": s.get("executor", ""),
            "prompt_tokens": s.get("prompt_tokens"), "density": density,
            "rel_l2_mean": s.get("rel_l2_mean"), "kl_mean": s.get("kl_mean"), "ppl_delta": s.get("ppl_delta"),
            "needle_delta": None if nd is None or ns is None else float(ns) - float(nd),
            "recall_mean": s.get("recall_mean"),
        })
    columns = ["run", "policy", "executor", "prompt_tokens", "density", *PARETO_MEASURES]
    return pd.DataFrame(rows, columns=columns)


def pareto_front(x: np.ndarray, y: np.ndarray, *, lower_is_better: bool = True) -> np.ndarray:
    """Mask of the points no other point beats: lower density and a better ``y`` (lower when
    ``lower_is_better``), at least as good in both and strictly better in one."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float) if lower_is_better else -np.asarray(y, dtype=float)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        beaten = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not beaten.any()
    return keep


def pareto_figure(frame: pd.DataFrame, measure: str):
    """Density against one measure for every validated policy, the Pareto front joined by a line."""
    import plotly.graph_objects as go

    label, lower = PARETO_MEASURES[measure]
    df = frame.dropna(subset=[measure]).sort_values("density")
    front = pareto_front(df["density"].to_numpy(), df[measure].to_numpy(), lower_is_better=lower)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=df["density"], y=df[measure], mode="markers", name="validated policy",
                             marker={"size": 11, "color": ["#d62728" if f else "#7f7f7f" for f in front]},
                             text=[f"{r.run}: {r.policy} ({r.executor}, {r.prompt_tokens} tokens)" for r in df.itertuples()],
                             hovertemplate="%{text}<br>density %{x:.3f}<br>" + label + " %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=df["density"][front], y=df[measure][front], mode="lines", name="Pareto front",
                             line={"color": "#d62728", "dash": "dot"}))
    fig.update_layout(title=f"{label} against achieved density ({len(df)} validated policies)",
                      xaxis_title="achieved density (share of dense causal attention)", yaxis_title=label)
    return fig
