"""Synthetic profiled runs: plausible attention without a model, for tests, demos and docs.

Each head follows one archetype of the attention the field keeps finding:

- ``sink_local``: a strong first-token sink plus a decaying local window (streaming heads);
- ``local``: mostly the last few tokens;
- ``vertical``: the sink plus a few input-specific columns (MInference's vertical lines);
- ``slash``: attention at fixed relative offsets (diagonals);
- ``retrieval``: diffuse, content-driven attention that no static pattern covers.

`synthetic_attention` draws one sample's attention probabilities ``[n, n]`` for an archetype;
`make_synthetic_run` profiles several samples into a run directory with the same tables the
real profiler writes (`HEAD_STATS`, `BLOCK_MAPS`, and `DETECTIONS` with retrieval scores, see
`attnlab.runs`), so every later stage can run on it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnlab.runs import (
    BLOCK_MAPS,
    DETECTION_COLUMNS,
    DETECTIONS,
    HEAD_STATS,
    HEAD_STATS_COLUMNS,
    MANIFEST,
    BlockMaps,
    Run,
    new_manifest,
    write_json,
    write_parquet,
)

ARCHETYPES = ("sink_local", "local", "vertical", "slash", "retrieval")
SINK_TOKENS = (1, 4)
WINDOWS = (16, 64, 256, 1024)
BUDGETS = (16, 64, 256)


def synthetic_attention(n: int, archetype: str, seed: int = 0, strength: float = 1.0) -> torch.Tensor:
    """One sample's causal attention probabilities ``[n, n]`` (float64) for an archetype."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    dist = i - j
    noise = torch.randn(n, n, generator=g, dtype=torch.float64)
    logits = 0.3 * noise
    if archetype == "sink_local":
        logits = logits + 6.0 * strength * (j == 0) - dist / (12.0 + 20.0 * torch.rand(1, generator=g, dtype=torch.float64))
    elif archetype == "local":
        logits = logits + 1.5 * (j == 0) - dist / 4.0
    elif archetype == "vertical":
        cols = torch.randint(1, n, (max(2, n // 128),), generator=g)
        bonus = torch.zeros(n, dtype=torch.float64)
        bonus[cols] = 5.0
        logits = logits + 4.0 * (j == 0) + bonus[None, :] - dist / 32.0
    elif archetype == "slash":
        offs = torch.tensor([0, 7, 37, 150])
        bonus = torch.zeros(n, dtype=torch.float64)
        bonus[offs[offs < n]] = 4.0
        logits = logits + 2.0 * (j == 0) + bonus[dist.clamp(0, n - 1).long()] - dist / 400.0
    elif archetype == "retrieval":
        logits = 1.5 * noise + 1.0 * (j == 0)
    else:
        raise ValueError(f"unknown archetype {archetype!r}: use one of {', '.join(ARCHETYPES)}")
    logits = logits.masked_fill(j > i, -math.inf)
    return torch.softmax(logits, dim=-1)


def sample_statistics(probs: torch.Tensor) -> dict[str, float]:
    """The statistics of ``attnlab.stats`` for one head and sample (all queries measured)."""
    n = probs.shape[-1]
    col = probs.sum(0)
    idx = torch.arange(n)
    diag = torch.zeros(n, dtype=probs.dtype).index_add_(0, _diag_index(n), probs.reshape(-1))
    out: dict[str, float] = {}
    for s in SINK_TOKENS:
        out[f"sink_mass_{s}"] = float(col[: min(s, n)].sum() / n)
    for w in WINDOWS:
        out[f"local_mass_{w}"] = float(diag[: min(w, n)].sum() / n)
    ent = -torch.special.xlogy(probs, probs).sum(-1)[1:] / torch.log(idx[1:].to(probs.dtype) + 1)
    out["entropy_norm"] = float(ent.mean())
    srt = torch.sort(probs, dim=-1, descending=True).values.cumsum(-1)
    for c in (0.90, 0.95):
        need = (srt < c).sum(-1).to(probs.dtype) + 1
        out[f"keys_frac_{int(round(c * 100))}"] = float((need.clamp(max=idx + 1) / (idx + 1)).mean())
    for k in BUDGETS:
        out[f"vertical_mass_{k}"] = float(torch.topk(col, min(k, n)).values.sum() / n)
        out[f"slash_mass_{k}"] = float(torch.topk(diag, min(k, n)).values.sum() / n)
    return out


@lru_cache(maxsize=8)
def _diag_index(n: int) -> torch.Tensor:
    """``i - j`` for every (i, j), flattened; above the diagonal it points at a zero cell."""
    idx = torch.arange(n)
    return (idx[:, None] - idx[None, :]).clamp(min=0).reshape(-1)


def block_pool(probs: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mean-mass and max maps ``[QB, KB]`` of one head's ``[n, n]`` probabilities."""
    n = probs.shape[-1]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    p = torch.nn.functional.pad(probs, (0, pad, 0, pad)).reshape(nb, block_size, nb, block_size)
    rows = torch.full((nb,), float(block_size), dtype=probs.dtype)
    rows[-1] = n - (nb - 1) * block_size
    return p.sum((1, 3)) / rows[:, None], p.amax((1, 3))


def head_archetype(layer: int, head: int, retrieval_heads: Sequence[tuple[int, int]]) -> str:
    """The archetype of ``(layer, head)`` in `make_synthetic_run`."""
    if (layer, head) in {tuple(x) for x in retrieval_heads}:
        return "retrieval"
    return ARCHETYPES[(layer * 7 + head * 3) % 4]


def make_synthetic_run(
    path: str | os.PathLike,
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    lengths: Sequence[int] = (512, 512),
    block_size: int = 64,
    n_ctx: int = 4096,
    seed: int = 0,
    retrieval_heads: Sequence[tuple[int, int]] = ((1, 3),),
    name: str = "synthetic-llm",
    detections: bool = True,
) -> Run:
    """Write a complete synthetic run directory at ``path`` and open it.

    Samples ``s`` of head ``(l, h)`` use seed ``seed + 1000 * s + 31 * l + h`` (so tests can
    redraw them with `synthetic_attention`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = {"name": name, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
             "head_dim": 64, "n_ctx": n_ctx, "source": "synthetic"}
    group = n_heads // n_kv_heads
    nb_max = -(-max(lengths) // block_size)
    acc_sum = torch.zeros(n_layers, n_heads, nb_max, nb_max, dtype=torch.float64)
    acc_max = torch.zeros_like(acc_sum)
    count = torch.zeros(nb_max, nb_max, dtype=torch.int64)
    rows = []
    for s, n in enumerate(lengths):
        nb = -(-n // block_size)
        count[:nb, :nb] += 1
        for lay in range(n_layers):
            for head in range(n_heads):
                arch = head_archetype(lay, head, retrieval_heads)
                probs = synthetic_attention(n, arch, seed + 1000 * s + 31 * lay + head)
                bs, bm = block_pool(probs, block_size)
                acc_sum[lay, head, :nb, :nb] += bs
                acc_max[lay, head, :nb, :nb] += bm
                for stat, value in sample_statistics(probs).items():
                    rows.append((lay, head, head // group, stat, "synthetic", s, n, value))
    denom = count.clamp(min=1).to(torch.float64)
    manifest = new_manifest("profile", model, {"lengths": [int(n) for n in lengths], "probe": "synthetic",
                                               "stat_config": {"block_size": block_size}})
    write_parquet(path / HEAD_STATS, pd.DataFrame(rows, columns=list(HEAD_STATS_COLUMNS)))
    BlockMaps(block_size, (acc_sum / denom).to(torch.float32), (acc_max / denom).to(torch.float32), count.to(torch.int32)).save(path / BLOCK_MAPS)
    if detections:
        rng = np.random.default_rng(seed)
        det = []
        for lay in range(n_layers):
            for head in range(n_heads):
                arch = head_archetype(lay, head, retrieval_heads)
                score = 0.4 + 0.2 * rng.random() if arch == "retrieval" else 0.05 * rng.random()
                det.append((lay, head, head // group, "retrieval", float(score), "needle", "synthetic"))
        write_parquet(path / DETECTIONS, pd.DataFrame(det, columns=list(DETECTION_COLUMNS)))
    manifest["status"] = "complete"
    write_json(path / MANIFEST, manifest)
    return Run.open(path)
