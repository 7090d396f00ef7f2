"""What every probe shares: its error type, its result type and the helpers they all use.

- `ProbeError`: a probe was given parameters or data it cannot use (an `AttnlabError`, so the
  command line prints it as one ``error:`` line);
- `ProbeResult`: what every ``probe_*`` function (and `compute_families`, `run_linear_probe`)
  returns — the run it wrote to, the detection rows it added, its summary (also recorded in the
  run's manifest), the other tables it wrote (keyed by their `attnlab.runs` artifact key) and
  the in-memory extras a notebook may want (scores, traces, samples);
- `reduce_patterns`: one forward with a hook on every layer's ``hook_pattern``, reducing each
  pattern as it passes (the detectors' common way to read attention);
- `rank_stability` / `split_half_stability`: how far a ranking of heads can be trusted;
- `finite`: a float for a JSON summary, NaN as ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab.errors import AttnlabError
from attnlab.names import attn_hook
from attnlab.runs import DETECTION_COLUMNS, Run


class ProbeError(AttnlabError):
    """A probe was given parameters or data it cannot use."""


def _no_detections() -> pd.DataFrame:
    return pd.DataFrame(columns=list(DETECTION_COLUMNS))


@dataclass
class ProbeResult:
    """What a probe returns.

    Attributes:
        run: the run directory it wrote to.
        detections: the detection rows it added (empty for probes that write no detections,
            such as the head families and the linear probes).
        summary: the probe's summary, also stored in the run's manifest under
            ``stages[<stage>]["summary"]``.
        tables: the other tables it wrote, by artifact key (``"needle_results"``,
            ``"retrieval_trace"``, ``"causal_check"``, ``"families"``, ``"linear_probes"``).
        extras: in-memory results that are not written (e.g. the retrieval probe's
            ``scores``, ``traces`` and ``samples``).

    ``result["summary"]`` reads a field, then a table, then an extra by name, so code written
    for the retrieval probe's former dict result keeps working.
    """

    run: Run
    detections: pd.DataFrame = field(default_factory=_no_detections)
    summary: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in ("run", "detections", "summary"):
            return getattr(self, key)
        if key in self.tables:
            return self.tables[key]
        if key in self.extras:
            return self.extras[key]
        raise KeyError(f"{key!r}: this probe result has run, detections, summary, "
                       f"tables {sorted(self.tables)} and extras {sorted(self.extras)}")


def finite(x: float) -> float | None:
    """``x`` rounded to 4 digits for a JSON summary; NaN becomes ``None`` (JSON null)."""
    return None if x != x else round(float(x), 4)


# ---------------------------------------------------------------------------------------
# stability
# ---------------------------------------------------------------------------------------
def rank_stability(scores_a: Any, scores_b: Any) -> float:
    """Spearman rank correlation between two score vectors over the same heads.

    Use it to ask whether a ranking of heads survives a change of samples or prompt kind.
    Inputs of any shape (flattened; e.g. ``[layers, heads]``); NaN when either is constant.
    """
    from scipy.stats import spearmanr

    a = np.asarray(torch.as_tensor(scores_a).detach().cpu(), dtype=np.float64).reshape(-1)
    b = np.asarray(torch.as_tensor(scores_b).detach().cpu(), dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ProbeError(f"rank_stability needs scores over the same heads, got {a.size} and {b.size} values")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def split_half_stability(per_sample: torch.Tensor) -> float:
    """`rank_stability` between the mean score over the even-numbered samples and over the
    odd-numbered ones (two disjoint halves). ``per_sample`` ``[samples, ...]``; NaN with
    fewer than 2 samples."""
    per_sample = torch.as_tensor(per_sample)
    if per_sample.shape[0] < 2:
        return float("nan")
    return rank_stability(per_sample[0::2].mean(0), per_sample[1::2].mean(0))


# ---------------------------------------------------------------------------------------
# running the model
# ---------------------------------------------------------------------------------------
PatternReducer = Callable[[int, torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def reduce_patterns(model: Any, input_ids: torch.Tensor, reducer: PatternReducer) -> dict[str, torch.Tensor]:
    """Run one forward over ``input_ids`` ``[1, n]`` and reduce every layer's attention pattern.

    ``reducer(layer, pattern)`` gets the layer's pattern ``[heads, n, n]`` (float32, on the
    model's device) and returns named tensors ``[heads, ...]``; the result stacks them over
    layers: ``{name: [layers, heads, ...]}`` on the CPU. Only one layer's pattern is alive at a
    time. Hooks already active on the bridge (``bridge.hooks(...)``) run first, so a patched
    pattern is what gets reduced. ``model`` is a `attnlab.models.LoadedModel`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    out: list[dict[str, torch.Tensor] | None] = [None] * model.n_layers

    def make_hook(layer: int) -> Callable:
        def hook(pattern: torch.Tensor, hook=None):
            out[layer] = {k: v.detach().cpu() for k, v in reducer(layer, pattern[0].to(torch.float32)).items()}
            return None

        return hook

    hooks = [(attn_hook(layer, "hook_pattern"), make_hook(layer)) for layer in range(model.n_layers)]
    model.bridge.run_with_hooks(input_ids.to(model.device), fwd_hooks=hooks, stop_at_layer=model.n_layers)
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:
        raise RuntimeError(f"hook_pattern did not fire for layers {missing}: the bridge does not expose patterns")
    return {k: torch.stack([o[k] for o in out]) for k in out[0]}  # type: ignore[index]
