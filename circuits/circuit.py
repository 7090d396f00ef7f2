"""A discovered circuit: selection from scores, its run file, a graph figure, protected heads.

`select_circuit` keeps the heads whose score reaches ``threshold`` × the largest head score, and
the edges (head → head, head → logits) whose score reaches ``threshold`` × the largest edge
score among edges between kept nodes. `discover` runs task → scores → circuit (→ faithfulness);
with ``cut="faithfulness"`` the circuit is instead the smallest top-``k`` of the head ranking
whose faithfulness reaches the level (0.8) on the measured curve, so the curve justifies the cut
(the edges are still those between kept heads scoring ``threshold`` × the best edge).
`save_circuit` writes it into a run directory (the `attnlab.runs.CIRCUIT` artifact) via
`attnlab.runs.ensure_run`; `read_circuit` / `load_circuit` read it back through the run store and
check it (fields, heads inside the run's model, a consistent faithfulness curve) in one place,
for the CLI, the notebooks and the dashboard alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab.errors import AttnlabError, RunError
from attnlab.names import head_label, parse_head_label
from attnlab.runs import CIRCUIT, MANIFEST, Run, ensure_run, load_json

from .faithfulness import faithfulness as faithfulness_of
from .faithfulness import faithfulness_curve, metric_with_heads, rank_heads
from .patching import PatchingError, Scores, path_patching_edges, score_heads
from .tasks import Task

_ERR_CIRCUIT = "{path} is not a circuit attnlab can read ({why}); re-create it with `{command}`"
#: Default selection: a head (edge) is kept when its score is at least this fraction of the
#: largest head (edge) score.
DEFAULT_THRESHOLD = 0.5
LOGITS = "logits"
#: How `discover` cuts the ranking: by score threshold, or where the faithfulness curve reaches its level.
CUTS = ("threshold", "faithfulness")


@dataclass
class Circuit:
    """Nodes ``(layer, head)``, edges ``((layer, head), (layer, head) | "logits")`` with scores."""

    nodes: list[tuple[int, int]]
    edges: list[tuple[tuple[int, int], Any]]
    node_scores: dict[tuple[int, int], float]
    edge_scores: dict[tuple[tuple[int, int], Any], float]
    method: str
    direction: str
    threshold: float
    task: dict = field(default_factory=dict)
    clean_metric: float = 0.0
    corrupted_metric: float = 0.0
    faithfulness: dict | None = None
    all_scores: list[list[float]] | None = None
    #: exact effect of each checked edge by path patching (`verify_edges`), in metric units
    edge_checks: dict[tuple[tuple[int, int], Any], float] = field(default_factory=dict)

    def head_edges(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        return [(s, r) for s, r in self.edges if r != LOGITS]

    def to_json(self) -> dict:
        return {
            "schema": 1,
            "method": self.method,
            "direction": self.direction,
            "threshold": self.threshold,
            "task": self.task,
            "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric,
            "nodes": [{"layer": n[0], "head": n[1], "name": node_label(n), "score": self.node_scores[n]} for n in self.nodes],
            "edges": [
                {"from": node_label(s), "to": node_label(r), "score": self.edge_scores[(s, r)],
                 **({"path_patching": self.edge_checks[(s, r)]} if (s, r) in self.edge_checks else {})}
                for s, r in self.edges
            ],
            "scores": self.all_scores,
            "faithfulness": self.faithfulness,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Circuit:
        def parse(name):
            return LOGITS if name == LOGITS else parse_head_label(name)

        nodes = [(int(n["layer"]), int(n["head"])) for n in obj["nodes"]]
        edges = [(parse(e["from"]), parse(e["to"])) for e in obj["edges"]]
        return cls(
            nodes=nodes, edges=edges,
            node_scores={(int(n["layer"]), int(n["head"])): float(n["score"]) for n in obj["nodes"]},
            edge_scores={(parse(e["from"]), parse(e["to"])): float(e["score"]) for e in obj["edges"]},
            method=obj["method"], direction=obj["direction"], threshold=obj["threshold"], task=obj.get("task", {}),
            clean_metric=obj.get("clean_metric", 0.0), corrupted_metric=obj.get("corrupted_metric", 0.0),
            faithfulness=obj.get("faithfulness"), all_scores=obj.get("scores"),
            edge_checks={(parse(e["from"]), parse(e["to"])): float(e["path_patching"])
                         for e in obj["edges"] if "path_patching" in e},
        )


def select_circuit(
    scores: Scores, *, threshold: float = DEFAULT_THRESHOLD, task: Task | None = None,
    nodes: list[tuple[int, int]] | None = None,
) -> Circuit:
    """Heads with ``score >= threshold * max score`` (or the given ``nodes``); edges between kept
    heads (and to the logits) with ``score >= threshold * max edge score``. Activation scores
    give no edges."""
    nodes_t = scores.nodes
    top = float(nodes_t.max()) if nodes_t.numel() else 0.0
    n_layers, n_heads = nodes_t.shape
    if nodes is None:
        nodes = [
            (layer, h) for layer in range(n_layers) for h in range(n_heads)
            if top > 0 and float(nodes_t[layer, h]) >= threshold * top
        ]
    else:
        nodes = sorted((int(a), int(b)) for a, b in nodes)
    node_scores = {n: float(nodes_t[n]) for n in nodes}
    candidates: dict = {}
    if scores.edges is not None:
        for s in nodes:
            for r in nodes:
                if r[0] > s[0]:
                    candidates[(s, r)] = float(scores.edges[s[0], s[1], r[0], r[1]])
            candidates[(s, LOGITS)] = float(scores.logit_edges[s])  # type: ignore[index]
    edge_top = max(candidates.values(), default=0.0)
    edges = [e for e, v in candidates.items() if edge_top > 0 and v >= threshold * edge_top]
    return Circuit(
        nodes=nodes, edges=edges, node_scores=node_scores, edge_scores={e: candidates[e] for e in edges},
        method=scores.method, direction=scores.direction, threshold=threshold,
        task=task.describe() if task is not None else {}, clean_metric=scores.clean_metric,
        corrupted_metric=scores.corrupted_metric, all_scores=nodes_t.tolist(),
    )


def discover(
    model, task: Task, *, method: str = "attribution", direction: str = "denoising",
    threshold: float = DEFAULT_THRESHOLD, faithfulness: bool = True, sizes=None, cut: str = "threshold",
    level: float = 0.8,
) -> Circuit:
    """Score every head (and edge), select the circuit and (optionally) measure its faithfulness.

    ``cut``: ``"threshold"`` keeps heads scoring ``threshold`` × the best; ``"faithfulness"``
    keeps the smallest top-``k`` of the ranking whose faithfulness reaches ``level`` on the
    curve (all heads when no measured size does; ``faithfulness["cut"]`` says which).
    """
    if cut not in CUTS:
        raise PatchingError(f"cut must be one of {list(CUTS)}, got {cut!r}")
    if cut == "faithfulness" and not faithfulness:
        raise PatchingError("cut='faithfulness' needs the faithfulness curve: do not turn it off")
    scores = score_heads(model, task, method=method, direction=direction)
    circuit = select_circuit(scores, threshold=threshold, task=task)
    if not faithfulness:
        return circuit
    ranking = rank_heads(scores.nodes)
    if cut == "threshold":
        circuit.faithfulness = faithfulness_curve(model, task, ranking, sizes=sizes, circuit=circuit.nodes, level=level)
        circuit.faithfulness["cut"] = "threshold"
        return circuit
    curve = faithfulness_curve(model, task, ranking, sizes=sizes, level=level)
    k = curve["smallest_at_level"]
    k = len(ranking) if k is None else k
    circuit = select_circuit(scores, threshold=threshold, task=task, nodes=ranking[:k])
    # the circuit is a measured point of the curve; only its complement needs a run
    circuit_f = curve["f"][curve["sizes"].index(k)] if k in curve["sizes"] else 1.0
    kept = set(circuit.nodes)
    complement = [(a, b) for a in range(model.n_layers) for b in range(model.n_heads) if (a, b) not in kept]
    completeness = faithfulness_of(metric_with_heads(model, task, complement), curve["m_empty"], curve["m_full"])
    circuit.faithfulness = {**curve, "circuit_f": circuit_f, "completeness": completeness,
                            "cut": "faithfulness", "cut_size": k}
    return circuit


def verify_edges(model, task: Task, circuit: Circuit, *, direction: str | None = None) -> dict:
    """Path-patch every edge of ``circuit`` (`attnlab.circuits.patching.path_patching_edges`: one
    clean and one corrupted run shared by all edges): the exact effect each edge's attribution
    score estimates, stored in ``circuit.edge_checks`` (and in the saved circuit). Returns
    ``{edge: effect}``."""
    direction = direction or circuit.direction
    circuit.edge_checks = dict(zip(circuit.edges, path_patching_edges(model, task, circuit.edges, direction=direction),
                                   strict=True))
    return circuit.edge_checks


def node_label(node: Any) -> str:
    """A circuit node's name: ``L{layer}.H{head}`` for a head, ``"logits"`` for the logits."""
    return LOGITS if node == LOGITS else head_label(*node)


