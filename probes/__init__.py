"""Probes: find what each head does, with evidence.

Detectors write rows into a run's detections (`attnlab.probes.detections`, the
`attnlab.runs.DETECTIONS` artifact):

- retrieval heads (Wu et al. 2024) on a needle-in-a-haystack suite, with a causal check
  (`probes.retrieval`, `probes.needle`, `probes.causal`);
- attention sinks and hidden sinks (Gu et al. 2024) (`probes.sinks`);
- induction, previous-token, duplicate-token heads (TransformerLens's scoring, cross-checked
  against its ``detect_head``) and RazorAttention's echo/induction heads (`probes.repeated`);
- local/streaming heads (`probes.local`);
- head families (PCA + KMeans, `probes.families`) and linear probes on head outputs
  (`probes.linear`);
- head ablation (zero, mean, uniform), shared with circuits (`probes.ablation`).

Every probe returns a `ProbeResult` and raises `ProbeError` for what it cannot use
(`probes.base`, with the helpers all detectors share).

Submodules are imported on use, so ``import attnlab.probes`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ProbeError": "attnlab.probes.base",
    "ProbeResult": "attnlab.probes.base",
    "probe_retrieval": "attnlab.probes.retrieval",
    "needle_samples": "attnlab.probes.needle",
    "greedy_answer": "attnlab.probes.needle",
    "causal_check": "attnlab.probes.causal",
    "ablate_heads": "attnlab.probes.ablation",
    "HeadAblation": "attnlab.probes.ablation",
    "probe_sinks": "attnlab.probes.sinks",
    "probe_repeated": "attnlab.probes.repeated",
    "probe_local": "attnlab.probes.local",
    "local_from_profile": "attnlab.probes.local",
    "compute_families": "attnlab.probes.families",
    "run_linear_probe": "attnlab.probes.linear",
    "fit_linear_probes": "attnlab.probes.linear",
    "top_heads": "attnlab.probes.detections",
    "write_detections": "attnlab.probes.detections",
    "detection_frame": "attnlab.probes.detections",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnlab.probes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
