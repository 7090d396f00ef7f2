"""Detections: one score per (head, head type), with the evidence behind it.

This is the contract between the probes (and circuits) and every later stage. The table is
long format, one row per (layer, head, head_type, probe):

============  ==============================================================================
column        meaning
============  ==============================================================================
layer, head   the query head
kv_head       the KV head it reads (GQA); per-KV-head scores use ``head = -1``
head_type     ``retrieval``, ``sink``, ``induction``, ``previous_token``, ``duplicate_token``,
              ``local``, ``echo``, ``razor_induction``, ... (see `HEAD_TYPES`)
score         the detector's score, higher = more of that type (each detector documents its range)
probe         which prompt set / mode produced it (e.g. ``needle:passkey``, ``repeated_random``)
evidence      JSON text: what the score rests on (samples, positions, tokens, thresholds)
============  ==============================================================================

Stored in a run as the `attnlab.runs.DETECTIONS` artifact (columns `attnlab.runs.DETECTION_COLUMNS`).
`write_detections` merges: rows of the same (head_type, probe) are replaced, others kept, so
probes can run one at a time. An existing detections file that cannot be read is an error,
never "no detections" (its rows would be lost by the merge).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import pandas as pd

from attnlab.runs import DETECTION_COLUMNS, DETECTIONS, Run

HEAD_TYPES = (
    "retrieval",
    "retrieval_kv",
    "sink",
    "hidden_sink",
    "induction",
    "previous_token",
    "duplicate_token",
    "local",
    "echo",
    "razor_induction",
    "razor_induction_kv",
    "echo_kv",
)


def detection_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build a detections DataFrame from dict rows; ``evidence`` may be any JSON-able object."""
    records = []
    for r in rows:
        ev = r.get("evidence", {})
        records.append(
            {
                "layer": int(r["layer"]),
                "head": int(r["head"]),
                "kv_head": int(r["kv_head"]),
                "head_type": str(r["head_type"]),
                "score": float(r["score"]),
                "probe": str(r["probe"]),
                "evidence": ev if isinstance(ev, str) else json.dumps(ev, default=_default),
            }
        )
    return pd.DataFrame.from_records(records, columns=list(DETECTION_COLUMNS))


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_detections(run: Run | str | os.PathLike, frame: pd.DataFrame) -> pd.DataFrame:
    """Merge ``frame`` into the run's detections (atomically) and return the merged table.

    Rows of the same (head_type, probe) as ``frame``'s are replaced, others kept. An existing
    file that cannot be read raises `attnlab.errors.RunError` (nothing is written)."""
    run = Run.coerce(run)
    missing = [c for c in DETECTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"detections need columns {missing}")
    with run.locked():  # two probes adding to one run at once must not lose each other's rows
        old = run.read_optional(DETECTIONS)
        if old is not None:
            keys = set(zip(frame["head_type"], frame["probe"], strict=True))
            keep = [(t, p) not in keys for t, p in zip(old["head_type"], old["probe"], strict=True)]
            frame = pd.concat([old[keep], frame], ignore_index=True)
        frame = frame[list(DETECTION_COLUMNS)].reset_index(drop=True)
        run.write(DETECTIONS, frame)
    return frame


def top_heads(detections: pd.DataFrame, head_type: str, k: int = 20) -> pd.DataFrame:
    """The ``k`` highest-scoring heads of one type (mean over probes)."""
    rows = detections[detections["head_type"] == head_type]
    if rows.empty:
        known = sorted(detections["head_type"].unique())
        raise KeyError(f"no {head_type!r} detections in this run (it has {known})")
    agg = rows.groupby(["layer", "head", "kv_head"], as_index=False)["score"].mean()
    return agg.sort_values("score", ascending=False).head(k).reset_index(drop=True)
