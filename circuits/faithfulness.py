"""Faithfulness of a head circuit: keep its heads, mean-ablate the rest, see what survives.

MIB's faithfulness of a circuit ``C`` is ``f(C) = (m(C) − m(∅)) / (m(N) − m(∅))`` where ``m``
is the task metric on the clean inputs, ``N`` the full model and ``∅`` the model with every
head ablated. Heads outside the circuit are mean-ablated (their ``z`` set to the mean over the
corrupted prompts: per position by default, or one mean per head over all positions with
`attnlab.probes.ablation.head_means`). Over circuit sizes ``k``
(the top-``k`` heads of a ranking) this gives a curve; CPR is its area (higher is better), CMD
the area of ``|1 − f|`` (0 is best). Completeness asks the reverse: what the complement
``N \\ C`` recovers on its own (low means the circuit holds the behaviour).

The arithmetic (`faithfulness`, `curve_summary`, `smallest_reaching`) is separate from the
model runs (`faithfulness_curve`) so it can be checked on hand-made numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnlab.errors import AttnlabError
from attnlab.probes.ablation import ablate_heads, head_means

from .patching import forward
from .tasks import Task, logit_diff


class FaithfulnessError(AttnlabError):
    """Faithfulness is undefined (the full and empty models score the same)."""


def faithfulness(m_circuit: float | Sequence[float], m_empty: float, m_full: float) -> float | list[float]:
    """``(m(C) − m(∅)) / (m(N) − m(∅))`` for one value or a sequence of circuit metrics."""
    denom = m_full - m_empty
    if abs(denom) < 1e-12:
        raise FaithfulnessError(
            f"faithfulness is undefined: the full model and the fully ablated model score the same ({m_full:.4g})"
        )
    if isinstance(m_circuit, (int, float)):
        return (float(m_circuit) - m_empty) / denom
    return [(float(m) - m_empty) / denom for m in m_circuit]


def smallest_reaching(sizes: Sequence[int], f: Sequence[float], level: float = 0.8) -> int | None:
    """The smallest size whose faithfulness reaches ``level`` (None when none does)."""
    for k, value in sorted(zip(sizes, f, strict=False)):
        if value >= level:
            return int(k)
    return None


def curve_summary(sizes: Sequence[int], f: Sequence[float], n_total: int) -> dict:
    """CPR (area under f) and CMD (area of |1 − f|) over the fraction of heads kept, by the
    trapezoid rule over the measured sizes."""
    pts = sorted(zip(sizes, f, strict=False))
    xs = [k / n_total for k, _ in pts]
    ys = [v for _, v in pts]
    cpr = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    cmd = sum((xs[i + 1] - xs[i]) * (abs(1 - ys[i + 1]) + abs(1 - ys[i])) / 2 for i in range(len(xs) - 1))
    return {"cpr": cpr, "cmd": cmd}


def rank_heads(scores: torch.Tensor) -> list[tuple[int, int]]:
    """Heads ``(layer, head)`` by decreasing score (ties: lower layer, then head, first)."""
    n_layers, n_heads = scores.shape
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return [(i // n_heads, i % n_heads) for i in order]


def reference_means(model, task: Task) -> torch.Tensor:
    """Per-head mean ``z`` over the task's corrupted prompts, ``[layers, heads, head_dim]``."""
    return head_means(model, [ex.corrupted[None] for ex in task.examples])


@torch.no_grad()
def metric_with_heads(model, task: Task, keep: Sequence[tuple[int, int]], means: torch.Tensor | None = None) -> float:
    """Task metric on the clean inputs with every head outside ``keep`` mean-ablated.

    ``means``: ``[layers, heads, head_dim]`` position-independent means (`reference_means`,
    applied with `attnlab.probes.ablation.ablate_heads`), or None for per-position means: each
    ablated head's ``z`` at position ``i`` is its mean at ``i`` over the corrupted prompts of the
    same length (Wang et al.'s per-template mean), patched in through the routed forward.
    """
    keep_set = {(int(a), int(b)) for a, b in keep}
    ablate = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads) if (layer, h) not in keep_set]
    total, value = len(task), 0.0
    for c_ids, x_ids, good, bad in task.groups():
        if means is None:
            ref = forward(model, x_ids)
            by_layer: dict[int, list[int]] = {}
            for layer, h in ablate:
                by_layer.setdefault(layer, []).append(h)
            patch = {layer: (heads, ref.z[layer].mean(0, keepdim=True).expand(c_ids.shape[0], -1, -1, -1))
                     for layer, heads in by_layer.items()}
            logits = forward(model, c_ids, patch=patch).logits
        elif ablate:
            with ablate_heads(model, ablate, "mean", means=means, path="bridge"):
                logits = model.bridge(c_ids.to(model.device))
        else:
            logits = model.bridge(c_ids.to(model.device))
        value += c_ids.shape[0] / total * float(logit_diff(logits, good, bad))
    return value


def faithfulness_curve(
    model, task: Task, ranking: Sequence[tuple[int, int]], *, sizes: Sequence[int] | None = None,
    means: torch.Tensor | str = "position", level: float = 0.8, circuit: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Faithfulness of the top-``k`` heads of ``ranking`` for each ``k`` in ``sizes``.

    ``means``: ``"position"`` (default: per-position means over the corrupted prompts),
    ``"global"`` (`reference_means`, one mean per head over all positions) or a tensor.
    Returns ``{"sizes", "f", "m_full", "m_empty", "smallest_at_level", "level", "cpr", "cmd"}``
    and, when ``circuit`` is given, its ``circuit_f`` and ``completeness`` (f of the complement).
    """
    n_total = model.n_layers * model.n_heads
    ranking = [tuple(map(int, h)) for h in ranking]
    if sizes is None:
        sizes = sorted({0, n_total, *[k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192) if k < n_total]})
    if isinstance(means, str):
        if means not in ("position", "global"):
            raise FaithfulnessError(f"means must be 'position', 'global' or a [layers, heads, head_dim] tensor, got {means!r}")
        means = None if means == "position" else reference_means(model, task)
    m_full = metric_with_heads(model, task, [(a, b) for a in range(model.n_layers) for b in range(model.n_heads)], means)
    m_empty = metric_with_heads(model, task, [], means)
    ms = [m_full if k >= n_total else (m_empty if k == 0 else metric_with_heads(model, task, ranking[:k], means)) for k in sizes]
    f = faithfulness(ms, m_empty, m_full)
    out = {
        "sizes": [int(k) for k in sizes], "f": f, "metric": ms, "m_full": m_full, "m_empty": m_empty,
        "level": level, "smallest_at_level": smallest_reaching(sizes, f, level), **curve_summary(sizes, f, n_total),
    }
    if circuit is not None:
        c = {tuple(map(int, h)) for h in circuit}
        complement = [(a, b) for a in range(model.n_layers) for b in range(model.n_heads) if (a, b) not in c]
        out["circuit_f"] = faithfulness(metric_with_heads(model, task, sorted(c), means), m_empty, m_full)
        out["completeness"] = faithfulness(metric_with_heads(model, task, complement, means), m_empty, m_full)
    return out
