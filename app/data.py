"""What the dashboard reads: the runs folder, each run's artifacts, and their cached forms.

Runs are read only through the run store (`attnlab.runs`): artifacts are named by their
`Artifact` (``HEAD_STATS``, ``FAMILIES``, ...), their columns are checked by ``run.read`` from
``Artifact.columns``, and the command that makes a missing one is ``Artifact.command``. Every
reader raises `attnlab.errors.AttnlabError` (a `RunError`) with a message that says which command
creates or repairs the missing piece; pages show it as one line.

The plain readers take a `Run` or a run path (`Run.coerce`) and work without Streamlit; the
``cached_*`` functions below them are the same readers behind `st.cache_data`, keyed by the
files' modification times (`file_key`), so a CLI stage that rewrites a file is seen at once.
The one computation here is the policy studio's: a policy fitted from the run's stored
statistics at the budget the user picks (`fit_policy`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from safetensors import SafetensorError

from attnlab.errors import AttnlabError, RunError
from attnlab.names import head_label
from attnlab.profile import head_means as profile_head_means
from attnlab.runs import (
    BLOCK_MAPS,
    CAUSAL_CHECK,
    CIRCUIT,
    DECODE_SUMMARY,
    DETECTIONS,
    FAMILIES,
    HEAD_STATS,
    POLICY,
    VALIDATION_HEADS,
    VALIDATION_SUMMARY,
    Artifact,
    Run,
    artifact,
    find_runs,
)

RUNS_DIR_ENV = "ATTNLAB_RUNS_DIR"
#: The artifacts the dashboard reads, in the order a run gains them (the Runs page lists the missing ones).
DASHBOARD_ARTIFACTS: tuple[Artifact, ...] = (
    HEAD_STATS, BLOCK_MAPS, DETECTIONS, CAUSAL_CHECK, FAMILIES, POLICY, VALIDATION_HEADS, VALIDATION_SUMMARY, CIRCUIT,
)

_ERR_NO_RUNS = "no attnlab runs in {root}: create one with `attnlab profile --model smollm2-135m --out {root}/demo`"
_ERR_NO_ROOT = ("the runs folder {root} does not exist: pass an existing folder (`attnlab dashboard RUNS_DIR`) or "
                "create a run with `attnlab profile --model smollm2-135m --out {root}/demo`")
_ERR_BLOCK_MAPS = "{path} is not a readable block-map file ({why}); re-create it with `{command}`"
_ERR_CIRCUIT = "{path} is not a circuit attnlab can read ({why}); re-create it with `{command}`"


def runs_dir_from(argv: list[str], environ: dict[str, str] | os._Environ) -> Path:
    """The runs folder: the first script argument (after ``--``), else ``$ATTNLAB_RUNS_DIR``, else ``runs``."""
    args = [a for a in argv if not a.startswith("-")]
    if args:
        return Path(args[0])
    return Path(environ.get(RUNS_DIR_ENV) or "runs")


def file_key(path: str | Path) -> str:
    """A cache key that changes when the file does: ``path:mtime_ns:size`` (``path:absent`` if missing)."""
    p = Path(path)
    try:
        s = p.stat()
    except OSError:
        return f"{p}:absent"
    return f"{p}:{s.st_mtime_ns}:{s.st_size}"


def artifacts_key(run_path: str | Path, arts: Iterable[Artifact]) -> str:
    """A cache key for what depends on several artifacts of one run."""
    return "|".join(file_key(Path(run_path) / a) for a in arts)


# -- the runs folder ---------------------------------------------------------------------------
@dataclass(frozen=True)
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
    return (_ERR_NO_ROOT if not Path(root).is_dir() else _ERR_NO_RUNS).format(root=root)


def runs_overview(entries: list[RunEntry]) -> pd.DataFrame:
    """One row per run: model, shape, parameters, which artifacts it has, and any problem."""
    rows = []
    for e in entries:
        row: dict[str, Any] = {"run": e.name}
        if e.run is None:
            row.update({"model": None, "problem": e.problem})
        else:
            m, params = e.run.model, e.run.manifest.get("parameters", {}) or {}
            row.update({
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
                "tables": ", ".join(a.filename for a in DASHBOARD_ARTIFACTS if e.run.has(a)),
                "problem": None,
            })
        rows.append(row)
    return pd.DataFrame(rows)


def missing_artifacts(run: Run) -> list[tuple[Artifact, str]]:
    """``(artifact, command that creates it)`` for every artifact the dashboard reads that ``run`` lacks."""
    return [(a, run.command_for(a)) for a in DASHBOARD_ARTIFACTS if not run.has(a)]


# -- one run's artifacts -----------------------------------------------------------------------
def read_artifact(run: Run | str | Path, art: Artifact | str) -> Any:
    """``run.read(art)``: a checked DataFrame or the JSON object; a damaged file's message ends
    with the command that writes it again (the run store names it)."""
    return Run.coerce(run).read(artifact(art))


def head_means(run: Run | str | Path) -> pd.DataFrame:
    """Mean of each statistic over samples, one row per (layer, head, kv_head): the reduction
    `attnlab.profile.head_means` makes for the CLI, on the run store's checked table."""
    return profile_head_means(Run.coerce(run))


