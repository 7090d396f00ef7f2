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

A ranking scored once on the full model (attribution or activation patching) estimates each
head's effect with every other head present; a circuit is measured with the others ablated.
`refine_circuit` closes that gap: it re-scores heads in the ablated model of the current circuit
(`ablated_attribution`: one forward and backward per step) and grows the circuit from nothing,
or prunes it from the full model, measuring f exactly at every step with the same mean ablation.
Per-position means come from the task's own corrupted prompts or, with ``reference=``, from
another task's (e.g. a larger set of independently drawn ABC prompts).
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
def position_means(model, task: Task, reference: Task | None = None) -> list[list[torch.Tensor]]:
    """Per length group of ``task`` (in `Task.groups` order), per layer, the per-position mean
    ``z [1, n, heads, d]`` over the corrupted prompts of that length — of ``task`` itself by
    default, or of ``reference`` (e.g. a larger set of independently drawn corrupted prompts)."""
    source = {int(x.shape[1]): x for _, x, _, _ in (reference or task).groups()}
    out = []
    for c_ids, _, _, _ in task.groups():
        n = int(c_ids.shape[1])
        if n not in source:
            raise FaithfulnessError(
                f"the reference task has no corrupted prompts of {n} tokens; per-position means need one per length"
            )
        ref = forward(model, source[n], last_only=True)
        out.append([z.mean(0, keepdim=True) for z in ref.z])
    return out