def save_circuit(circuit: Circuit, model, out: str | Path, parameters: dict | None = None) -> Path:
    """Write the circuit into the run directory ``out`` (created if needed); returns its path."""
    params = {"method": circuit.method, "direction": circuit.direction, "threshold": circuit.threshold,
              "task": circuit.task.get("name"), **(parameters or {})}
    run = ensure_run(out, model.identity(), "circuit", params)
    return run.write(CIRCUIT, circuit.to_json())


def circuit_from_json(obj: Any, *, where: str | Path, command: str, n_layers: int = 0, n_heads: int = 0) -> Circuit:
    """THE check of a stored circuit: a `Circuit` from the parsed JSON ``obj``, or a `RunError`
    naming ``where`` and ``command`` (the fix) when a field is missing or malformed, a head lies
    outside ``n_layers`` × ``n_heads`` (when given), or the faithfulness curve is inconsistent."""
    try:
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON {type(obj).__name__}, not an object")
        circuit = Circuit.from_json(obj)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, AttnlabError) as exc:
        why = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise RunError(_ERR_CIRCUIT.format(path=where, why=why, command=command)) from exc
    outside = [n for n in circuit.nodes if not (0 <= n[0] < n_layers and 0 <= n[1] < n_heads)]
    if n_layers and n_heads and outside:
        raise RunError(_ERR_CIRCUIT.format(path=where, command=command,
                                           why=f"heads {outside} are outside the run's {n_layers} layers × {n_heads} heads"))
    f = circuit.faithfulness
    if f is not None and (not isinstance(f, dict) or not all(_curve_ok(c) for c in (f, f.get("refined")) if c is not None)):
        raise RunError(_ERR_CIRCUIT.format(path=where, command=command,
                                           why="its faithfulness curve has no sizes, or sizes and f of different lengths"))
    return circuit


