"""Retrieval heads: which attention heads copy the needle into the answer (Wu et al., 2024).

The retrieval score of a head is measured while the model answers a needle-in-a-haystack
question (`attnlab.probes.needle`). At every decoding step the newest query of each head
attends most to one context position (the argmax of its attention row). If that position lies
inside the needle's value span and the token there is the token the model just generated, the
head *copied* that token, and it earns ``1 / len(needle)``. A sample's score for a head is the sum
over the steps of its answer; only samples the model answers correctly count (Wu et al.'s filter:
ROUGE-1 recall of the value in the answer > 0.5); the head's retrieval score is the mean over the
counted samples, in [0, 1] when the answer copies each needle token once. Wu et al. call a head
with score ≥ 0.1 a retrieval head (`RETRIEVAL_THRESHOLD`).

Two modes, both read only the attention rows the score needs, from the post-RoPE queries and
keys (the argmax of a softmax row is the argmax of its logits ``q·k``, so no softmax is needed):

- ``greedy`` (Wu et al.): the model generates its answer greedily; the rows are the newest query
  of each decoding step; the copied token is the one just generated.
- ``teacher``: one forward over prompt + correct value; the rows are those that predict each value
  token; the copied token is the teacher-forced one. A sample counts when the model's own
  predictions on those rows recover the value (ROUGE-1 recall > 0.5).

`trace_sample` gets both from one pass: a routed forward (SDPA for every output) over
prompt + value, reading the ``len(value) + 1`` rows from the last prompt token on; while the
model's predictions agree with the value, those rows *are* the greedy steps, so greedy decoding
resumes from the first disagreement (the KV cache is cropped there) and reads one row per step.
The first answer token comes from the prompt's last row and is scored too (Wu et al.'s script
skips it because its prefill runs FlashAttention; the definition covers every generated token).

Scores are per query head and per KV head (max over the query heads of the GQA group, head type
``retrieval_kv`` with ``head = -1``). `probe_retrieval` runs the whole probe for the CLI: needle
suite, scores, split-half stability, the causal check (`attnlab.probes.causal`) and the run's
artifacts (`attnlab.runs`: ``DETECTIONS``, ``NEEDLE_RESULTS``, ``RETRIEVAL_TRACE``,
``CAUSAL_CHECK``, ``CAUSAL_SUMMARY``, ``RETRIEVAL_SUMMARY``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab.attention import check_routable, route_attention
from attnlab.models import forward_with_cache
from attnlab.runs import (
    CAUSAL_CHECK,
    CAUSAL_SUMMARY,
    NEEDLE_RESULTS,
    RETRIEVAL_SUMMARY,
    RETRIEVAL_TRACE,
    Run,
    ensure_run,
    preflight_run,
)

from .base import ProbeError, ProbeResult
from .detections import detection_frame, write_detections
from .needle import (
    NEEDLE_KINDS,
    NeedleSample,
    attention_output,
    contains_answer,
    continue_greedy,
    default_max_new_tokens,
    make_stop,
    needle_samples,
    rouge1_recall,
)

MODES = ("greedy", "teacher")
RETRIEVAL_THRESHOLD = 0.1
#: ROUGE-1 recall above which a sample counts (Wu et al.'s filter).
COUNT_THRESHOLD = 0.5

#: The manifest stage this probe records.
STAGE = "probe:retrieval"

_ERR_MODE = "retrieval mode must be one of {modes}, got {mode!r}"
_ERR_TRACE_SHAPE = "argmax trace has {steps} steps but {tokens} tokens: one token per step is needed"
_ERR_K = (
    "causal check K={k} is too large for {model}'s {total} heads: ablating the top {k} and {k} "
    "random other heads needs K ≤ {half}; lower --causal-ks"
)
_ERR_DRAWS = "draws must be at least 1, got {draws}"
_ERR_NO_SAMPLES = "no needle samples to score: give at least one length, depth and kind"
_ERR_SHARD_CAUSAL = ("--shard can't run the causal check (it ablates the top heads ranked over every sample): "
                     "give --causal-k '' with --shard, or run it without --shard")


# ---------------------------------------------------------------------------------------
# the score's arithmetic
# ---------------------------------------------------------------------------------------
def retrieval_hits(
    argmax: torch.Tensor, tokens: Sequence[int], context_ids: torch.Tensor, needle_span: tuple[int, int]
) -> torch.Tensor:
    """Copy events of one sample: ``[steps, layers, heads]`` bool.

    Args:
        argmax: ``[steps, layers, heads]`` int64, the key position each head's newest query
            attends to most at each step.
        tokens: ``[steps]`` the token produced at each step (generated or teacher-forced).
        context_ids: ``[n]`` (or ``[1, n]``) the prompt's token ids.
        needle_span: ``(start, end)`` token positions of the needle value.
    """
    steps = argmax.shape[0]
    if len(tokens) != steps:
        raise ValueError(_ERR_TRACE_SHAPE.format(steps=steps, tokens=len(tokens)))
    ctx = context_ids.reshape(-1).to(argmax.device)
    start, end = needle_span
    inside = (argmax >= start) & (argmax < end)
    attended = ctx[argmax.clamp(0, ctx.numel() - 1)]
    produced = torch.as_tensor(list(tokens), dtype=ctx.dtype, device=argmax.device).view(steps, 1, 1)
    return inside & (attended == produced)


def retrieval_sample_score(
    argmax: torch.Tensor, tokens: Sequence[int], context_ids: torch.Tensor, needle_span: tuple[int, int]
) -> torch.Tensor:
    """One sample's retrieval score per head, ``[layers, heads]``: copy events / len(needle)."""
    start, end = needle_span
    hits = retrieval_hits(argmax, tokens, context_ids, needle_span)
    return hits.sum(0).to(torch.float32) / float(end - start)


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant."""
    a = pd.Series(np.asarray(a, dtype=np.float64).ravel()).rank().to_numpy()
    b = pd.Series(np.asarray(b, dtype=np.float64).ravel()).rank().to_numpy()
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------
# tracing one sample
# ---------------------------------------------------------------------------------------
@dataclass
class RetrievalTrace:
    """What one sample's scoring pass saw.

    Attributes:
        greedy_ids: ``[S]`` the greedy answer's tokens.
        greedy_argmax: ``[S, layers, heads]`` argmax key position of each step's newest query.
        teacher_ids: ``[T]`` the correct answer's tokens, teacher-forced (`NeedleSample.target_ids`).
        teacher_argmax: ``[T, layers, heads]`` argmax key of the row predicting each value token.
        teacher_pred: ``[T]`` the model's own argmax prediction on those rows.
        seconds: wall time of the pass.
    """

    sample: str
    needle_span: tuple[int, int]
    greedy_ids: list[int]
    greedy_argmax: torch.Tensor
    greedy_text: str
    teacher_ids: list[int]
    teacher_argmax: torch.Tensor
    teacher_pred: list[int]
    teacher_text: str
    seconds: float

    def tokens(self, mode: str) -> list[int]:
        return self.greedy_ids if mode == "greedy" else self.teacher_ids

    def argmax(self, mode: str) -> torch.Tensor:
        return self.greedy_argmax if mode == "greedy" else self.teacher_argmax

    def text(self, mode: str) -> str:
        return self.greedy_text if mode == "greedy" else self.teacher_text


def argmax_keys(query: torch.Tensor, key: torch.Tensor, rows: int) -> torch.Tensor:
    """Argmax key of the last ``rows`` queries of each head, from q and k (causal, GQA-aware).

    Args:
        query: ``[heads, n_q, d]`` post-RoPE queries; they sit at the last ``n_q`` of the
            ``n_k`` positions.
        key: ``[kv_heads, n_k, d]`` post-RoPE keys (cache included).
    Returns:
        ``[rows, heads]`` int64 key positions. Only ``heads × rows × n_k`` logits are formed.
    """
    h, n_q, d = query.shape
    kv, n_k, _ = key.shape
    group = h // kv
    q = query[:, n_q - rows :, :].to(torch.float32).reshape(kv, group * rows, d)
    logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)).view(h, rows, n_k)
    pos = torch.arange(n_k - rows, n_k, device=query.device)[:, None]
    future = torch.arange(n_k, device=query.device)[None, :] > pos
    logits.masked_fill_(future, float("-inf"))
    return logits.argmax(-1).transpose(0, 1)


class _ArgmaxRecorder:
    """The routed attention function: SDPA output, plus the argmax of the last ``rows`` query
    rows of every head when ``rows > 0``; optionally ablates heads."""

    def __init__(self, n_layers: int, n_heads: int, ablation=None):
        self.rows = 0
        self.ablation = ablation
        self.buffer: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, layer: int, query, key, value, *, scaling: float, attention_mask=None, variant=None) -> torch.Tensor:
        out = attention_output(query, key, value, scaling=scaling, variant=variant)
        if self.rows:
            self.buffer[layer] = argmax_keys(query[0], key[0], self.rows)
        if self.ablation is not None:
            out = self.ablation.apply(layer, out, value)
        return out

    def take(self) -> torch.Tensor:
        """``[rows, layers, heads]`` from the last forward."""
        out = torch.stack([b for b in self.buffer], dim=1)  # type: ignore[misc]
        self.buffer = [None] * len(self.buffer)
        return out.cpu()


@torch.inference_mode()
def trace_sample(
    model, sample: NeedleSample, *, max_new_tokens: int | None = None, ablation=None
) -> RetrievalTrace:
    """Score-ready trace of one sample in both modes, from one routed pass (see the module doc).

    ``ablation``: an optional `attnlab.probes.ablation.HeadAblation` active during the pass.
    """
    from transformers import DynamicCache

    t0 = time.perf_counter()
    limit = max_new_tokens or default_max_new_tokens(sample)
    prompt = sample.input_ids.to(model.device)
    answer = list(sample.target_ids)
    n_answer = len(answer)
    recorder = _ArgmaxRecorder(model.n_layers, model.n_heads, ablation)
    stop = make_stop(model, sample)
    with route_attention(model, recorder):
        cache = DynamicCache(config=model.hf_model.config)
        full = torch.cat([prompt, torch.tensor([answer], device=model.device)], dim=1)
        recorder.rows = n_answer + 1
        logits = forward_with_cache(model.hf_model, full, cache, logits_to_keep=n_answer + 1).logits
        rows_argmax = recorder.take()  # [T + 1, layers, heads]
        pred = logits[0].argmax(-1).tolist()  # row t predicts position n_prompt + t
        # The greedy answer follows the value while the predictions agree with it.
        agree = 0
        while agree < n_answer and pred[agree] == answer[agree]:
            agree += 1
        greedy: list[int] = []
        steps = []
        for s in range(agree + 1):
            greedy.append(pred[s])
            steps.append(rows_argmax[s])
            if len(greedy) >= limit or stop(greedy):
                break
        else:
            cache.crop(-(n_answer - agree))  # keep prompt + the agreeing value tokens
            recorder.rows = 1
            last = greedy.pop()

            def on_step(token: int) -> None:
                steps.append(recorder.take()[0])

            continue_greedy(model, cache, last, max_new_tokens=limit, generated=greedy, stop=stop, on_step=on_step)
    tok = model.tokenizer
    return RetrievalTrace(
        sample=sample.name,
        needle_span=tuple(sample.needle_span),
        greedy_ids=greedy,
        greedy_argmax=torch.stack(steps) if steps else torch.zeros(0, model.n_layers, model.n_heads, dtype=torch.long),
        greedy_text=tok.decode(greedy, skip_special_tokens=True),
        teacher_ids=answer,
        teacher_argmax=rows_argmax[:n_answer],
        teacher_pred=pred[:n_answer],
        teacher_text=tok.decode(pred[:n_answer], skip_special_tokens=True),
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------
# scores over a suite
# ---------------------------------------------------------------------------------------
@dataclass
class RetrievalScores:
    """Retrieval scores of one mode over a suite.

    Attributes:
        per_sample: ``[samples, layers, heads]`` each sample's score (counted or not).
        hits: ``[samples, layers, heads]`` int, copy events per sample.
        counted: ``[samples]`` whether the sample passed the ROUGE-1 filter.
        score: ``[layers, heads]`` mean of ``per_sample`` over the counted samples (0 if none).
    """

    mode: str
    names: list[str]
    per_sample: torch.Tensor
    hits: torch.Tensor
    counted: list[bool]
    rouge1: list[float]

    @property
    def n_counted(self) -> int:
        return int(sum(self.counted))

    @property
    def score(self) -> torch.Tensor:
        mask = torch.tensor(self.counted, dtype=torch.bool)
        if not mask.any():
            return torch.zeros(self.per_sample.shape[1:])
        return self.per_sample[mask].mean(0)

    def kv_score(self, group: int) -> torch.Tensor:
        """``[layers, kv_heads]``: max of `score` over each GQA group of ``group`` query heads."""
        s = self.score
        return s.view(s.shape[0], -1, group).amax(-1)

    def ranking(self) -> list[tuple[int, int]]:
        """All ``(layer, head)`` pairs, best score first (ties: lower layer, then head)."""
        s = self.score
        order = sorted((-float(s[layer, h]), layer, h) for layer in range(s.shape[0]) for h in range(s.shape[1]))
        return [(layer, h) for _, layer, h in order]

    def split_half(self, seed: int = 0) -> float | None:
        """Spearman between the per-head scores of two disjoint random halves of the counted
        samples; None with fewer than 2 counted samples or a constant half."""
        idx = [i for i, c in enumerate(self.counted) if c]
        if len(idx) < 2:
            return None
        random.Random(seed).shuffle(idx)
        half = len(idx) // 2
        a = self.per_sample[idx[:half]].mean(0)
        b = self.per_sample[idx[half : 2 * half]].mean(0)
        return spearman(a, b)


def score_traces(traces: Sequence[RetrievalTrace], samples: Sequence[NeedleSample], mode: str) -> RetrievalScores:
    """Score traces in one mode: per-sample scores, copy events and the counting filter."""
    if mode not in MODES:
        raise ProbeError(_ERR_MODE.format(modes=list(MODES), mode=mode))
    per_sample, hits, counted, rouge = [], [], [], []
    for trace, sample in zip(traces, samples, strict=True):
        h = retrieval_hits(trace.argmax(mode), trace.tokens(mode), sample.input_ids, sample.needle_span)
        span = sample.needle_span[1] - sample.needle_span[0]
        hits.append(h.sum(0))
        per_sample.append(h.sum(0).to(torch.float32) / span)
        r = rouge1_recall(sample.answer, trace.text(mode))
        rouge.append(r)
        counted.append(r > COUNT_THRESHOLD)
    return RetrievalScores(mode, [s.name for s in samples], torch.stack(per_sample), torch.stack(hits), counted, rouge)


def detection_rows(scores: RetrievalScores, model, *, probe: str | None = None) -> pd.DataFrame:
    """Detections for every query head (``retrieval``) and KV head (``retrieval_kv``, head -1)."""
    probe = probe or f"needle:{scores.mode}"
    s = scores.score
    counted = [n for n, c in zip(scores.names, scores.counted, strict=True) if c]
    mask = torch.tensor(scores.counted, dtype=torch.bool)
    rows = []
    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            per = scores.per_sample[:, layer, h]
            hit_samples = [name for i, name in enumerate(scores.names) if mask[i] and per[i] > 0]
            rows.append({
                "layer": layer, "head": h, "kv_head": model.kv_head(h), "head_type": "retrieval",
                "score": float(s[layer, h]), "probe": probe,
                "evidence": {
                    "mode": scores.mode, "counted": len(counted), "samples": len(scores.names),
                    "hits": int(scores.hits[mask, layer, h].sum()) if mask.any() else 0,
                    "hit_samples": hit_samples, "threshold": RETRIEVAL_THRESHOLD,
                    "retrieval_head": bool(s[layer, h] >= RETRIEVAL_THRESHOLD),
                },
            })
    kv = scores.kv_score(model.group_size)
    for layer in range(model.n_layers):
        for g in range(model.n_kv_heads):
            group = [h for h in range(model.n_heads) if model.kv_head(h) == g]
            best = max(group, key=lambda h: (float(s[layer, h]), -h))
            rows.append({
                "layer": layer, "head": -1, "kv_head": g, "head_type": "retrieval_kv",
                "score": float(kv[layer, g]), "probe": probe,
                "evidence": {"mode": scores.mode, "counted": len(counted), "group": group, "best_head": best,
                             "reduction": "max", "threshold": RETRIEVAL_THRESHOLD},
            })
    return detection_frame(rows)


def results_frame(samples: Sequence[NeedleSample], traces: Sequence[RetrievalTrace]) -> pd.DataFrame:
    """The needle results table (`attnlab.runs.NEEDLE_RESULTS`): one row per sample, graded in both modes."""
    rows = []
    for s, t in zip(samples, traces, strict=True):
        rouge = rouge1_recall(s.answer, t.greedy_text)
        t_rouge = rouge1_recall(s.answer, t.teacher_text)
        rows.append({
            "sample": s.name, "length": s.context_length, "n_tokens": s.n_tokens, "depth": s.depth,
            "kind": s.kind, "answer": s.answer, "generated": t.greedy_text,
            "correct": contains_answer(s.answer, t.greedy_text), "rouge1": rouge, "counted": rouge > COUNT_THRESHOLD,
            "teacher_prediction": t.teacher_text, "teacher_rouge1": t_rouge, "teacher_counted": t_rouge > COUNT_THRESHOLD,
            "needle_start": s.needle_span[0], "needle_end": s.needle_span[1], "haystack": s.haystack,
            "seconds": t.seconds,
        })
    return pd.DataFrame(rows)


def trace_frame(samples: Sequence[NeedleSample], traces: Sequence[RetrievalTrace]) -> pd.DataFrame:
    """The retrieval trace table (`attnlab.runs.RETRIEVAL_TRACE`): per sample, mode, step and head, the argmax key position,
    the token there, the token produced, and whether that was a copy from the needle."""
    parts = []
    for s, t in zip(samples, traces, strict=True):
        ctx = s.input_ids.reshape(-1)
        for mode in MODES:
            argmax = t.argmax(mode)
            steps = argmax.shape[0]
            if steps == 0:
                continue
            hits = retrieval_hits(argmax, t.tokens(mode), ctx, s.needle_span)
            layers, heads = argmax.shape[1:]
            step_idx, layer_idx, head_idx = np.meshgrid(np.arange(steps), np.arange(layers), np.arange(heads), indexing="ij")
            produced = np.asarray(t.tokens(mode))[step_idx.ravel()]
            pos = argmax.reshape(-1).numpy()
            parts.append(pd.DataFrame({
                "sample": s.name, "mode": mode, "step": step_idx.ravel().astype(np.int32),
                "layer": layer_idx.ravel().astype(np.int16), "head": head_idx.ravel().astype(np.int16),
                "position": pos.astype(np.int32), "token_at_position": ctx[argmax.clamp(0, ctx.numel() - 1)].reshape(-1).numpy(),
                "token": produced, "in_needle": ((pos >= s.needle_span[0]) & (pos < s.needle_span[1])),
                "hit": hits.reshape(-1).numpy(),
            }))
    if not parts:
        return pd.DataFrame(columns=["sample", "mode", "step", "layer", "head", "position", "token_at_position", "token", "in_needle", "hit"])
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------
# the probe, end to end
# ---------------------------------------------------------------------------------------
def _check_causal(model, causal_ks: Sequence[int], draws: int) -> None:
    total = model.n_layers * model.n_heads
    for k in causal_ks:
        if int(k) < 1 or 2 * int(k) > total:
            raise ProbeError(_ERR_K.format(k=k, model=model.name, total=total, half=total // 2))
    if causal_ks and draws < 1:
        raise ProbeError(_ERR_DRAWS.format(draws=draws))


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="sample")


def probe_retrieval(
    model,
    out: str | Path,
    *,
    lengths: Sequence[int] = (512, 1024),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    kinds: Sequence[str] = NEEDLE_KINDS,
    n_samples: int | None = None,
    mode: str = "greedy",
    haystack: str | Path | None = None,
    causal_ks: Sequence[int] = (5, 10, 20),
    draws: int = 3,
    ablation: str = "zero",
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    shard=None,
) -> ProbeResult:
    """The retrieval probe, end to end: scores, evidence, top heads and the causal check.

    Args:
        model: a `LoadedModel`.
        out: the run directory (created, or added to when it holds a run of the same model).
        lengths, depths, kinds, n_samples, haystack: the needle suite (see
            `attnlab.probes.needle.needle_samples`); ``n_samples=None`` = the whole grid.
        mode: which score goes into the detections: ``greedy`` (Wu et al.) or
            ``teacher``; both are computed (one pass) and their Spearman is in the summary.
        causal_ks, draws, ablation: the causal check — for each K, accuracy with the top-K heads
            ablated (``zero``, ``mean`` or ``uniform``) against ``draws`` sets of K random other
            heads; ``()`` skips it.
        max_new_tokens: cap on answer length (default: value tokens + 6).
        seed: seeds the suite and the random heads.
        progress: tqdm bars over samples.
        shard: an `attnlab.shards.Shard`: score only its share of the suite (round-robin) into
            a shard run for `attnlab merge` (`merge_retrieval_shards`); the causal check needs
            the ranking over every sample, so it is refused with a shard (``causal_ks=()``).

    Everything is validated before any model work (suite, context lengths, output directory,
    K values); a mistake raises a `ProbeError` (an `AttnlabError`) and writes nothing.

    Returns:
        A `ProbeResult`: ``detections`` (the rows this probe added), ``summary``, ``tables``
        ``needle_results``, ``retrieval_trace`` and ``causal_check`` (empty when skipped), and
        ``extras`` ``scores`` (`RetrievalScores` per mode), ``traces`` and ``samples``.
    """
    if mode not in MODES:
        raise ProbeError(_ERR_MODE.format(modes=list(MODES), mode=mode))
    if shard is not None and causal_ks:
        raise ProbeError(_ERR_SHARD_CAUSAL)
    check_routable(model)
    preflight_run(out, model)
    _check_causal(model, causal_ks, draws)
    samples = needle_samples(
        model, lengths=lengths, depths=depths, kinds=kinds, n_samples=n_samples, haystack=haystack, seed=seed
    )
    if not samples:
        raise ProbeError(_ERR_NO_SAMPLES)
    params = {
        "lengths": [int(n) for n in lengths], "depths": [float(d) for d in depths], "kinds": list(kinds),
        "n_samples": len(samples), "mode": mode, "haystack": None if haystack is None else str(haystack),
        "causal_ks": [int(k) for k in causal_ks], "draws": int(draws), "ablation": ablation,
        "max_new_tokens": max_new_tokens, "seed": int(seed),
    }
    means = _ablation_means(model, lengths, seed) if ablation == "mean" and causal_ks else None
    total = len(samples)
    if shard is not None:
        from attnlab.shards import check_share

        samples = check_share(shard, samples)

    t0 = time.perf_counter()
    traces = [trace_sample(model, s, max_new_tokens=max_new_tokens) for s in _progress(samples, progress, "retrieval score")]
    score_seconds = time.perf_counter() - t0
    scores = {m: score_traces(traces, samples, m) for m in MODES}
    primary = scores[mode]
    detections = detection_rows(primary, model)
    results = results_frame(samples, traces)

    causal = pd.DataFrame()
    causal_summary: dict[str, Any] = {}
    if causal_ks:
        from .causal import causal_check, summarize_causal

        causal = causal_check(
            model, samples, primary.ranking(), ks=causal_ks, draws=draws, method=ablation, means=means,
            seed=seed, max_new_tokens=max_new_tokens, progress=progress,
        )
        causal_summary = summarize_causal(causal)

    summary = retrieval_summary(model, scores, mode, results, seed=seed, seconds_per_sample=score_seconds / len(samples),
                                causal=causal_summary)
    tables = {NEEDLE_RESULTS.key: results, RETRIEVAL_TRACE.key: trace_frame(samples, traces), CAUSAL_CHECK.key: causal}
    run = ensure_run(out, model.identity(), STAGE, params)
    _write_retrieval(run, detections, tables, summary, causal_summary if causal_ks else None)
    if shard is not None:
        from attnlab.shards import mark_shard

        mark_shard(run, shard.record(STAGE, params, [s.name for s in samples], total, seconds=score_seconds,
                                     unit_seconds=[t.seconds for t in traces]))
    return ProbeResult(run, detections, summary, tables, {"scores": scores, "traces": traces, "samples": samples})


def _ablation_means(model, lengths: Sequence[int], seed: int) -> torch.Tensor:
    """Per-head mean outputs for mean ablation, from a few generated prompts."""
    from attnlab.prompts import builtin_prompts

    from .ablation import head_means

    return head_means(model, builtin_prompts(model.tokenizer, [min(lengths)], 4, seed=seed + 1, kinds=["narrative"]))


def retrieval_summary(
    model, scores: dict[str, RetrievalScores], mode: str, results: pd.DataFrame, *, seed: int,
    seconds_per_sample: float, causal: dict[str, Any],
) -> dict[str, Any]:
    """The probe's summary (`attnlab.runs.RETRIEVAL_SUMMARY`): accuracy overall and by length,
    depth and kind, the top 20 heads of ``mode``, how many reach `RETRIEVAL_THRESHOLD`, the
    split-half and between-mode Spearman, the time per sample and the causal check's summary."""
    primary = scores[mode]
    score = primary.score
    top = [
        {"layer": layer, "head": h, "kv_head": model.kv_head(h), "score": round(float(score[layer, h]), 6)}
        for layer, h in primary.ranking()[:20]
    ]
    return {
        "mode": mode,
        "samples": len(results),
        "accuracy": float(results["correct"].mean()),
        "mean_rouge1": float(results["rouge1"].mean()),
        "counted": {m: scores[m].n_counted for m in MODES},
        "accuracy_by": {
            key: {str(k): float(v) for k, v in results.groupby(key)["correct"].mean().items()}
            for key in ("length", "depth", "kind")
        },
        "top_heads": top,
        "retrieval_heads": int((score >= RETRIEVAL_THRESHOLD).sum()),
        "threshold": RETRIEVAL_THRESHOLD,
        "nonzero_heads": int((score > 0).sum()),
        "split_half_spearman": {m: scores[m].split_half(seed) for m in MODES},
        "mode_spearman": spearman(scores["greedy"].score, scores["teacher"].score),
        "seconds_per_sample": seconds_per_sample,
        "causal": causal,
    }


