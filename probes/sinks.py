"""Attention sinks: keys that soak up a head's attention whatever the query asks for.

Following Gu et al. 2024 ("When Attention Sink Emerges"), the **importance** of key ``k`` in a
head is the mean attention it receives from the queries that can see it:

    importance[k] = (1 / (n - k)) · Σ_{i ≥ k} A[i, k]

and the head *sinks* on ``k`` when ``importance[k] > ε`` (ε = 0.3 by default). The model-level
share ``Sink_k^ε`` is the fraction of (layer, head) that sink on key ``k``, averaged over samples.

Two head types are scored per head, each a mean over samples:

- ``sink``: the importance of token 0 (the BOS token, or the chat template's first token);
- ``hidden_sink``: the largest importance over positions ``k ≥ 1`` — sinks that sit on
  newlines, punctuation or the first token after a chat header (ACT, Yu et al. 2024). The
  evidence names the token that is the sink (sample, position, token text, importance).

**Tail rule.** The last keys are seen by few queries, so their importance is a mean of a handful
of values (the very last key's importance is one row's diagonal) and says nothing about sinks.
``hidden_sink`` therefore only considers keys seen by at least ``min_queries`` queries
(``n - k ≥ min_queries``; 32 by default).

The prompts are the model's own kind of input: the project's generators (`attnlab.prompts`),
and the same texts through the model's chat template when it has one (``chat=True``); the
summary compares the sink ranking between the two prompt kinds (`rank_stability`) and between
halves of the samples (`split_half_stability`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attnlab.capture import check_length
from attnlab.models import LoadedModel
from attnlab.prompts import KINDS, Prompt, builtin_prompts
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

PROBE = "sinks"
#: The manifest stage this probe records.
STAGE = "probe:sinks"

_ERR_EPS = "--eps must lie in (0, 1), got {eps}"
_ERR_MIN_QUERIES = "min_queries must be at least 1, got {min_queries}"
_ERR_SHORT = (
    "prompt {name!r} has {n} tokens: hidden sinks need more than min_queries + 1 = {need} "
    "(keys seen by fewer than {min_queries} queries are ignored); raise --lengths"
)


# ---------------------------------------------------------------------------------------
# pure functions of patterns
# ---------------------------------------------------------------------------------------
def key_importance(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives from the queries that see it.

    Args:
        pattern: ``[..., n, n]`` causal attention probabilities.
    Returns:
        ``[..., n]``: ``importance[k] = Σ_{i ≥ k} A[i, k] / (n - k)``.
    """
    n = pattern.shape[-1]
    seen_by = torch.arange(n, 0, -1, device=pattern.device, dtype=torch.float32)  # n - k
    return pattern.to(torch.float32).sum(-2) / seen_by


