"""Induction, previous-token, duplicate-token, echo and RazorAttention-induction heads.

The probe feeds the model *repeated random sequences*: a BOS token, then ``seq_len`` distinct
random word tokens, repeated. On such input, the heads that implement in-context copying show
fixed, recognisable patterns (Olsson et al. 2022):

- a **previous-token** head attends from position ``i`` to ``i - 1``;
- a **duplicate-token** head attends from a token to its earlier occurrences;
- an **induction** head attends from a token to the token *after* its earlier occurrences
  (the one it predicts comes next).

Each type is a 0/1 *detection pattern* ``D[i, j]`` over (query, key) pairs, built from the
tokens alone, with the exact definitions of TransformerLens's ``head_detector`` (so the two can
be compared number for number). A head's score is TransformerLens's ``"mul"`` measure

    score = Σ_ij A[i, j] · D[i, j]  /  Σ_ij A[i, j]

over *all* rows of the pattern ``A`` (``Σ A = n``): the fraction of the head's attention that
falls on the pattern. Rows without an earlier copy cannot score, so a perfect induction head on
a sequence repeated twice scores ≈ 0.5, repeated ``r`` times ≈ (r - 1) / r.

RazorAttention (Tang et al. 2024) scores the same two behaviours differently, on a random
sequence repeated 4×: only queries that *have* earlier copies count, and the score is the mean
attention such a query puts on the earlier copies of its own token (**echo**) or on the tokens
after them (**razor_induction**): ``mean_{i: D[i] ≠ 0} Σ_j A[i, j] D[i, j]``, so a perfect head
scores ≈ 1. RazorAttention decides per KV head (a compressed KV cache is shared by the query
heads of a GQA group), so the probe also writes the max over each group's query heads as
``echo_kv`` / ``razor_induction_kv`` rows with ``head = -1``.

Scores are pure functions of ``[..., heads, n, n]`` patterns (`mul_score`, `row_mass_score`,
the ``*_detection`` builders), so they can be checked on constructed patterns; `reduce_patterns`
(`attnlab.probes.base`) runs the model with a hook on every layer's ``hook_pattern`` and reduces
each layer's pattern as it passes. What every detector shares (`ProbeError`, `ProbeResult`,
`rank_stability`, `split_half_stability`) lives in `attnlab.probes.base`.

`tl_detect_head` runs TransformerLens's own ``detect_head`` on the bridge (it accepts it: it
needs ``cfg``, ``to_tokens`` and ``run_with_cache``, which the bridge has) over the same prompts,
so the probe can record its agreement with the reference implementation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attnlab.models import LoadedModel
from attnlab.runs import ensure_run, preflight_run

from .base import (
    ProbeError,
    ProbeResult,
    finite,
    rank_stability,
    reduce_patterns,
    split_half_stability,
)
from .detections import detection_frame, write_detections

#: Head types this probe can score (``which=`` of `probe_repeated`).
REPEATED_TYPES = ("induction", "previous_token", "duplicate_token", "echo", "razor_induction")
#: The three that TransformerLens's ``detect_head`` knows, and its names for them.
TL_HEAD_NAMES = {
    "induction": "induction_head",
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
}
RAZOR_TYPES = ("echo", "razor_induction")
#: The manifest stage this probe records.
STAGE = "probe:repeated"

_ERR_WHICH = "unknown head type(s) {bad} for the repeated-sequence probe: choose from {known}"
_ERR_SEQ_LEN = "--seq-len must be at least 2 distinct tokens, got {seq_len}"
_ERR_REPEATS = "{name} must be at least 2 (a sequence needs an earlier copy), got {repeats}"
_ERR_SAMPLES = "--samples must be positive, got {n}"
_ERR_TOO_LONG = (
    "a repeated sequence of {n} tokens (1 + {seq_len} × {repeats}) exceeds the {n_ctx}-token "
    "context of {model}: lower --seq-len or the number of repeats"
)
_ERR_POOL = (
    "the tokenizer has only {size} distinct usable tokens, fewer than --seq-len {seq_len}: "
    "lower --seq-len"
)


# ---------------------------------------------------------------------------------------
# detection patterns: [n, n] float 0/1, lower triangular, exactly as TransformerLens builds them
# ---------------------------------------------------------------------------------------
def previous_token_detection(n: int) -> torch.Tensor:
    """``D[i, i - 1] = 1`` for ``i ≥ 1``: ``[n, n]``."""
    d = torch.zeros(n, n)
    idx = torch.arange(1, n)
    d[idx, idx - 1] = 1.0
    return d


def duplicate_token_detection(tokens: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = 1`` where ``j < i`` and ``tokens[j] == tokens[i]``: ``[n, n]``.

    Args:
        tokens: ``[n]`` (or ``[1, n]``) token ids.
    """
    t = tokens.reshape(-1)
    eq = (t[:, None] == t[None, :]).to(torch.float32)
    return torch.tril(eq, diagonal=-1)


