"""Head families: group heads that behave alike, and draw them on one 2-D map.

Every head becomes a vector of what is known about it: the mean of each profiled statistic
(``head_stats`` → `attnlab.profile.head_means`: sink mass, local mass, entropy, coverage, ...)
and its score for each detected head type (``detections``, mean over probes; per-KV-head rows
are left out, their query heads have their own). Each feature is standardised to zero mean and
unit variance over heads (constant features are dropped, missing values take the feature's
mean), then

- **PCA** projects the standardised vectors to 2-D (``pc1``, ``pc2``) for the dashboard;
- **KMeans** groups them into families; ``k`` is chosen by the silhouette score over
  ``2 … k_max`` (8 by default; fewer when there are few heads). Silhouette favours few, large
  clusters: on SmolLM2 it scores k = 2 (local vs the rest) at 0.333 and k = 8 at 0.327, although
  only the finer split separates the 8 induction and 3 duplicate-token heads. So the *largest*
  ``k`` whose silhouette is within ``silhouette_tolerance`` (0.02) of the best is taken; well
  separated clusters still win outright, since splitting one costs far more than that;
- each family is **named by its dominant feature**: the feature whose standardised mean in the
  family is highest, in the field's words (``sink_mass_*`` → "sink", ``local_mass_*`` → "local",
  ``entropy_norm`` → "diffuse", ``induction`` → "induction", ...). Two families with the same
  dominant word get their second feature appended ("local+slash").

The result is stored in the run as the `attnlab.runs.FAMILIES` artifact: ``layer, head, kv_head,
pc1, pc2, family_id, family`` plus the raw (unstandardised) feature columns.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from attnlab.profile import head_means
from attnlab.runs import DETECTIONS, FAMILIES, HEAD_STATS, Run

from .base import ProbeError, ProbeResult

#: The manifest stage this step records.
STAGE = "families"
KEY_COLUMNS = ("layer", "head", "kv_head")

_ERR_NOTHING = (
    "run {path} has neither {stats} nor {detections}: run `attnlab profile` or "
    "`attnlab probe all` on it first"
)
_ERR_FEW_HEADS = "families need at least 3 heads with features, got {n}"
_ERR_FEW_FEATURES = "families need at least 2 features that vary across heads, got {have}"
_ERR_K_MAX = "k_max must be at least 2, got {k_max}"

#: Feature-name prefix → the word a family is named by (first match wins).
FAMILY_WORDS = (
    ("hidden_sink", "hidden sink"),
    ("sink", "sink"),
    ("local", "local"),
    ("streaming", "local"),
    ("entropy", "diffuse"),
    ("keys_frac", "diffuse"),
    ("vertical", "vertical"),
    ("slash", "slash"),
    ("razor_induction", "induction"),
    ("induction", "induction"),
    ("previous_token", "previous-token"),
    ("duplicate_token", "duplicate-token"),
    ("echo", "echo"),
    ("retrieval", "retrieval"),
)


def family_word(feature: str) -> str:
    """The family word for a feature name (the feature itself when no prefix matches)."""
    for prefix, word in FAMILY_WORDS:
        if feature.startswith(prefix):
            return word
    return feature


def head_features(run: Run) -> pd.DataFrame:
    """One row per (layer, head): ``layer, head, kv_head`` and one column per feature
    (profiled statistic means, detection scores by head type)."""
    parts = []
    if run.has(HEAD_STATS):
        means = head_means(run)
        means.columns = [str(c) for c in means.columns]
        parts.append(means)
    det = run.read_optional(DETECTIONS)
    if det is not None:
        det = det[det["head"] >= 0]
        if not det.empty:
            wide = det.pivot_table(index=list(KEY_COLUMNS), columns="head_type", values="score", aggfunc="mean").reset_index()
            wide.columns = [str(c) for c in wide.columns]
            parts.append(wide)
    if not parts:
        raise ProbeError(_ERR_NOTHING.format(path=run.path, stats=HEAD_STATS.filename, detections=DETECTIONS.filename))
    frame = parts[0]
    for p in parts[1:]:
        frame = frame.merge(p, on=list(KEY_COLUMNS), how="outer")
    return frame.sort_values(["layer", "head"]).reset_index(drop=True)


def fit_families(
    features: pd.DataFrame, *, k_max: int = 8, silhouette_tolerance: float = 0.02, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Standardise, project (PCA 2-D) and cluster (KMeans, k by silhouette) the heads.

    Args:
        features: ``layer, head, kv_head`` plus numeric feature columns, one row per head.
        k_max: the largest number of families tried (from 2).
        silhouette_tolerance: take the largest ``k`` whose silhouette is at most this far below
            the best (0 = the plain silhouette argmax).
        seed: KMeans / PCA random state.
    Returns:
        ``(families, info)``: the table described in the module docstring, and
        ``{"k", "silhouette": {k: score}, "explained_variance": [pc1, pc2], "features", "dropped"}``.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    if k_max < 2:
        raise ProbeError(_ERR_K_MAX.format(k_max=k_max))
    if silhouette_tolerance < 0:
        raise ProbeError(f"silhouette_tolerance must be 0 or more, got {silhouette_tolerance}")
    cols = [c for c in features.columns if c not in KEY_COLUMNS and pd.api.types.is_numeric_dtype(features[c])]
    x = features[cols].astype(np.float64)
    keep = [c for c in cols if x[c].notna().any() and np.nanstd(x[c].to_numpy()) > 1e-12]
    dropped = [c for c in cols if c not in keep]
    if len(keep) < 2:
        raise ProbeError(_ERR_FEW_FEATURES.format(have=keep))
    n = len(features)
    if n < 3:
        raise ProbeError(_ERR_FEW_HEADS.format(n=n))
    x = x[keep].fillna(x[keep].mean())
    z = ((x - x.mean()) / x.std(ddof=0)).to_numpy()

    pca = PCA(n_components=2, random_state=seed)
    xy = pca.fit_transform(z)

    silhouettes: dict[int, float] = {}
    labels_by_k: dict[int, np.ndarray] = {}
    for k in range(2, min(k_max, n - 1) + 1):
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
        if len(set(km.labels_)) < 2:
            continue
        silhouettes[k] = float(silhouette_score(z, km.labels_))
        labels_by_k[k] = km.labels_
    if not silhouettes:
        raise ProbeError(_ERR_FEW_HEADS.format(n=n))
    top = max(silhouettes.values())
    best_k = max(k for k, v in silhouettes.items() if v >= top - silhouette_tolerance)
    labels = labels_by_k[best_k]

    names = _family_names(z, labels, keep)
    out = features[list(KEY_COLUMNS)].copy().reset_index(drop=True)
    out["pc1"] = xy[:, 0]
    out["pc2"] = xy[:, 1]
    out["family_id"] = labels.astype(np.int64)
    out["family"] = [names[int(c)] for c in labels]
    for c in keep:
        out[c] = features[c].to_numpy(dtype=np.float64)
    info = {
        "k": best_k,
        "silhouette": {str(k): round(v, 4) for k, v in silhouettes.items()},
        "explained_variance": [round(float(v), 4) for v in pca.explained_variance_ratio_],
        "features": keep,
        "dropped": dropped,
        "families": {names[c]: int((labels == c).sum()) for c in sorted(set(labels.tolist()))},
    }
    return out, info


def _family_names(z: np.ndarray, labels: np.ndarray, features: list[str]) -> dict[int, str]:
    """Name each cluster by its dominant feature's word; disambiguate clashes."""
    order: dict[int, list[str]] = {}
    for c in sorted(set(labels.tolist())):
        centroid = z[labels == c].mean(0)
        words = []
        for i in np.argsort(-centroid):
            w = family_word(features[i])
            if w not in words:
                words.append(w)
        order[c] = words
    names = {c: words[0] for c, words in order.items()}
    for name in list(names.values()):
        clashes = [d for d, other in names.items() if other == name]
        if len(clashes) > 1:
            for d in clashes:
                second = order[d][1] if len(order[d]) > 1 else str(d)
                names[d] = f"{order[d][0]}+{second}"
    seen: dict[str, int] = {}
    for c in sorted(names):  # still equal (same first two words): number them
        seen[names[c]] = seen.get(names[c], 0) + 1
        if seen[names[c]] > 1:
            names[c] = f"{names[c]} {seen[names[c]]}"
    return names


def compute_families(
    run: Run | str | os.PathLike, *, k_max: int = 8, silhouette_tolerance: float = 0.02, seed: int = 0
) -> ProbeResult:
    """Compute the head families of a run and store them in it (`attnlab.runs.FAMILIES`).

    Args:
        run: a `Run` or its path; it needs head statistics and/or detections.
        k_max: the largest number of families tried.
        silhouette_tolerance: see `fit_families`.
        seed: random state.
    Returns:
        A `ProbeResult` whose ``tables["families"]`` is the families table (also written) and
        whose summary is the fit's (also in the manifest under ``stages["families"]``).
    """
    run = Run.coerce(run)
    families, info = fit_families(head_features(run), k_max=k_max, silhouette_tolerance=silhouette_tolerance, seed=seed)
    run.write(FAMILIES, families)
    run.record_stage(STAGE, parameters={"k_max": k_max, "silhouette_tolerance": silhouette_tolerance, "seed": seed}, summary=info)
    return ProbeResult(run, summary=info, tables={FAMILIES.key: families})