def detection_means(run: Run | str | Path) -> pd.DataFrame:
    """Detection scores per query head (mean over probes): one row per (layer, head), one column
    per head type. Per-KV-head rows (``head = -1``) are left out."""
    det = read_artifact(run, DETECTIONS)
    det = det[det["head"] >= 0].assign(head_type=det["head_type"].astype(str))
    wide = det.pivot_table(index=["layer", "head"], columns="head_type", values="score", aggfunc="mean")
    wide.columns.name = None
    return wide.reset_index()


def block_maps(run: Run | str | Path) -> dict[str, Any]:
    """The run's block maps as numpy: ``mass_sum``, ``mass_max`` ``[layers, heads, q_blocks, k_blocks]``,
    ``count`` ``[q_blocks, k_blocks]``, ``block_size``."""
    run = Run.coerce(run)
    try:
        maps = run.block_maps()
    except (SafetensorError, OSError) as exc:  # safetensors' own error for a damaged file
        raise RunError(_ERR_BLOCK_MAPS.format(path=run.file(BLOCK_MAPS), why=f"{type(exc).__name__}: {exc}",
                                              command=run.command_for(BLOCK_MAPS))) from exc
    return {"block_size": maps.block_size, "mass_sum": maps.mass_sum.numpy(), "mass_max": maps.mass_max.numpy(),
            "count": maps.count.numpy()}


def head_values(run: Run | str | Path, layer: int, head: int) -> pd.DataFrame:
    """Every statistic of one head over samples: ``statistic, mean, std, min, max, samples``."""
    table = read_artifact(run, HEAD_STATS)
    sel = table[(table["layer"] == layer) & (table["head"] == head)]
    sel = sel.assign(statistic=sel["statistic"].astype(str))
    out = sel.groupby("statistic", sort=False)["value"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "samples"})


def head_detections(run: Run | str | Path, layer: int, head: int) -> pd.DataFrame:
    """Every detection of one query head: ``head_type, score, probe, evidence``, best score first."""
    det = read_artifact(run, DETECTIONS)
    sel = det[(det["layer"] == layer) & (det["head"] == head)]
    out = sel[["head_type", "score", "probe", "evidence"]].assign(head_type=sel["head_type"].astype(str))
    return out.sort_values("score", ascending=False).reset_index(drop=True)


def head_family(run: Run | str | Path, layer: int, head: int) -> tuple[str | None, pd.DataFrame]:
    """The head's family and the other heads of that family (``layer, head``)."""
    fam = read_artifact(run, FAMILIES)
    fam = fam.assign(family=fam["family"].astype(str))
    row = fam[(fam["layer"] == layer) & (fam["head"] == head)]
    if row.empty:
        return None, fam.iloc[0:0][["layer", "head"]]
    name = str(row["family"].iloc[0])
    members = fam[(fam["family"] == name) & ~((fam["layer"] == layer) & (fam["head"] == head))]
    return name, members[["layer", "head"]].reset_index(drop=True)


