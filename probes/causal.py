"""Causal check: do the heads a score ranks highest actually carry the behaviour?

Attention patterns are correlational evidence. The check is an intervention, as Wu et al. run it
for retrieval heads: measure needle accuracy (containment of the value in the greedy answer)

1. with the dense model,
2. with the top-K heads of a ranking ablated, and
3. with K random heads *outside* that top-K ablated, ``draws`` times,

for each K. If the ranking is right, removing the top-K hurts far more than removing K random
heads: ``drop_top / drop_random`` (drops from the dense accuracy) is large. The ablation runs
inside the routed attention of the greedy decoder (`attnlab.probes.needle.greedy_answer`), so
it is active during the SDPA prefill and every decoding step.

`causal_check` returns one row per condition (the run's `attnlab.runs.CAUSAL_CHECK` table);
`summarize_causal` reduces it per K (`attnlab.runs.CAUSAL_SUMMARY`). Any ranking of ``(layer, head)`` pairs works, so the
circuits and other detectors can reuse it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from .ablation import ABLATION_METHODS, HeadAblation
from .base import ProbeError
from .needle import NeedleSample, greedy_answer

#: Columns of the causal check table (`attnlab.runs.CAUSAL_CHECK`): ``condition`` is ``dense``, ``top`` or ``random``;
#: ``heads`` a JSON list of ``[layer, head]``; ``accuracy`` the share of samples whose greedy
#: answer contains the value.
CAUSAL_COLUMNS = ("condition", "k", "draw", "method", "heads", "accuracy", "n_correct", "n_samples", "mean_rouge1")

_ERR_RANKING = "the ranking has {n} heads but K={k} top heads and {k} random others are needed: lower K"
_ERR_METHOD = "ablation method must be one of {methods}, got {method!r}"


def random_heads(ranking: Sequence[tuple[int, int]], k: int, *, seed: int, draw: int) -> list[tuple[int, int]]:
    """``k`` heads drawn without replacement from the ranking minus its top ``k``.

    Seeded by (seed, k, draw), so each condition is reproducible on its own.
    """
    pool = sorted(tuple(h) for h in ranking[k:])
    if len(pool) < k:
        raise ProbeError(_ERR_RANKING.format(n=len(ranking), k=k))
    return sorted(random.Random(f"{seed}-{k}-{draw}").sample(pool, k))


def needle_accuracy(
    model,
    samples: Sequence[NeedleSample],
    ablation: HeadAblation | None = None,
    *,
    max_new_tokens: int | None = None,
    progress=None,
) -> dict[str, Any]:
    """Greedy accuracy over ``samples``: ``{"accuracy", "n_correct", "n_samples", "mean_rouge1", "answers"}``."""
    answers = []
    for sample in samples:
        answers.append(greedy_answer(model, sample, ablation=ablation, max_new_tokens=max_new_tokens))
        if progress is not None:
            progress.update(1)
    n_correct = sum(a.contains for a in answers)
    return {
        "accuracy": n_correct / max(len(answers), 1),
        "n_correct": n_correct,
        "n_samples": len(answers),
        "mean_rouge1": sum(a.rouge1 for a in answers) / max(len(answers), 1),
        "answers": answers,
    }


def causal_check(
    model,
    samples: Sequence[NeedleSample],
    ranking: Sequence[tuple[int, int]],
    *,
    ks: Sequence[int] = (5, 10, 20),
    draws: int = 3,
    method: str = "zero",
    means: torch.Tensor | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    dense: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Needle accuracy dense, with the top-K of ``ranking`` ablated, and with K random others.

    Args:
        samples: the needle samples to answer (each condition answers all of them).
        ranking: ``(layer, head)`` pairs, best first (e.g. `RetrievalScores.ranking()`); it
            should list every head, so that random heads are drawn from all the others.
        ks: the K values; draws: random head sets per K.
        method: ``zero``, ``mean`` (needs ``means``, see `head_means`) or ``uniform``.
        dense: include the dense condition (leave it out when another call already measured it).
    Returns:
        one row per condition, columns `CAUSAL_COLUMNS`.
    """
    if method not in ABLATION_METHODS:
        raise ProbeError(_ERR_METHOD.format(methods=list(ABLATION_METHODS), method=method))
    ranking = [(int(layer), int(h)) for layer, h in ranking]
    conditions: list[tuple[str, int, int, list[tuple[int, int]]]] = [("dense", 0, 0, [])] if dense else []
    for k in ks:
        k = int(k)
        if 2 * k > len(ranking):
            raise ProbeError(_ERR_RANKING.format(n=len(ranking), k=k))
        conditions.append(("top", k, 0, sorted(ranking[:k])))
        for d in range(draws):
            conditions.append(("random", k, d, random_heads(ranking, k, seed=seed, draw=d)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(conditions) * len(samples), desc="causal check", unit="answer")
    rows = []
    try:
        for condition, k, d, heads in conditions:
            ablation = HeadAblation(tuple(heads), method, means).check(model) if heads else None
            acc = needle_accuracy(model, samples, ablation, max_new_tokens=max_new_tokens, progress=bar)
            rows.append({
                "condition": condition, "k": k, "draw": d, "method": method if heads else "none",
                "heads": json.dumps([list(h) for h in heads]), "accuracy": acc["accuracy"],
                "n_correct": acc["n_correct"], "n_samples": acc["n_samples"], "mean_rouge1": acc["mean_rouge1"],
            })
    finally:
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows, columns=list(CAUSAL_COLUMNS))


def summarize_causal(frame: pd.DataFrame) -> dict[str, Any]:
    """Per K: dense, top-K and random accuracies, the drops, and ``ratio = drop_top / drop_random``
    (None when random heads did not lower accuracy; ``drop_top`` then tells the story)."""
    dense_rows = frame[frame["condition"] == "dense"]
    dense = float(dense_rows["accuracy"].iloc[0]) if len(dense_rows) else None
    per_k = {}
    for k in sorted(int(k) for k in frame.loc[frame["condition"] != "dense", "k"].unique()):
        top = frame[(frame["condition"] == "top") & (frame["k"] == k)]["accuracy"]
        rnd = frame[(frame["condition"] == "random") & (frame["k"] == k)]["accuracy"]
        top_acc = float(top.iloc[0])
        rnd_mean = float(rnd.mean()) if len(rnd) else None
        drop_top = None if dense is None else dense - top_acc
        drop_rnd = None if dense is None or rnd_mean is None else dense - rnd_mean
        ratio = drop_top / drop_rnd if drop_top is not None and drop_rnd and drop_rnd > 0 else None
        per_k[str(k)] = {
            "dense": dense, "top": top_acc, "random": [float(x) for x in rnd], "random_mean": rnd_mean,
            "drop_top": drop_top, "drop_random": drop_rnd, "ratio": ratio,
        }
    return {"dense_accuracy": dense, "method": next((m for m in frame["method"] if m != "none"), None), "per_k": per_k}
