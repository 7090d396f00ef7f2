"""Head-level circuit discovery (``attnlab.circuits``).

- `tasks`: clean/corrupted tasks (IOI, induction, greater-than, JSONL) with a logit-difference metric;
- `patching`: exact activation patching and attribution patching (EAP nodes and edges, EAP-IG);
- `faithfulness`: MIB faithfulness curves, the smallest faithful circuit, completeness;
- `circuit`: circuit selection, the run's circuit file (read and checked in one place), a plotly graph,
  protected heads for policies;
- `toy`: a two-layer attention-only model trained to do induction (a circuit known in advance);
- `cli`: ``attnlab circuit``.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name → the module that defines it (imported on first use: patching loads torch).
_LAZY = {
    **dict.fromkeys(("Circuit", "discover", "select_circuit", "verify_edges", "save_circuit", "load_circuit",
                     "read_circuit", "protected_heads", "circuit_figure", "scores_tensor"), "attnlab.circuits.circuit"),
    **dict.fromkeys(("activation_patching", "attribution_patching", "path_patching", "path_patching_edges",
                     "score_heads", "Scores"), "attnlab.circuits.patching"),
    **dict.fromkeys(("faithfulness", "faithfulness_curve", "refine_circuit", "rank_heads", "curve_summary"),
                    "attnlab.circuits.faithfulness"),
    **dict.fromkeys(("Task", "Example", "ioi_task", "induction_task", "greater_than_task", "needle_task", "jsonl_task",
                     "load_task", "example_metrics", "logit_diff"), "attnlab.circuits.tasks"),
    "train_induction_model": "attnlab.circuits.toy",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnlab.circuits' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