def grid(frame: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    """``[layers, heads]`` array of ``frame[column]`` (NaN where a head has no row)."""
    z = np.full((n_layers, n_heads), np.nan)
    ok = (frame["layer"] >= 0) & (frame["layer"] < n_layers) & (frame["head"] >= 0) & (frame["head"] < n_heads)
    sub = frame[ok]
    z[sub["layer"].to_numpy(int), sub["head"].to_numpy(int)] = pd.to_numeric(sub[column], errors="coerce").to_numpy(float)
    return z


# -- policies ----------------------------------------------------------------------------------
def fit_policy(curves: Any, budget: float, budget_kind: str = "density", gqa: bool = False,
               protect: str = "dense", layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """Fit `PolicyGenerator` on precomputed cost-recall curves (``layers``: protected layers); the
    emitted policy as a dict."""
    from attnlab.sparsity_stats import PolicyGenerator

    gen = PolicyGenerator(budget=budget, budget_kind=budget_kind, gqa_consistent=gqa, protect_retrieval=protect,
                          protected_layers=layers).fit(curves)
    return gen.emit().to_dict()


def policy_frame(policy: dict[str, Any]) -> pd.DataFrame:
    """One row per head of a policy dict (validated through `Policy.from_dict`)."""
    from attnlab.sparsity_stats import Policy

    return Policy.from_dict(policy).to_frame()


def stored_policy(run: Run | str | Path) -> dict[str, Any]:
    """The run's policy, validated, as a dict."""
    from attnlab.sparsity_stats import Policy

    run = Run.coerce(run)
    return Policy.from_dict(read_artifact(run, POLICY), path=str(run.file(POLICY))).to_dict()


# -- validation --------------------------------------------------------------------------------
#: What the Validation page's Pareto plot can put against density (column: label, lower is better).
PARETO_MEASURES = {
    "rel_l2_mean": ("per-head output error, rel-L2 (mean)", True),
    "kl_mean": ("KL(dense‖sparse), nats/token", True),
    "ppl_delta": ("perplexity change", True),
    "needle_delta": ("needle accuracy change (sparse − dense)", False),
    "recall_mean": ("attention mass kept per head (mean)", False),
}


def validation_overview(entries: list[RunEntry], run: Run | None = None) -> pd.DataFrame:
    """One row per run holding a validation summary (of ``run``'s model when given: `ModelIdentity.mismatch`):
    the policy, its achieved density and what it cost (`PARETO_MEASURES`). A summary that cannot
    be read is left out here (its own run's page reports it)."""
    def row(name: str, s: dict) -> dict:
        nd, ns = s.get("needle_dense"), s.get("needle_sparse")
        return {
            "run": name, "policy": s.get("policy", ""), "executor": s.get("executor", ""),
            "prompt_tokens": s.get("prompt_tokens"), "density": float(s["density_mean"]),
            "rel_l2_mean": s.get("rel_l2_mean"), "kl_mean": s.get("kl_mean"), "ppl_delta": s.get("ppl_delta"),
            "needle_delta": None if nd is None or ns is None else float(ns) - float(nd),
            "recall_mean": s.get("recall_mean"),
        }

    rows = _summary_rows(entries, run, VALIDATION_SUMMARY, row)
    return pd.DataFrame(rows, columns=["run", "policy", "executor", "prompt_tokens", "density", *PARETO_MEASURES])


def _summary_rows(entries: list[RunEntry], run: Run | None, art: Artifact, row: Callable[[str, dict], dict]) -> list[dict]:
    """``row(run name, summary)`` for every run holding the JSON summary ``art`` (of ``run``'s
    model when given). A summary that cannot be read, or that lacks what ``row`` needs, is left
    out (its own run's page says why)."""
    rows = []
    for e in entries:
        if e.run is None or not e.run.has(art):
            continue
        try:
            if run is not None and run.identity.mismatch(e.run.identity) is not None:
                continue
            rows.append(row(e.name, read_artifact(e.run, art)))
        except (AttnlabError, KeyError, TypeError, ValueError):
            continue
    return rows


#: Decode-phase measures the Validation page plots against the KV cache kept: column → (label, lower is better).
DECODE_MEASURES = {
    "needle_compressed": ("needle accuracy with the compressed cache", False),
    "needle_delta": ("needle accuracy change (compressed − dense)", False),
    "token_match": ("greedy tokens equal to dense (share)", False),
    "kl_mean": ("KL(dense‖compressed), teacher-forced, nats/token", True),
}


def decode_overview(entries: list[RunEntry], run: Run | None = None) -> pd.DataFrame:
    """One row per run holding a decode-phase validation (`DECODE_SUMMARY`; of ``run``'s model when
    given): the policy, the share of the dense KV cache it held, and what it cost
    (`DECODE_MEASURES`). A summary that cannot be read is left out here (its own run's page says why)."""
    def row(name: str, s: dict) -> dict:
        nd, nc = s.get("needle_dense"), s.get("needle_compressed")
        return {
            "run": name, "policy": s.get("policy", ""), "phase": s.get("phase", ""),
            "prompt_tokens": s.get("prompt_tokens"), "needle_n": s.get("needle_n", 0), "kv_fraction": float(s["kv_fraction"]),
            "kv_vs_predicted": s.get("kv_vs_predicted"),
            "needle_compressed": nc, "needle_delta": None if nd is None or nc is None else float(nc) - float(nd),
            "token_match": s.get("token_match"), "kl_mean": s.get("kl_mean"),
            "tokens_per_s_compressed": s.get("tokens_per_s_compressed"), "tokens_per_s_dense": s.get("tokens_per_s_dense"),
        }

    rows = _summary_rows(entries, run, DECODE_SUMMARY, row)
    cols = ["run", "policy", "phase", "prompt_tokens", "needle_n", "kv_fraction", "kv_vs_predicted", *DECODE_MEASURES,
            "tokens_per_s_compressed", "tokens_per_s_dense"]
    frame = pd.DataFrame(rows, columns=cols)
    return frame.astype({m: float for m in DECODE_MEASURES})


def changed_decode_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """The needle samples whose grade the compressed cache changed (right only densely, or only
    compressed), with both answers."""
    if "correct_dense" not in samples.columns:
        return samples.iloc[0:0]
    needle = samples[samples["task"] == "needle"]
    changed = needle[needle["correct_dense"].astype(bool) != needle["correct_compressed"].astype(bool)]
    cols = [c for c in ("sample", "answer", "correct_dense", "correct_compressed", "dense", "compressed", "kv_fraction")
            if c in changed.columns]
    return changed[cols].reset_index(drop=True)


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


# -- task suite --------------------------------------------------------------------------------
def task_points(summary: pd.DataFrame, task: str | None, length: int) -> pd.DataFrame:
    """One point per method at ``length``: score (with interval) and density for ``task``, or
    (``task=None``) the mean over tasks (the interval then spans the tasks' interval means)."""
    at = summary[summary["length"] == length]
    if task is not None:
        at = at[at["task"] == task]
    cols = ["score", "ci_low", "ci_high", "density"]
    return at.groupby("method", sort=False, as_index=False)[cols].mean().sort_values("density", ignore_index=True)


def changed_samples(samples: pd.DataFrame, method: str) -> pd.DataFrame:
    """Samples where ``method`` and dense disagree on correctness, with both answers."""
    dense = samples[samples["method"] == "dense"].set_index("sample")
    other = samples[samples["method"] == method].set_index("sample")
    common = dense.index.intersection(other.index)
    differ = [s for s in common if bool(dense.at[s, "correct"]) != bool(other.at[s, "correct"])]
    return pd.DataFrame({
        "sample": differ,
        "task": [dense.at[s, "task"] for s in differ],
        "right": ["dense only" if dense.at[s, "correct"] else f"{method} only" for s in differ],
        "dense answer": [dense.at[s, "reply"] for s in differ],
        f"{method} answer": [other.at[s, "reply"] for s in differ],
    })


def task_prompt_text(tokenizer, sample: str, seed: int) -> str:
    """The prompt of an eval sample (``{task}-{length}-{index}``), rebuilt from its seed."""
    from attnlab.tasks import TaskError, build_task_sample

    try:
        task, length, index = sample.rsplit("-", 2)
        built = build_task_sample(tokenizer, task, int(length), int(index), seed=seed)
    except ValueError:
        raise TaskError(f"{sample!r} is not an eval sample name (TASK-LENGTH-INDEX)") from None
    return tokenizer.decode(built.input_ids[0], skip_special_tokens=False)


# -- circuits ----------------------------------------------------------------------------------
def read_circuit(run: Run | str | Path):
    """The run's circuit as an `attnlab.circuits.circuit.Circuit`, checked against the run's model
    shape; `RunError` (naming `attnlab circuit`) when missing or damaged."""
    from attnlab.circuits.circuit import Circuit

    run = Run.coerce(run)
    raw = read_artifact(run, CIRCUIT)
    path, command = run.file(CIRCUIT), run.command_for(CIRCUIT)
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON {type(raw).__name__}, not an object")
        circuit = Circuit.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        why = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise RunError(_ERR_CIRCUIT.format(path=path, why=why, command=command)) from exc
    ident = run.identity
    outside = [n for n in circuit.nodes if not (0 <= n[0] < ident.n_layers and 0 <= n[1] < ident.n_heads)]
    if outside:
        raise RunError(_ERR_CIRCUIT.format(path=path, command=command,
                                           why=f"heads {outside} are outside the run's {ident.n_layers} layers × {ident.n_heads} heads"))
    f = circuit.faithfulness
    if f is not None and (not isinstance(f, dict) or len(f.get("sizes", [])) != len(f.get("f", [])) or not f.get("sizes")):
        raise RunError(_ERR_CIRCUIT.format(path=path, command=command,
                                           why="its faithfulness curve has no sizes, or sizes and f of different lengths"))
    return circuit


def circuit_nodes(circuit, run: Run | None = None) -> pd.DataFrame:
    """One row per circuit head: ``layer, head, name, score`` (its effect), edges in and out, and
    the head's best detection and family when the run has them (and they can be read)."""
    ins: dict[tuple[int, int], int] = {}
    outs: dict[tuple[int, int], int] = {}
    for s, r in circuit.edges:
        outs[s] = outs.get(s, 0) + 1
        if r != "logits":
            ins[r] = ins.get(r, 0) + 1
    frame = pd.DataFrame([
        {"layer": n[0], "head": n[1], "name": head_label(*n), "score": circuit.node_scores.get(n, float("nan")),
         "edges_in": ins.get(n, 0), "edges_out": outs.get(n, 0),
         "to_logits": any(s == n and r == "logits" for s, r in circuit.edges)}
        for n in circuit.nodes
    ], columns=["layer", "head", "name", "score", "edges_in", "edges_out", "to_logits"])
    if run is not None and not frame.empty:
        if run.has(DETECTIONS):
            try:
                det = detection_means(run).set_index(["layer", "head"])
                best = det.idxmax(axis=1)
                frame["best_detection"] = [best.get((r.layer, r.head)) for r in frame.itertuples()]
            except AttnlabError:
                pass  # the Retrieval page reports a damaged detections table
        if run.has(FAMILIES):
            try:
                fam = read_artifact(run, FAMILIES).set_index(["layer", "head"])["family"].astype(str)
                frame["family"] = [fam.get((r.layer, r.head)) for r in frame.itertuples()]
            except AttnlabError:
                pass  # the Head families page reports it
    return frame.sort_values("score", ascending=False).reset_index(drop=True)


def circuit_edges(circuit) -> pd.DataFrame:
    def name(n):
        return n if isinstance(n, str) else head_label(*n)

    return pd.DataFrame([{"from": name(s), "to": name(r), "score": circuit.edge_scores.get((s, r), float("nan"))}
                         for s, r in circuit.edges], columns=["from", "to", "score"]).sort_values("score", ascending=False)


# -- two runs ------------------------------------------------------------------------------------
def compare_problem(run_a: Run, run_b: Run) -> str | None:
    """Why two runs cannot be compared head by head (another model shape), or None. Two runs of
    different models of the same shape (a base model and its fine-tune) can be compared."""
    diff = run_a.identity.mismatch(run_b.identity)
    if diff is None or diff[0] in ("fingerprint", "name"):
        return None
    field, theirs, ours = diff
    return (f"runs {run_a.name} and {run_b.name} have different model shapes ({field}: {ours} in "
            f"{run_a.identity.describe()}, {theirs} in {run_b.identity.describe()}): a head-by-head comparison needs "
            "two runs of the same model shape")


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


# -- cached: the readers above behind st.cache_data, keyed by the files' modification times -----
@st.cache_data(show_spinner=False)
def _artifact(run_path: str, key: str, stamp: str) -> Any:
    return read_artifact(run_path, key)


def cached_artifact(run: Run, art: Artifact) -> Any:
    return _artifact(str(run.path), art.key, file_key(run.file(art)))


@st.cache_data(show_spinner=False)
def _head_means(run_path: str, stamp: str) -> pd.DataFrame:
    return head_means(run_path)


def cached_head_means(run: Run) -> pd.DataFrame:
    return _head_means(str(run.path), file_key(run.file(HEAD_STATS)))


@st.cache_data(show_spinner=False)
def _detection_means(run_path: str, stamp: str) -> pd.DataFrame:
    return detection_means(run_path)


def cached_detection_means(run: Run) -> pd.DataFrame:
    return _detection_means(str(run.path), file_key(run.file(DETECTIONS)))


@st.cache_data(show_spinner=False)
def _block_maps(run_path: str, stamp: str) -> dict[str, Any]:
    return block_maps(run_path)


def cached_block_maps(run: Run) -> dict[str, Any]:
    return _block_maps(str(run.path), file_key(run.file(BLOCK_MAPS)))


@st.cache_data(show_spinner=False)
def _head_values(run_path: str, layer: int, head: int, stamp: str) -> pd.DataFrame:
    return head_values(run_path, layer, head)


def cached_head_values(run: Run, layer: int, head: int) -> pd.DataFrame:
    return _head_values(str(run.path), int(layer), int(head), file_key(run.file(HEAD_STATS)))


@st.cache_data(show_spinner=False)
def _stored_policy(run_path: str, stamp: str) -> dict[str, Any]:
    return stored_policy(run_path)


def cached_stored_policy(run: Run) -> dict[str, Any]:
    return _stored_policy(str(run.path), file_key(run.file(POLICY)))


@st.cache_data(show_spinner=False)
def _circuit(run_path: str, stamp: str):
    return read_circuit(run_path)


def cached_circuit(run: Run):
    return _circuit(str(run.path), file_key(run.file(CIRCUIT)))


#: What the policy curves depend on: statistics, block maps, retrieval detections.
CURVE_INPUTS = (HEAD_STATS, BLOCK_MAPS, DETECTIONS)


@st.cache_resource(show_spinner=False, max_entries=4)
def _curves(run_path: str, stamp: str):
    """Per-head cost-recall curves of every candidate (from head_stats and block maps)."""
    from attnlab.sparsity_stats import compute_curves

    return compute_curves(run_path)


@st.cache_data(show_spinner=False, max_entries=64)
def _policy(run_path: str, stamp: str, budget: float, budget_kind: str, gqa: bool, protect: str,
            layers: tuple[int, ...] = ()) -> dict[str, Any]:
    return fit_policy(_curves(run_path, stamp), budget, budget_kind, gqa, protect, layers)


def cached_policy(run: Run, budget: float, budget_kind: str, gqa: bool, protect: str,
                  layers: tuple[int, ...] = ()) -> dict[str, Any]:
    return _policy(str(run.path), artifacts_key(run.path, CURVE_INPUTS), float(budget), budget_kind, bool(gqa), protect,
                   tuple(int(x) for x in layers))


@st.cache_data(show_spinner=False, max_entries=16)
def _compare(run_path: str, stamp: str, budgets: tuple[float, ...], budget_kind: str, gqa: bool, protect: str,
             layers: tuple[int, ...] = ()) -> pd.DataFrame:
    from attnlab.sparsity_stats import compare_policies

    return compare_policies(_curves(run_path, stamp), list(budgets), budget_kind=budget_kind, gqa_consistent=gqa,
                            protect_retrieval=protect, protected_layers=layers)


def cached_compare(run: Run, budgets: tuple[float, ...], budget_kind: str, gqa: bool, protect: str,
                   layers: tuple[int, ...] = ()) -> pd.DataFrame:
    return _compare(str(run.path), artifacts_key(run.path, CURVE_INPUTS), tuple(budgets), budget_kind, bool(gqa), protect,
                    tuple(int(x) for x in layers))
