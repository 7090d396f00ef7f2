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


def command_for(filename: str, run_path: str | Path) -> str:
    return TABLE_COMMANDS.get(filename, "the stage that writes it").format(run=run_path)


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
            out.append((name, command_for(name, run.path)))
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


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def manifest_path(run_path: str | Path) -> Path:
    return Path(run_path) / MANIFEST
