"""Local and streaming heads: heads whose attention a sink-plus-window cache would keep.

A *streaming* policy (StreamingLLM; RazorAttention's and DuoAttention's non-retrieval heads)
keeps, for query ``i``, only the first ``s`` tokens (the sinks) and the ``w`` most recent keys
(the query itself included). The attention mass such a policy keeps is

    streaming_mass(s, w) = mean_i Σ_j A[i, j] · [j < s  or  i - j < w]

and ``local_mass(w)`` is the same without the sinks. A head with streaming mass near 1 loses
almost nothing under a streaming policy: it is a **local** head. The ``local`` detection score
is the streaming mass at the chosen ``(sink_tokens, window)``; the evidence lists both masses
at every window measured, so a policy can pick the smallest window that keeps enough.

**Measured queries.** For a query ``i < s + w`` the policy keeps every key, so its mass is 1
whatever the head does; averaging over those rows would only pull every head towards 1. The
masses are therefore averaged over the queries ``i ≥ s + w`` (where the policy drops keys);
each prompt must be longer than ``s + max(windows)``.

Two sources:

- **capture** (`probe_local` with a model): the exact masses, from ``hook_pattern`` on
  generated prompts;
- **profile** (`local_from_profile`, or `probe_local` with ``model=None`` on a profiled run):
  from the run's ``sink_mass_{s}`` and ``local_mass_{w}`` head statistics, as
  ``min(1, sink_mass_s + local_mass_w)``. That is approximate: those statistics average over
  all queries and the first ``s + w`` queries count their overlap twice (an overestimate of at
  most ``(s + w) / n``), so prefer the capture source for ranking heads near a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.capture import check_length
from attnlab.models import LoadedModel
from attnlab.profile import head_means
from attnlab.prompts import KINDS, Prompt, builtin_prompts
from attnlab.runs import HEAD_STATS, Run, ensure_run, preflight_run

from .base import ProbeError, ProbeResult, finite, reduce_patterns, split_half_stability
from .detections import detection_frame, write_detections

PROBE_CAPTURE = "streaming:capture"
PROBE_PROFILE = "streaming:profile"
#: The manifest stage this probe records.
STAGE = "probe:local"

_ERR_WINDOWS = "windows must be positive token counts, got {windows}"
_ERR_WINDOW = "--window {window} must be one of the measured windows {windows}"
_ERR_SINKS = "--sink-tokens must be 0 or more, got {sink_tokens}"
_ERR_SHORT = (
    "prompt {name!r} has {n} tokens, but a streaming policy with {sink_tokens} sink tokens and a "
    "{window}-token window drops nothing below {need} tokens: raise --lengths above {need} or lower the windows"
)
_ERR_NO_STATS = (
    "run {path} has no {stat} statistic in head_stats (it has {have}): profile it with that "
    "sink size / window, or run `attnlab probe local --model ...` to capture directly"
)


# ---------------------------------------------------------------------------------------
# pure functions of patterns
# ---------------------------------------------------------------------------------------
def streaming_keep(n: int, sink_tokens: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, n]`` bool: the keys a streaming policy keeps for each query (causal)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sink_tokens) | (i - j < window))


def streaming_mass(pattern: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """Mass kept by a ``sink_tokens`` + ``window`` policy, averaged over the queries
    ``i ≥ sink_tokens + window``.

    Args:
        pattern: ``[..., n, n]`` causal attention probabilities.
    Returns:
        ``[...]`` in ``[0, 1]``.
    """
    n = pattern.shape[-1]
    start = sink_tokens + window
    if n <= start:
        raise ProbeError(_ERR_SHORT.format(name="pattern", n=n, sink_tokens=sink_tokens, window=window, need=start + 1))
    keep = streaming_keep(n, sink_tokens, window, pattern.device)[start:]
    return (pattern[..., start:, :].to(torch.float32) * keep).sum(-1).mean(-1)


def local_mass(pattern: torch.Tensor, window: int, *, sink_tokens: int = 0) -> torch.Tensor:
    """Mass on the ``window`` most recent keys alone (no sinks), averaged over the same queries
    as `streaming_mass` with ``sink_tokens`` (so the two are comparable). ``[..., n, n]`` → ``[...]``."""
    n = pattern.shape[-1]
    start = sink_tokens + window
    if n <= start:
        raise ProbeError(_ERR_SHORT.format(name="pattern", n=n, sink_tokens=sink_tokens, window=window, need=start + 1))
    keep = streaming_keep(n, 0, window, pattern.device)[start:]
    return (pattern[..., start:, :].to(torch.float32) * keep).sum(-1).mean(-1)


# ---------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------
def _check_args(sink_tokens: int, windows: Sequence[int], window: int) -> tuple[int, ...]:
    windows = tuple(sorted({int(w) for w in windows}))
    if not windows or any(w <= 0 for w in windows):
        raise ProbeError(_ERR_WINDOWS.format(windows=list(windows)))
    if window not in windows:
        raise ProbeError(_ERR_WINDOW.format(window=window, windows=list(windows)))
    if sink_tokens < 0:
        raise ProbeError(_ERR_SINKS.format(sink_tokens=sink_tokens))
    return windows


def streaming_masses(
    model: LoadedModel, prompts: Sequence[Prompt], *, sink_tokens: int, windows: Sequence[int], progress: bool = False
) -> dict[str, torch.Tensor]:
    """``{"streaming_{w}": [samples, layers, heads], "local_{w}": ...}`` for each window."""
    per: dict[str, list[torch.Tensor]] = {}

    def reducer(layer: int, pattern: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for w in windows:
            out[f"streaming_{w}"] = streaming_mass(pattern, sink_tokens, w)
            out[f"local_{w}"] = local_mass(pattern, w, sink_tokens=sink_tokens)
        return out

    for p in tqdm(prompts, desc=f"local heads {model.name}", unit="sample", disable=not progress):
        for k, v in reduce_patterns(model, p.input_ids, reducer).items():
            per.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in per.items()}


def probe_local(
    model: LoadedModel | None,
    out: str | Path,
    *,
    n_samples: int = 4,
    lengths: Sequence[int] = (512,),
    sink_tokens: int = 4,
    windows: Sequence[int] = (16, 64, 256),
    window: int = 64,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    prompts: Sequence[Prompt] | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Score every head's ``local`` type (streaming mass at ``sink_tokens`` + ``window``).

    Args:
        model: a `LoadedModel`; ``None`` reads the statistics of the profiled run at ``out``
            instead (`local_from_profile`).
        out: run directory (created if missing; an existing run must be of the same model).
        n_samples, lengths, kinds, seed: generated prompts (ignored when ``prompts`` is given).
        sink_tokens: the streaming policy's sink tokens.
        windows: windows measured (evidence); ``window`` must be one of them.
        window: the window of the score.
        progress: show a progress bar.
    """
    windows = _check_args(sink_tokens, windows, window)
    if model is None:
        return local_from_profile(Run.coerce(out), sink_tokens=sink_tokens, window=window)
    preflight_run(out, model)
    if prompts is None:
        prompts = builtin_prompts(model.tokenizer, lengths, n_samples, seed=seed, kinds=kinds)
    need = sink_tokens + max(windows) + 1
    for p in prompts:
        check_length(model, p.n_tokens, p.name)
        if p.n_tokens < need:
            raise ProbeError(_ERR_SHORT.format(name=p.name, n=p.n_tokens, sink_tokens=sink_tokens, window=max(windows), need=need))

    masses = streaming_masses(model, prompts, sink_tokens=sink_tokens, windows=windows, progress=progress)
    score = masses[f"streaming_{window}"]  # [S, L, H]
    stability = split_half_stability(score)
    mean = {k: v.mean(0) for k, v in masses.items()}
    kv = model.kv_heads()
    rows = []
    base = {
        "source": "capture", "sink_tokens": sink_tokens, "window": window, "n_samples": len(prompts),
        "lengths": sorted({p.n_tokens for p in prompts}), "measured_queries": "i >= sink_tokens + w",
        "split_half_stability": finite(stability),
    }
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            rows.append({
                "layer": layer, "head": head, "kv_head": int(kv[head]), "head_type": "local",
                "score": float(mean[f"streaming_{window}"][layer, head]), "probe": PROBE_CAPTURE,
                "evidence": {
                    **base,
                    "streaming_mass": {str(w): round(float(mean[f"streaming_{w}"][layer, head]), 4) for w in windows},
                    "local_mass": {str(w): round(float(mean[f"local_{w}"][layer, head]), 4) for w in windows},
                },
            })
    frame = detection_frame(rows)
    summary = {
        "source": "capture", "sink_tokens": sink_tokens, "window": window,
        "split_half_stability": finite(stability),
        "heads_keeping_90pct": {str(w): int((mean[f"streaming_{w}"] >= 0.9).sum()) for w in windows},
        "n_heads": model.n_layers * model.n_heads,
    }
    params = {
        "n_samples": n_samples, "lengths": [int(n) for n in lengths], "sink_tokens": sink_tokens,
        "windows": list(windows), "window": window, "kinds": list(kinds), "seed": seed,
        "prompts": [p.name for p in prompts],
    }
    run = ensure_run(out, model.identity(), STAGE, params)
    write_detections(run, frame)
    run.record_stage(STAGE, summary=summary)
    return ProbeResult(run, frame, summary)