def _curve_ok(curve: Any) -> bool:
    """A faithfulness curve is absent (only a refinement stored, ``--no-faithfulness``) or has
    as many ``f`` values as ``sizes``, at least one."""
    if not isinstance(curve, dict):
        return False
    if "sizes" not in curve and "f" not in curve:
        return True
    return bool(curve.get("sizes")) and len(curve.get("sizes", [])) == len(curve.get("f", []))


def read_circuit(run: Run | str | os.PathLike) -> Circuit:
    """The circuit stored in ``run`` (a `Run` or its path), checked against the run's model
    shape by `circuit_from_json`. Missing or damaged: `RunError` naming `attnlab circuit`."""
    run = Run.coerce(run)
    raw = run.read(CIRCUIT)
    model = run.model
    return circuit_from_json(raw, where=run.file(CIRCUIT), command=run.command_for(CIRCUIT),
                             n_layers=int(model.get("n_layers") or 0), n_heads=int(model.get("n_heads") or 0))


def load_circuit(source: Run | str | os.PathLike) -> Circuit:
    """A `Circuit` from a run (or its directory) holding one, or from a circuit file: the run's
    own (checked as `read_circuit` does) or a standalone copy (checked without a model shape)."""
    if isinstance(source, Run) or Path(source).is_dir():
        return read_circuit(source)
    path = Path(source)
    if path.name == CIRCUIT.filename and (path.parent / MANIFEST).is_file():
        return read_circuit(path.parent)
    command = CIRCUIT.command("RUN")
    if not path.is_file():
        raise RunError(f"no circuit at {path}: discover one with `{command}`")
    raw = load_json(path, what="circuit", fix=f"re-create it with `{command}`")
    return circuit_from_json(raw, where=path, command=command)