@torch.no_grad()
def metric_with_heads(
    model, task: Task, keep: Sequence[tuple[int, int]], means: torch.Tensor | None = None, *,
    group_means: list[list[torch.Tensor]] | None = None,
) -> float:
    """Task metric on the clean inputs with every head outside ``keep`` mean-ablated.

    ``means``: ``[layers, heads, head_dim]`` position-independent means (`reference_means`,
    applied with `attnlab.probes.ablation.ablate_heads`), or None for per-position means: each
    ablated head's ``z`` at position ``i`` is its mean at ``i`` over the corrupted prompts of the
    same length (Wang et al.'s per-template mean), patched in through the routed forward.
    ``group_means``: those per-position means precomputed with `position_means` (saves one
    forward per group and allows a reference set other than the task's own corrupted prompts).
    """
    keep_set = {(int(a), int(b)) for a, b in keep}
    ablate = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads) if (layer, h) not in keep_set]
    total, value = len(task), 0.0
    for gi, (c_ids, x_ids, good, bad) in enumerate(task.groups()):
        if means is None:
            zs = group_means[gi] if group_means is not None else [z.mean(0, keepdim=True) for z in forward(model, x_ids, last_only=True).z]
            by_layer: dict[int, list[int]] = {}
            for layer, h in ablate:
                by_layer.setdefault(layer, []).append(h)
            patch = {layer: (heads, zs[layer].expand(c_ids.shape[0], -1, -1, -1)) for layer, heads in by_layer.items()}
            logits = forward(model, c_ids, patch=patch, last_only=True).logits
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
    reference: Task | None = None,
) -> dict:
    """Faithfulness of the top-``k`` heads of ``ranking`` for each ``k`` in ``sizes``.

    ``means``: ``"position"`` (default: per-position means over the corrupted prompts),
    ``"global"`` (`reference_means`, one mean per head over all positions) or a tensor.
    ``reference``: take the means from this task's corrupted prompts instead of ``task``'s.
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
        means = None if means == "position" else reference_means(model, reference or task)
    gm = position_means(model, task, reference) if means is None else None

    def metric(keep):
        return metric_with_heads(model, task, keep, means, group_means=gm)

    m_full = metric([(a, b) for a in range(model.n_layers) for b in range(model.n_heads)])
    m_empty = metric([])
    ms = [m_full if k >= n_total else (m_empty if k == 0 else metric(ranking[:k])) for k in sizes]
    f = faithfulness(ms, m_empty, m_full)
    out = {
        "sizes": [int(k) for k in sizes], "f": f, "metric": ms, "m_full": m_full, "m_empty": m_empty,
        "level": level, "smallest_at_level": smallest_reaching(sizes, f, level), **curve_summary(sizes, f, n_total),
    }
    if circuit is not None:
        c = {tuple(map(int, h)) for h in circuit}
        complement = [(a, b) for a in range(model.n_layers) for b in range(model.n_heads) if (a, b) not in c]
        out["circuit_f"] = faithfulness(metric(sorted(c)), m_empty, m_full)
        out["completeness"] = faithfulness(metric(complement), m_empty, m_full)
    return out


# ---------------------------------------------------------------------------------------
# refinement: re-score heads under the current circuit
# ---------------------------------------------------------------------------------------
REFINE_MODES = ("grow", "prune")


def _group_means(model, x_ids: torch.Tensor, means: torch.Tensor | None, batch: int, zs=None) -> list[torch.Tensor]:
    """Per layer, the ``z`` an ablated head gets in a group: ``[batch, n, heads, d]`` (the same
    values as `metric_with_heads` patches in; ``zs``: that group's `position_means`)."""
    n = x_ids.shape[1]
    if means is None:
        zs = zs if zs is not None else [z.mean(0, keepdim=True) for z in forward(model, x_ids, last_only=True).z]
        return [z.expand(batch, -1, -1, -1) for z in zs]
    return [means[layer].to(model.device)[None, None].expand(batch, n, -1, -1) for layer in range(model.n_layers)]


def ablated_attribution(
    model, task: Task, keep: Sequence[tuple[int, int]], means: torch.Tensor | None = None, *,
    group_means: list[list[torch.Tensor]] | None = None,
) -> tuple[float, torch.Tensor]:
    """The metric with every head outside ``keep`` mean-ablated (as `metric_with_heads`), and
    each head's attribution in that ablated model: ``(z_h − mean_h) · ∂m/∂z_h`` where ``z_h``
    is what head ``h`` computes in this run. For a head outside ``keep`` it estimates what
    restoring it would add to the metric; for a head inside, what ablating it would take away.
    One forward and one backward per length group. Returns ``(metric, scores [layers, heads])``.
    """
    from attnlab.attention import attend, route_attention

    L, H = model.n_layers, model.n_heads
    keep_set = {(int(a), int(b)) for a, b in keep}
    ablated = {layer: [h for h in range(H) if (layer, h) not in keep_set] for layer in range(L)}
    total, value = len(task), 0.0
    scores = torch.zeros(L, H, dtype=torch.float64)
    for gi, (c_ids, x_ids, good, bad) in enumerate(task.groups()):
        w = c_ids.shape[0] / total
        with torch.no_grad():
            mean_z = _group_means(model, x_ids, means, c_ids.shape[0], group_means[gi] if group_means else None)
        own: list = [None] * L
        used: list = [None] * L

        def attention(layer: int, query, key, value, *, scaling: float, attention_mask=None,
                      own=own, used=used, mean_z=mean_z, variant=None) -> torch.Tensor:
            out = attend(query, key, value, scaling=scaling, variant=variant)
            own[layer] = out.detach()
            if ablated[layer]:
                out = out.clone()
                out[:, :, ablated[layer], :] = mean_z[layer][:, :, ablated[layer], :].to(out.dtype)
            used[layer] = out
            return out

        with torch.enable_grad(), route_attention(model, attention):
            logits = model.hf_model(c_ids.to(model.device), use_cache=False, logits_to_keep=1).logits
            metric = logit_diff(logits, good, bad)
            grads = torch.autograd.grad(metric, used, allow_unused=True)
        value += w * float(metric.detach())
        for layer in range(L):
            if grads[layer] is not None:
                diff = own[layer] - mean_z[layer].to(own[layer].dtype)
                scores[layer] += w * (diff * grads[layer]).sum(dim=(0, 1, 3)).double().cpu()
    return value, scores.float()


def refine_circuit(
    model, task: Task, *, mode: str = "grow", means: torch.Tensor | str = "position", level: float = 0.8,
    step: int = 1, max_size: int | None = None, min_size: int = 1, start: Sequence[tuple[int, int]] = (),
    reference: Task | None = None,
) -> dict:
    """A circuit built by re-scoring heads under the current circuit (iterative attribution).

    ``grow``: from ``start`` (default empty), repeatedly add the ``step`` heads outside the
    circuit whose restoration `ablated_attribution` estimates to help most, until the measured
    faithfulness reaches ``level`` or the circuit has ``max_size`` heads (default: all).
    ``prune``: from all heads (or ``start``), repeatedly remove the ``step`` heads whose
    ablation is estimated to cost least, down to ``min_size``. The faithfulness of every circuit
    on the path is measured exactly (the metric of the ablated forward itself, the documented
    mean ablation: ``means`` and ``reference`` as in `faithfulness_curve`), so nothing here
    changes the metric.

    Returns ``{"mode", "sizes", "f", "circuits" (the heads at each size), "ranking" (heads in
    the order grow adds them, or the reverse of the order prune removes them; heads never
    reached follow by their last score), "smallest_at_level", "circuit" (that circuit, or None),
    "m_full", "m_empty", "level", "forwards"}``. Select on one task and measure the result on
    held-out examples with `faithfulness_curve` to see whether the search fit the examples.
    """
    if mode not in REFINE_MODES:
        raise FaithfulnessError(f"refine mode must be one of {list(REFINE_MODES)}, got {mode!r}")
    if step < 1:
        raise FaithfulnessError(f"refine step must be at least 1, got {step}")
    if isinstance(means, str):
        if means not in ("position", "global"):
            raise FaithfulnessError(f"means must be 'position', 'global' or a [layers, heads, head_dim] tensor, got {means!r}")
        means = None if means == "position" else reference_means(model, reference or task)
    gm = position_means(model, task, reference) if means is None else None
    L, H = model.n_layers, model.n_heads
    every = [(a, b) for a in range(L) for b in range(H)]
    n_total = len(every)
    max_size = n_total if max_size is None else min(int(max_size), n_total)
    m_full = metric_with_heads(model, task, every, means, group_means=gm)
    m_empty = metric_with_heads(model, task, [], means, group_means=gm)
    if mode == "grow":
        circuit = [tuple(map(int, h)) for h in start]
    else:
        circuit = [tuple(map(int, h)) for h in start] if start else list(every)
    order: list[tuple[int, int]] = list(circuit) if mode == "grow" else []
    sizes, fs, circuits = [], [], []
    forwards = 0
    while True:
        metric, scores = ablated_attribution(model, task, circuit, means, group_means=gm)
        forwards += 1
        f = float(faithfulness(metric, m_empty, m_full))
        sizes.append(len(circuit))
        fs.append(f)
        circuits.append(sorted(circuit))
        inside = set(circuit)
        if mode == "grow":
            if f >= level or len(circuit) >= max_size:
                break
            outside = [h for h in rank_heads(scores) if h not in inside]
            add = outside[: min(step, max_size - len(circuit))]
            circuit += add
            order += add
        else:
            if len(circuit) <= min_size:
                break
            # lowest estimated loss first (ties: later layer first, so rank_heads order reversed)
            ranked_inside = [h for h in rank_heads(scores) if h in inside]
            drop = ranked_inside[::-1][: min(step, len(circuit) - min_size)]
            dropped = set(drop)
            circuit = [h for h in circuit if h not in dropped]
            order = drop[::-1] + order  # removed last = most important = earliest in the ranking
    final = set(circuit)
    rest = [h for h in rank_heads(scores) if h not in set(order) and h not in final] if mode == "grow" else []
    if mode == "grow":
        ranking = order + rest
    else:
        ranking = [h for h in rank_heads(scores) if h in final] + order
    smallest = smallest_reaching(sizes, fs, level)
    return {
        "mode": mode, "sizes": sizes, "f": fs, "circuits": circuits, "ranking": ranking,
        "smallest_at_level": smallest,
        "circuit": circuits[sizes.index(smallest)] if smallest is not None else None,
        "m_full": m_full, "m_empty": m_empty, "level": level, "forwards": forwards,
    }