def _write_retrieval(
    run: Run, detections: pd.DataFrame, tables: dict[str, pd.DataFrame], summary: dict[str, Any],
    causal_summary: dict[str, Any] | None,
) -> None:
    """Write the probe's artifacts into ``run`` (detections merged with the run's). The causal
    tables are written only when the check ran (``causal_summary`` not None)."""
    write_detections(run, detections)
    run.write(NEEDLE_RESULTS, tables[NEEDLE_RESULTS.key])
    run.write(RETRIEVAL_TRACE, tables[RETRIEVAL_TRACE.key])
    if causal_summary is not None:
        run.write(CAUSAL_CHECK, tables[CAUSAL_CHECK.key])
        run.write(CAUSAL_SUMMARY, causal_summary)
    stored = json.loads(json.dumps(summary, default=float))
    run.write(RETRIEVAL_SUMMARY, stored)
    run.record_stage(STAGE, summary=stored)


# ---------------------------------------------------------------------------------------
# merging shards
# ---------------------------------------------------------------------------------------
class _Heads:
    """The head layout `detection_rows` and `retrieval_summary` read, from a run's identity."""

    def __init__(self, identity):
        self.n_layers, self.n_heads, self.n_kv_heads = int(identity.n_layers), int(identity.n_heads), int(identity.n_kv_heads)
        self.group_size = self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        return head // self.group_size