def local_from_profile(run: Run, *, sink_tokens: int = 4, window: int = 64) -> ProbeResult:
    """``local`` rows from a profiled run's statistics (approximate; see the module docstring).

    Uses every ``local_mass_{w}`` the run has for the evidence, ``sink_mass_{sink_tokens}``
    and ``local_mass_{window}`` for the score.
    """
    if not run.has(HEAD_STATS):
        raise ProbeError(f"run {run.path} has no {HEAD_STATS.filename}: run `{run.command_for(HEAD_STATS)}` first, or give a model")
    means = head_means(run)
    stats = [str(c) for c in means.columns if str(c) not in ("layer", "head", "kv_head")]
    sink_col, local_col = f"sink_mass_{sink_tokens}", f"local_mass_{window}"
    for col in (sink_col, local_col):
        if col not in stats:
            raise ProbeError(_ERR_NO_STATS.format(path=run.path, stat=col, have=stats))
    windows = sorted(int(c.removeprefix("local_mass_")) for c in stats if c.startswith("local_mass_"))
    rows = []
    for values in means.to_dict("records"):
        sink = float(values[sink_col])
        rows.append({
            "layer": int(values["layer"]), "head": int(values["head"]), "kv_head": int(values["kv_head"]),
            "head_type": "local", "score": min(1.0, sink + float(values[local_col])), "probe": PROBE_PROFILE,
            "evidence": {
                "source": "profile", "sink_tokens": sink_tokens, "window": window,
                "approximation": "min(1, sink_mass + local_mass) over all queries",
                "streaming_mass": {str(w): round(min(1.0, sink + float(values[f"local_mass_{w}"])), 4) for w in windows},
                "local_mass": {str(w): round(float(values[f"local_mass_{w}"]), 4) for w in windows},
            },
        })
    frame = detection_frame(rows)
    run = ensure_run(run.path, run.identity, STAGE, {"source": "profile", "sink_tokens": sink_tokens, "window": window})
    write_detections(run, frame)
    summary = {"source": "profile", "sink_tokens": sink_tokens, "window": window}
    run.record_stage(STAGE, summary=summary)
    return ProbeResult(run, frame, summary)


def local_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``local`` rows of a detections table with their evidence windows as columns
    (``streaming_{w}``, ``local_{w}``): one row per head, for plots and policies."""
    import json

    rows = frame[frame["head_type"] == "local"]
    out: list[dict[str, Any]] = []
    for r in rows.itertuples(index=False):
        ev = json.loads(r.evidence)
        rec: dict[str, Any] = {"layer": r.layer, "head": r.head, "kv_head": r.kv_head, "probe": r.probe, "score": r.score}
        rec.update({f"streaming_{w}": v for w, v in ev.get("streaming_mass", {}).items()})
        rec.update({f"local_{w}": v for w, v in ev.get("local_mass", {}).items()})
        out.append(rec)
    return pd.DataFrame.from_records(out)