def induction_detection(tokens: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = 1`` where ``1 ≤ j ≤ i`` and ``tokens[j - 1] == tokens[i]`` with ``j - 1 < i``:
    the token right after an earlier occurrence of the current one. ``[n, n]``."""
    dup = duplicate_token_detection(tokens)
    d = torch.zeros_like(dup)
    d[:, 1:] = dup[:, :-1]
    return torch.tril(d)


def detection_pattern(head_type: str, tokens: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` detection pattern of one head type for ``tokens`` ``[n]``.

    ``echo`` is the duplicate-token pattern and ``razor_induction`` the induction pattern;
    they differ from ``duplicate_token``/``induction`` only in how they are scored.
    """
    t = tokens.reshape(-1)
    if head_type == "previous_token":
        return previous_token_detection(t.numel())
    if head_type in ("duplicate_token", "echo"):
        return duplicate_token_detection(t)
    if head_type in ("induction", "razor_induction"):
        return induction_detection(t)
    raise ProbeError(_ERR_WHICH.format(bad=[head_type], known=list(REPEATED_TYPES)))


# ---------------------------------------------------------------------------------------
# scores: pure functions of patterns
# ---------------------------------------------------------------------------------------
def mul_score(pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """TransformerLens's ``"mul"`` score: ``Σ(A ⊙ D) / ΣA`` over all (query, key) pairs.

    Args:
        pattern: ``[..., n, n]`` attention probabilities (rows sum to 1).
        detection: ``[n, n]`` 0/1 detection pattern.
    Returns:
        ``[...]`` scores in ``[0, 1]``.
    """
    a = pattern.to(torch.float32)
    d = detection.to(a.device, torch.float32)
    return (a * d).sum((-1, -2)) / a.sum((-1, -2))


def row_mass_score(pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """RazorAttention-style score: mean, over the rows where ``D`` has any 1, of the mass the row
    puts on ``D``'s keys. ``pattern`` ``[..., n, n]``, ``detection`` ``[n, n]`` → ``[...]``
    (0 when no row qualifies)."""
    a = pattern.to(torch.float32)
    d = detection.to(a.device, torch.float32)
    rows = d.sum(-1) > 0  # [n]
    if not bool(rows.any()):
        return torch.zeros(a.shape[:-2])
    return (a * d).sum(-1)[..., rows].mean(-1)


def score_pattern(head_type: str, pattern: torch.Tensor, detection: torch.Tensor) -> torch.Tensor:
    """Score ``pattern`` ``[..., n, n]`` for ``head_type``: `row_mass_score` for the
    RazorAttention types, `mul_score` for the others."""
    if head_type in RAZOR_TYPES:
        return row_mass_score(pattern, detection)
    return mul_score(pattern, detection)


def kv_max_pool(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over each GQA group of query heads: ``[..., heads]`` → values and argmax query head,
    both ``[..., kv_heads]``."""
    grouped = scores.reshape(*scores.shape[:-1], -1, group_size)
    values, idx = grouped.max(-1)
    base = torch.arange(grouped.shape[-2]) * group_size
    return values, idx + base


# ---------------------------------------------------------------------------------------
# prompts: repeated random word tokens
# ---------------------------------------------------------------------------------------
@dataclass
class RepeatedSample:
    """One repeated random sequence: ids ``[1, 1 + seq_len * repeats]`` (BOS first when the
    tokenizer has one), the text that tokenizes back to them (``None`` if it does not)."""

    input_ids: torch.Tensor
    seq_len: int
    repeats: int
    text: str | None


def word_token_pool(tokenizer: Any) -> list[int]:
    """Token ids that are a space followed by 3–12 lowercase ASCII letters (``Ġword`` in
    byte-level BPE, ``▁word`` in SentencePiece), and that tokenize back to themselves.

    A sequence of such tokens decodes to plain words and re-tokenizes to the same ids, so the
    same prompt can be given to TransformerLens's string-based ``detect_head``.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = []
    for i, piece in enumerate(pieces):
        if i in special or not isinstance(piece, str) or piece[:1] not in ("Ġ", "▁"):
            continue
        word = piece[1:]
        if 3 <= len(word) <= 12 and word.isascii() and word.isalpha() and word.islower():
            pool.append(i)
    return pool


def repeated_samples(
    tokenizer: Any, *, seq_len: int, repeats: int, n_samples: int, seed: int = 0
) -> list[RepeatedSample]:
    """``n_samples`` sequences ``BOS + s × repeats``, ``s`` being ``seq_len`` distinct word
    tokens drawn from `word_token_pool` (the whole vocabulary if the pool is too small)."""
    pool = word_token_pool(tokenizer)
    round_trip = len(pool) >= seq_len
    if not round_trip:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = [i for i in range(len(tokenizer)) if i not in special]
        if len(pool) < seq_len:
            raise ProbeError(_ERR_POOL.format(size=len(pool), seq_len=seq_len))
    rng = random.Random(seed)
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    samples = []
    for _ in range(n_samples):
        seg = rng.sample(pool, seq_len)
        body = seg * repeats
        text = None
        if round_trip:
            candidate = tokenizer.decode(body)
            if tokenizer(candidate, add_special_tokens=False)["input_ids"] == body:
                text = candidate
        samples.append(RepeatedSample(torch.tensor([prefix + body]), seq_len, repeats, text))
    return samples


def repeated_scores(
    model: LoadedModel,
    samples: Sequence[RepeatedSample],
    which: Sequence[str],
    *,
    progress: bool = False,
    desc: str = "repeated sequences",
) -> dict[str, torch.Tensor]:
    """Per-sample scores ``{head_type: [samples, layers, heads]}`` for the types in ``which``."""
    per_type: dict[str, list[torch.Tensor]] = {t: [] for t in which}
    for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress):
        tokens = sample.input_ids[0]
        detections = {t: detection_pattern(t, tokens).to(model.device) for t in which}

        def reducer(layer: int, pattern: torch.Tensor, detections=detections) -> dict[str, torch.Tensor]:
            return {t: score_pattern(t, pattern, d) for t, d in detections.items()}

        scores = reduce_patterns(model, sample.input_ids, reducer)
        for t in which:
            per_type[t].append(scores[t])
    return {t: torch.stack(v) for t, v in per_type.items()}


def tl_detect_head(model: LoadedModel, samples: Sequence[RepeatedSample], head_type: str) -> torch.Tensor:
    """TransformerLens's ``detect_head`` (``"mul"``, no exclusions) on the samples' texts,
    averaged over samples as it averages a list: ``[layers, heads]``.

    Raises `ProbeError` when a sample has no text that re-tokenizes to its ids (the bridge's
    ``to_tokens`` must see exactly the probe's tokens for the comparison to mean anything).
    """
    from transformer_lens.head_detector import detect_head

    if head_type not in TL_HEAD_NAMES:
        raise ProbeError(f"TransformerLens detects only {list(TL_HEAD_NAMES)}, not {head_type!r}")
    texts = []
    for s in samples:
        if s.text is None or not torch.equal(model.bridge.to_tokens(s.text).cpu(), s.input_ids):
            raise ProbeError("a repeated sample does not round-trip through the bridge's to_tokens; cannot compare with TransformerLens")
        texts.append(s.text)
    with torch.no_grad():
        scores = [detect_head(model.bridge, t, TL_HEAD_NAMES[head_type]) for t in texts]
    return torch.stack(scores).mean(0).to(torch.float32)


# ---------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------
def _check_repeated_args(model: LoadedModel, which: Sequence[str], seq_len: int, repeats: int, razor_repeats: int, n_samples: int) -> None:
    bad = [t for t in which if t not in REPEATED_TYPES]
    if bad or not which:
        raise ProbeError(_ERR_WHICH.format(bad=bad or "(none)", known=list(REPEATED_TYPES)))
    if seq_len < 2:
        raise ProbeError(_ERR_SEQ_LEN.format(seq_len=seq_len))
    for name, r in (("--repeats", repeats), ("razor_repeats", razor_repeats)):
        if r < 2:
            raise ProbeError(_ERR_REPEATS.format(name=name, repeats=r))
    if n_samples < 1:
        raise ProbeError(_ERR_SAMPLES.format(n=n_samples))
    used = [repeats] if set(which) - set(RAZOR_TYPES) else []
    used += [razor_repeats] if set(which) & set(RAZOR_TYPES) else []
    longest = max(used)
    n = 1 + seq_len * longest
    if n > model.n_ctx:
        raise ProbeError(_ERR_TOO_LONG.format(n=n, seq_len=seq_len, repeats=longest, n_ctx=model.n_ctx, model=model.name))


def probe_repeated(
    model: LoadedModel,
    out: str | Path,
    *,
    which: Sequence[str] = REPEATED_TYPES,
    seq_len: int = 50,
    repeats: int = 2,
    razor_repeats: int = 4,
    n_samples: int = 8,
    seed: int = 0,
    cross_check: bool = True,
    progress: bool = True,
) -> ProbeResult:
    """Score every head for the types in ``which`` and add the rows to ``out``'s detections.

    Args:
        model: a `LoadedModel`.
        out: run directory (created if missing; an existing run must be of the same model).
        which: a subset of `REPEATED_TYPES`.
        seq_len: distinct random tokens per copy.
        repeats: copies for induction / previous-token / duplicate-token (TransformerLens's
            setting is 2: a perfect induction head then scores ≈ 0.5).
        razor_repeats: copies for echo / razor_induction (RazorAttention uses 4).
        n_samples: random sequences per setting; scores are means over them.
        seed: random seed for the sequences.
        cross_check: also run TransformerLens's ``detect_head`` on the same prompts and record
            the Spearman agreement and max |difference| in the summary.
        progress: show a progress bar.

    Rows: one per (layer, head, type), probe ``repeated_random:x{repeats}`` (or
    ``:x{razor_repeats}``); plus ``echo_kv`` / ``razor_induction_kv`` rows with ``head = -1``.
    Evidence: the setting, the per-sample scores, the split-half stability of the ranking.
    """
    which = (which,) if isinstance(which, str) else tuple(dict.fromkeys(which))
    _check_repeated_args(model, which, seq_len, repeats, razor_repeats, n_samples)
    preflight_run(out, model)
    tl_types = [t for t in which if t not in RAZOR_TYPES]
    razor = [t for t in which if t in RAZOR_TYPES]
    settings = []
    if tl_types:
        settings.append((tl_types, repeats))
    if razor:
        settings.append((razor, razor_repeats))

    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"seq_len": seq_len, "n_samples": n_samples, "types": {}}
    for types, reps in settings:
        samples = repeated_samples(model.tokenizer, seq_len=seq_len, repeats=reps, n_samples=n_samples, seed=seed)
        probe = f"repeated_random:x{reps}"
        scores = repeated_scores(model, samples, types, progress=progress, desc=f"{probe} ({', '.join(types)})")
        for t in types:
            per_sample = scores[t]  # [S, L, H]
            mean = per_sample.mean(0)
            stability = split_half_stability(per_sample)
            info: dict[str, Any] = {"probe": probe, "split_half_stability": finite(stability), "max": round(float(mean.max()), 4)}
            if cross_check and t in TL_HEAD_NAMES:
                info["transformer_lens"] = _cross_check(model, samples, t, mean)
            summary["types"][t] = info
            evidence_base = {
                "repeats": reps,
                "seq_len": seq_len,
                "n_samples": n_samples,
                "seed": seed,
                "score": "row_mass (mean over rows with an earlier copy)" if t in RAZOR_TYPES else "mul: sum(A*D)/sum(A) over all rows",
                "split_half_stability": finite(stability),
            }
            rows += _type_rows(model, t, probe, per_sample, evidence_base)

    frame = detection_frame(rows)
    params = {"which": list(which), "seq_len": seq_len, "repeats": repeats, "razor_repeats": razor_repeats, "n_samples": n_samples, "seed": seed}
    run = ensure_run(out, model.identity(), STAGE, params)
    write_detections(run, frame)
    run.record_stage(STAGE, summary=summary)
    return ProbeResult(run, frame, summary)


def _type_rows(model: LoadedModel, head_type: str, probe: str, per_sample: torch.Tensor, evidence_base: dict[str, Any]) -> list[dict[str, Any]]:
    """One head type's detection rows from its per-sample scores ``[samples, layers, heads]``:
    one per query head, plus the ``{type}_kv`` rows (``head = -1``) for the RazorAttention types."""
    kv = model.kv_heads()
    mean = per_sample.mean(0)
    rows: list[dict[str, Any]] = []
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            rows.append({
                "layer": layer, "head": head, "kv_head": int(kv[head]), "head_type": head_type,
                "score": float(mean[layer, head]), "probe": probe,
                "evidence": {**evidence_base, "per_sample": [round(float(v), 4) for v in per_sample[:, layer, head]]},
            })
    if head_type in RAZOR_TYPES:
        pooled, argmax = kv_max_pool(mean, model.group_size)  # [L, KV]
        for layer in range(model.n_layers):
            for g in range(model.n_kv_heads):
                rows.append({
                    "layer": layer, "head": -1, "kv_head": g, "head_type": f"{head_type}_kv",
                    "score": float(pooled[layer, g]), "probe": probe,
                    "evidence": {**evidence_base, "pool": "max over the KV group's query heads", "argmax_head": int(argmax[layer, g])},
                })
    return rows


def _cross_check(model: LoadedModel, samples: Sequence[RepeatedSample], head_type: str, ours: torch.Tensor) -> dict[str, Any]:
    try:
        theirs = tl_detect_head(model, samples, head_type)
    except ProbeError as exc:
        return {"skipped": str(exc)}
    return {
        "spearman": finite(rank_stability(ours, theirs)),
        "max_abs_diff": float((ours - theirs).abs().max()),
    }