def protected_heads(circuit: Circuit | dict) -> list[tuple[int, int]]:
    """The circuit's heads as ``(layer, head)`` pairs, for ``PolicyGenerator(protected_heads=...)``."""
    if isinstance(circuit, dict):
        circuit = Circuit.from_json(circuit)
    return sorted((int(a), int(b)) for a, b in circuit.nodes)


def circuit_figure(circuit: Circuit, *, n_layers: int | None = None, n_heads: int | None = None):
    """A plotly graph: heads at (head, layer), the logits on top, edges as lines (width ∝ score)."""
    import plotly.graph_objects as go

    n_layers = n_layers or (max((n[0] for n in circuit.nodes), default=0) + 1)
    n_heads = n_heads or (max((n[1] for n in circuit.nodes), default=0) + 1)

    def pos(n):
        return ((n_heads - 1) / 2, n_layers) if n == LOGITS else (n[1], n[0])

    fig = go.Figure()
    top = max((abs(v) for v in circuit.edge_scores.values()), default=1.0) or 1.0
    for (s, r), v in circuit.edge_scores.items():
        (x0, y0), (x1, y1) = pos(s), pos(r)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", line={"width": 1 + 6 * abs(v) / top},
                                 hoverinfo="text", text=f"{v:.3g}", showlegend=False))
    xs = [pos(n)[0] for n in circuit.nodes] + [pos(LOGITS)[0]]
    ys = [pos(n)[1] for n in circuit.nodes] + [pos(LOGITS)[1]]
    labels = [head_label(*n) for n in circuit.nodes] + [LOGITS]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers+text", text=labels, textposition="top center",
                             marker={"size": 14}, showlegend=False))
    fig.update_layout(title=f"circuit ({circuit.method}, {circuit.task.get('name', '')})",
                      xaxis_title="head", yaxis_title="layer")
    return fig


def scores_tensor(circuit: Circuit) -> torch.Tensor:
    """All head scores ``[layers, heads]`` stored with the circuit."""
    return torch.tensor(circuit.all_scores or [])


# ---------------------------------------------------------------------------------------
# sharded activation patching
# ---------------------------------------------------------------------------------------
def discover_shard(model, task: Task, shard, *, direction: str = "denoising", threshold: float = DEFAULT_THRESHOLD,
                   ) -> tuple[Circuit, list[tuple[int, int]], float]:
    """Activation patching of ``shard``'s share of the heads (round-robin over ``(layer, head)``
    in layer order; the others score 0) and the circuit selected from those scores, without
    the faithfulness curve (it needs every head's score: `merge_circuit_shards` joins the
    shards). Returns ``(circuit, the heads done, wall seconds)``."""
    from attnlab.shards import check_share

    from .patching import activation_patching

    heads = check_share(shard, [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)], "head")
    scores = activation_patching(model, task, direction=direction, heads=heads)
    return select_circuit(scores, threshold=threshold, task=task), heads, scores.seconds


def merge_circuit_shards(shards: list[Run], merged: Run) -> None:
    """`attnlab merge` of ``circuit`` shards (activation patching, no faithfulness curve): each
    head's score from the shard that patched it, the metrics of the task (the same in every
    shard), and the circuit selected from them as one process selects it."""
    parts = [run.read(CIRCUIT) for run in shards]
    first = parts[0]
    ident = merged.identity
    nodes = torch.zeros(int(ident.n_layers), int(ident.n_heads), dtype=torch.float32)
    for run, part in zip(shards, parts, strict=True):
        scores = torch.tensor(part["scores"], dtype=torch.float32)
        for label in run.manifest["shard"]["units"]:
            layer, head = parse_head_label(label)
            nodes[layer, head] = scores[layer, head]
    scores = Scores(nodes, first["method"], first["direction"], float(first["clean_metric"]), float(first["corrupted_metric"]))
    circuit = select_circuit(scores, threshold=float(merged.manifest["parameters"]["threshold"]))
    circuit.task = first["task"]
    merged.write(CIRCUIT, circuit.to_json())