def hidden_sink(importance: torch.Tensor, min_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The strongest sink after token 0, among keys seen by at least ``min_queries`` queries.

    Args:
        importance: ``[..., n]`` key importance (`key_importance`).
        min_queries: keys ``k`` with ``n - k < min_queries`` are ignored (the tail rule).
    Returns:
        ``(value, position)``, both ``[...]``; position is absolute (≥ 1).
    """
    n = importance.shape[-1]
    last = n - min_queries  # keys 1 .. last (inclusive) qualify
    if last < 1:
        raise ProbeError(_ERR_SHORT.format(name="pattern", n=n, need=min_queries + 1, min_queries=min_queries))
    value, idx = importance[..., 1 : last + 1].max(-1)
    return value, idx + 1


def sink_share(importance: torch.Tensor, eps: float, key: int = 0) -> float:
    """``Sink_k^ε``: the fraction of heads whose importance of key ``k`` exceeds ``eps``.

    ``importance`` ``[..., n]`` (e.g. ``[samples, layers, heads, n]``; the share is over all
    leading entries, so over heads and samples)."""
    return float((importance[..., key] > eps).to(torch.float32).mean())


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
def sink_prompts(
    model: LoadedModel, *, n_samples: int, lengths: Sequence[int], chat: bool = True, kinds: Sequence[str] = KINDS, seed: int = 0
) -> list[Prompt]:
    """The project's generated prompts, plus the same texts through the chat template
    (``kind="chat"``) when ``chat`` and the model has one. Generated prompts have ``kind``
    set to their register (narrative, records, ...) and ``source="builtin"``."""
    prompts = builtin_prompts(model.tokenizer, lengths, n_samples, seed=seed, kinds=kinds)
    if chat and model.has_chat_template:
        for p in list(prompts):
            text = model.tokenizer.decode(p.input_ids[0], skip_special_tokens=True)
            prompts.append(Prompt(f"{p.name}-chat", model.encode(text, chat=True), "chat", "chat"))
    return prompts


# ---------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------
def sink_importance(model: LoadedModel, prompts: Sequence[Prompt], *, progress: bool = False) -> list[torch.Tensor]:
    """Key importance for every prompt: a list of ``[layers, heads, n_p]`` tensors."""
    out = []
    for p in tqdm(prompts, desc=f"sinks {model.name}", unit="sample", disable=not progress):
        out.append(reduce_patterns(model, p.input_ids, lambda layer, pattern: {"imp": key_importance(pattern)})["imp"])
    return out


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def probe_sinks(
    model: LoadedModel,
    out: str | Path,
    *,
    n_samples: int = 8,
    lengths: Sequence[int] = (512,),
    eps: float = 0.3,
    chat: bool = True,
    kinds: Sequence[str] = KINDS,
    min_queries: int = 32,
    seed: int = 0,
    prompts: Sequence[Prompt] | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Score every head's ``sink`` and ``hidden_sink`` and add the rows to ``out``.

    Args:
        model: a `LoadedModel`.
        out: run directory (created if missing; an existing run must be of the same model).
        n_samples, lengths, kinds, seed: the generated prompts (`attnlab.prompts.builtin_prompts`).
        eps: the sink threshold ε of ``Sink_k^ε``.
        chat: also run the same texts through the chat template (when the model has one).
        min_queries: the tail rule (see the module docstring).
        prompts: use these prompts instead of generating them.
        progress: show a progress bar.

    Evidence per head: ``sink`` — mean importance per prompt kind, the share of samples above ε,
    the token at position 0; ``hidden_sink`` — the top sink positions over samples with their
    token text and importance, and how often each token was the sink (importance > ε).
    The summary (also in the manifest under ``stages["probe:sinks"]``) holds
    ``sink_share_first_token`` (``Sink_1^ε``: share of (head, sample) pairs whose first token's
    importance exceeds ε), ``hidden_sink_share`` (the same for the strongest later key),
    ``hidden_sink_tokens`` (how many (head, sample) pairs sink on each token text), and the
    split-half and builtin-vs-chat rank stabilities.
    """
    if not 0 < eps < 1:
        raise ProbeError(_ERR_EPS.format(eps=eps))
    if min_queries < 1:
        raise ProbeError(_ERR_MIN_QUERIES.format(min_queries=min_queries))
    preflight_run(out, model)
    if prompts is None:
        prompts = sink_prompts(model, n_samples=n_samples, lengths=lengths, chat=chat, kinds=kinds, seed=seed)
    _check_prompts(model, prompts, min_queries)

    measures = SinkMeasures.of(sink_importance(model, prompts, progress=progress), prompts, min_queries)
    summary = _sink_summary(measures, prompts, eps=eps, min_queries=min_queries)
    rows, hidden_tokens = _sink_rows(model, prompts, measures, summary, eps=eps, min_queries=min_queries)
    summary["hidden_sink_tokens"] = dict(hidden_tokens.most_common(10))

    frame = detection_frame(rows)
    params = {
        "n_samples": n_samples, "lengths": [int(n) for n in lengths], "eps": eps, "chat": chat,
        "kinds": list(kinds), "min_queries": min_queries, "seed": seed, "prompts": [p.name for p in prompts],
    }
    run = ensure_run(out, model.identity(), STAGE, params)
    write_detections(run, frame)
    run.record_stage(STAGE, summary=summary)
    return ProbeResult(run, frame, summary)


def _check_prompts(model: LoadedModel, prompts: Sequence[Prompt], min_queries: int) -> None:
    if not prompts:
        raise ProbeError("no prompts for the sink probe: give --samples > 0")
    for p in prompts:
        check_length(model, p.n_tokens, p.name)
        if p.n_tokens <= min_queries + 1:
            raise ProbeError(_ERR_SHORT.format(name=p.name, n=p.n_tokens, need=min_queries + 1, min_queries=min_queries))


@dataclass
class SinkMeasures:
    """The sink probe's measurements over its prompts.

    Attributes:
        first: ``[samples, layers, heads]`` importance of token 0.
        hidden_value: ``[samples, layers, heads]`` the strongest later sink's importance.
        hidden_pos: ``[samples, layers, heads]`` its position.
        kinds_of: each prompt's kind, ``"builtin"`` or ``"chat"``.
    """

    first: torch.Tensor
    hidden_value: torch.Tensor
    hidden_pos: torch.Tensor
    kinds_of: list[str]

    @classmethod
    def of(cls, importance: Sequence[torch.Tensor], prompts: Sequence[Prompt], min_queries: int) -> SinkMeasures:
        """From `sink_importance`'s ``[layers, heads, n_p]`` tensors, one per prompt."""
        hidden = [hidden_sink(imp, min_queries) for imp in importance]
        return cls(
            first=torch.stack([imp[..., 0] for imp in importance]),
            hidden_value=torch.stack([v for v, _ in hidden]),
            hidden_pos=torch.stack([p for _, p in hidden]),
            kinds_of=[p.source if p.source == "chat" else "builtin" for p in prompts],
        )

    @property
    def kind_names(self) -> list[str]:
        return sorted(set(self.kinds_of))

    def of_kind(self, values: torch.Tensor, kind: str) -> torch.Tensor:
        """The samples of ``values`` ``[samples, ...]`` whose prompt is of ``kind``."""
        return values[[i for i, k in enumerate(self.kinds_of) if k == kind]]


def _sink_summary(m: SinkMeasures, prompts: Sequence[Prompt], *, eps: float, min_queries: int) -> dict[str, Any]:
    """The summary's shares and stabilities (``hidden_sink_tokens`` is added by the rows)."""
    kind_names = m.kind_names
    summary: dict[str, Any] = {
        "eps": eps,
        "min_queries": min_queries,
        "n_prompts": len(prompts),
        "prompt_kinds": {k: m.kinds_of.count(k) for k in kind_names},
        "sink_share_first_token": round(sink_share(m.first[..., None], eps), 4),
        "hidden_sink_share": round(float((m.hidden_value > eps).to(torch.float32).mean()), 4),
        "split_half_stability": {"sink": finite(split_half_stability(m.first)), "hidden_sink": finite(split_half_stability(m.hidden_value))},
    }
    if len(kind_names) == 2:
        a, b = kind_names
        summary["kind_stability"] = {
            "kinds": [a, b],
            "sink": finite(rank_stability(m.of_kind(m.first, a).mean(0), m.of_kind(m.first, b).mean(0))),
            "hidden_sink": finite(rank_stability(m.of_kind(m.hidden_value, a).mean(0), m.of_kind(m.hidden_value, b).mean(0))),
        }
    summary["sink_share_by_kind"] = {k: round(sink_share(m.of_kind(m.first, k)[..., None], eps), 4) for k in kind_names}
    return summary


def _sink_rows(
    model: LoadedModel, prompts: Sequence[Prompt], m: SinkMeasures, summary: dict[str, Any], *, eps: float, min_queries: int
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The ``sink`` and ``hidden_sink`` detection rows of every head, and how many
    (head, sample) pairs sink on each token text."""
    tok = model.tokenizer
    kind_names = m.kind_names
    by_kind = {k: m.of_kind(m.first, k).mean(0) for k in kind_names}
    first_tokens = Counter(_token_text(tok, p.input_ids[0, 0]) for p in prompts)
    hidden_tokens: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    kv = model.kv_heads()
    common = {"eps": eps, "n_samples": len(prompts), "lengths": sorted({p.n_tokens for p in prompts})}
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            f = m.first[:, layer, head]
            rows.append({
                "layer": layer, "head": head, "kv_head": int(kv[head]), "head_type": "sink",
                "score": float(f.mean()), "probe": PROBE,
                "evidence": {
                    **common, "position": 0, "token": first_tokens.most_common(1)[0][0],
                    "importance_by_kind": {k: round(float(by_kind[k][layer, head]), 4) for k in kind_names},
                    "share_samples_above_eps": round(float((f > eps).to(torch.float32).mean()), 4),
                    "split_half_stability": summary["split_half_stability"]["sink"],
                },
            })
            hv, hp = m.hidden_value[:, layer, head], m.hidden_pos[:, layer, head]
            order = torch.argsort(hv, descending=True)[:3]
            top = [{
                "sample": prompts[int(s)].name, "kind": m.kinds_of[int(s)], "position": int(hp[s]),
                "token": _token_text(tok, prompts[int(s)].input_ids[0, int(hp[s])]), "importance": round(float(hv[s]), 4),
            } for s in order]
            sink_tokens = Counter(
                _token_text(tok, prompts[s].input_ids[0, int(hp[s])]) for s in range(len(prompts)) if float(hv[s]) > eps
            )
            hidden_tokens.update(sink_tokens)
            rows.append({
                "layer": layer, "head": head, "kv_head": int(kv[head]), "head_type": "hidden_sink",
                "score": float(hv.mean()), "probe": PROBE,
                "evidence": {
                    **common, "min_queries": min_queries, "top": top,
                    "sink_tokens": dict(sink_tokens.most_common(5)),
                    "share_samples_above_eps": round(float((hv > eps).to(torch.float32).mean()), 4),
                    "split_half_stability": summary["split_half_stability"]["hidden_sink"],
                },
            })
    return rows, hidden_tokens