def _scores_from_tables(results: pd.DataFrame, trace: pd.DataFrame, heads: _Heads, mode: str) -> RetrievalScores:
    """`score_traces` again from the stored tables: copy events per sample and head from the
    trace, the counting filter from the results (the same numbers, bit for bit)."""
    names = [str(n) for n in results["sample"]]
    hits = torch.zeros(len(names), heads.n_layers, heads.n_heads, dtype=torch.int64)
    rows = trace[(trace["mode"] == mode) & trace["hit"].astype(bool)]
    index = {n: i for i, n in enumerate(names)}
    for (sample, layer, head), n in rows.groupby(["sample", "layer", "head"]).size().items():
        hits[index[str(sample)], int(layer), int(head)] = int(n)
    span = torch.tensor((results["needle_end"] - results["needle_start"]).to_numpy(), dtype=torch.float64)
    per_sample = torch.stack([hits[i].to(torch.float32) / float(span[i]) for i in range(len(names))])
    counted_col, rouge_col = ("counted", "rouge1") if mode == "greedy" else ("teacher_counted", "teacher_rouge1")
    return RetrievalScores(mode, names, per_sample, hits, [bool(c) for c in results[counted_col]],
                           [float(r) for r in results[rouge_col]])


def merge_retrieval_shards(shards: list[Run], merged: Run) -> None:
    """`attnlab merge` of ``probe retrieval`` shards (made with ``--causal-k ''``): results and
    trace in the single-process sample order; scores, detections and the summary recomputed
    from them (what one process would have written; ``seconds_per_sample`` is the mean of the
    samples' own times)."""
    from attnlab.shards import full_order

    position = full_order(shards)

    def ordered(frames: list[pd.DataFrame]) -> pd.DataFrame:
        table = pd.concat(frames, ignore_index=True)
        return table.iloc[table["sample"].map(position).argsort(kind="stable")].reset_index(drop=True)

    results = ordered([run.read(NEEDLE_RESULTS) for run in shards])
    trace = ordered([run.read(RETRIEVAL_TRACE) for run in shards])
    params = merged.manifest["parameters"]
    heads = _Heads(merged.identity)
    scores = {m: _scores_from_tables(results, trace, heads, m) for m in MODES}
    mode = params["mode"]
    detections = detection_rows(scores[mode], heads)
    summary = retrieval_summary(heads, scores, mode, results, seed=int(params["seed"]),
                                seconds_per_sample=float(results["seconds"].mean()), causal={})
    _write_retrieval(merged, detections, {NEEDLE_RESULTS.key: results, RETRIEVAL_TRACE.key: trace}, summary, None)
