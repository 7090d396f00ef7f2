"""``attnlab eval``: dense attention and sparse policies on the same task samples, paired.

Every sample of the task suite (`attnlab.tasks`) is answered greedily once densely and once
under each policy (sparse prefill through an executor, dense decode — as the policies run
today), graded by RULER's string match, and stored one row per (sample, method). The summary
gives per task, length and method: the mean score with a 95% bootstrap interval, the achieved
prefill density, and the paired outcome against dense on the same samples (both right, only
dense, only sparse, neither) — the honest comparison on few samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.attention import route_attention
from attnlab.models import LoadedModel
from attnlab.probes.needle import continue_greedy, stop_token_ids
from attnlab.tasks import TaskSample

from .executors import PolicyExecutor
from .policy import Policy

DENSE = "dense"
SAMPLE_COLUMNS = ("sample", "task", "length", "n_tokens", "method", "score", "correct", "density", "reply")
BOOTSTRAP = 2000


def _stop(model: LoadedModel, sample: TaskSample) -> Callable[[list[int]], bool]:
    """End of turn, every reference found, or (one-answer tasks) a finished line."""
    eos = stop_token_ids(model)

    def stop(generated: list[int]) -> bool:
        if generated[-1] in eos:
            return True
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        if sample.score(text) == 1.0:
            return True
        return len(sample.answers) == 1 and "\n" in text.strip()

    return stop


@torch.no_grad()
def answer(model: LoadedModel, sample: TaskSample, executor: PolicyExecutor | None = None) -> tuple[str, float]:
    """``(reply, prefill density)``: greedy decoding after a dense or a sparse prefill."""
    from transformers import DynamicCache

    with route_attention(model, None if executor is None else executor.attention):
        cache = DynamicCache(config=model.hf_model.config)
        ids = sample.input_ids.to(model.device)
        logits = model.hf_model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        generated = continue_greedy(model, cache, int(logits[0, -1].argmax()),
                                    max_new_tokens=sample.max_new_tokens, generated=[], stop=_stop(model, sample))
    text = model.tokenizer.decode(generated, skip_special_tokens=True)
    if executor is None:
        return text, 1.0
    layouts = list(executor.layouts_.values())
    density = float(torch.cat([lay.density.float().flatten() for lay in layouts]).mean()) if layouts else float("nan")
    return text, density


def evaluate(model: LoadedModel, samples: Sequence[TaskSample], policies: Mapping[str, Policy], *,
             executor: str = "flex", progress: bool = True) -> pd.DataFrame:
    """One row per (sample, method): dense first, then each policy by its name."""
    executors = {}
    for name, policy in policies.items():
        ex = PolicyExecutor(policy, executor)
        ex.check_model(model, name)
        executors[name] = ex
    rows: list[dict[str, Any]] = []
    methods: list[tuple[str, PolicyExecutor | None]] = [(DENSE, None), *executors.items()]
    bar = tqdm(total=len(samples) * len(methods), desc="eval", unit="answer", disable=not progress)
    for sample in samples:
        for method, ex in methods:
            reply, density = answer(model, sample, ex)
            score = sample.score(reply)
            rows.append({"sample": sample.name, "task": sample.task, "length": sample.context_length,
                         "n_tokens": sample.n_tokens, "method": method, "score": score,
                         "correct": score == 1.0, "density": density, "reply": reply})
            bar.update()
    bar.close()
    return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the same data give the same interval)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_counts(dense: Sequence[bool], sparse: Sequence[bool]) -> dict[str, int]:
    """How the same samples fared: both right, only dense right, only sparse right, neither."""
    d = np.asarray(dense, dtype=bool)
    s = np.asarray(sparse, dtype=bool)
    if d.shape != s.shape:
        raise ValueError(f"paired outcomes need the same samples: {d.shape} vs {s.shape}")
    return {"both": int((d & s).sum()), "only_dense": int((d & ~s).sum()),
            "only_sparse": int((~d & s).sum()), "neither": int((~d & ~s).sum())}


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """Per (task, length, method): n, mean score with its 95% interval, accuracy (all references
    found), mean density, and the paired outcome against dense on the same samples."""
    rows = []
    for (task, length), group in samples.groupby(["task", "length"], sort=False):
        dense = group[group.method == DENSE].set_index("sample")
        for method, part in group.groupby("method", sort=False):
            part = part.set_index("sample")
            lo, hi = bootstrap_ci(part.score.to_numpy())
            row = {"task": task, "length": int(length), "method": method, "n": len(part),
                   "score": float(part.score.mean()), "ci_low": lo, "ci_high": hi,
                   "accuracy": float(part.correct.mean()), "density": float(part.density.mean())}
            if method != DENSE and len(dense):
                common = part.index.intersection(dense.index)
                row.update(paired_counts(dense.loc[common, "correct"], part.loc[common, "correct"]))
            rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """A plain-text table: one line per task, length and method."""
    lines = [f"{'task':<18} {'length':>6} {'method':<16} {'n':>4} {'score':>6} {'95% CI':>15} {'density':>8}  paired vs dense"]
    for r in summary.itertuples():
        paired = "" if r.method == DENSE else (
            f"both {r.both}, only dense {r.only_dense}, only sparse {r.only_sparse}, neither {r.neither}")
        lines.append(f"{r.task:<18} {r.length:>6} {r.method:<16} {r.n:>4} {r.score:>6.3f} "
                     f"[{r.ci_low:.3f}, {r.ci_high:.3f}] {r.density:>8.3f}  {paired}")
    return "\n".join(lines)


def merge_eval_shards(shards: list, merged) -> None:
    """`attnlab merge` of ``eval`` shards: the answers in the single-process order, the summary
    recomputed from them (what one process would have written)."""
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY
    from attnlab.shards import full_order

    position = full_order(shards)
    table = pd.concat([run.read(EVAL_SAMPLES) for run in shards], ignore_index=True)
    table = table.iloc[table["sample"].map(position).argsort(kind="stable")].reset_index(drop=True)
    merged.write(EVAL_SAMPLES, table)
    merged.write(EVAL_SUMMARY, summarize(table))
