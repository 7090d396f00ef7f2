"""What each target tool runs from an exported file: token-level masks, written from the tools' source.

Every exporter (`attnlab.sparsity_stats.export`) writes a file another stack loads. What that
stack then *runs* is decided by its own reading code, not by attnlab's compiler; each function
here re-states that reading code's semantics (in our own code, citing the tool's file and
function) and returns the token-level mask the tool would run, bool ``[heads, n, n]`` per layer
(query ``i`` attends key ``j``), for a prefill of ``n`` tokens:

==============  ==========================================  =====================================
format          emulator                                    target semantics
==============  ==========================================  =====================================
``minference``  `minference_masks`                          MInference ``minference_forward.py``
``duo``         `duo_masks`                                 DuoAttention ``utils.py``, ``patch/llama.py``
``flex``        `flex_masks`                                PyTorch ``BlockMask.from_kv_blocks``
``flashinfer``  `flashinfer_masks`                          FlashInfer ``BlockSparseAttentionWrapper``
``npz``,        `mask_file_masks`                           the numpy-only reader of the README
``safetensors``
==============  ==========================================  =====================================

Dynamic kinds select per input: pass ``qk`` (a function of the layer giving post-RoPE
``q [H, n, d]`` and ``k [H_kv, n, d]``) to select as the tool does; without it, the selection
uses attnlab's *prior* (earliest columns, nearest diagonals), the same one the compiler uses
without an input, so a mask with no input is comparable with `BlockSparseLayout.token_mask`.

`deployed_masks` exports a policy to a temporary folder and emulates the result;
`compare_deployment` sets it against the layouts attnlab validates and reports, per head, the
density as deployed, the pairs added and dropped and the heads that run dense. ``attnlab
export`` prints that report; a `Deployment` (one export, read back once) gives per layer and
input the mask ``attnlab validate --as FORMAT`` runs the model with.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .kinds import get_kind

Tensor = torch.Tensor
QK = Callable[[int], tuple[Tensor, Tensor]]

# -- MInference's constants (minference/modules/minference_forward.py) -------------------------
#: Query and key tile of MInference's kernels (``block_size_M``/``block_size_N``); fixed.
MI_BLOCK = 64
#: The last queries whose attention estimates columns and diagonals (``last_q``).
MI_LAST_Q = 64
#: ``vertical_and_slash_kernel`` raises sizes to at least these (``max(vertical_size, 30)`` ...).
MI_MIN_VERTICAL = 30
MI_MIN_SLASH = 50
#: ... and always ranks the first 30 key columns and the last 100 diagonals first.
MI_FORCED_COLUMNS = 30
MI_FORCED_DIAGONALS = 100
#: ``block_sparse_kernel`` keeps this many 64-token key blocks per query block, whatever the config says.
MI_BLOCK_SPARSE_TOPK = 100
#: A head missing from the config runs this (``self.best_pattern.get(head_id, ...)``).
MI_DEFAULT_PATTERN = ("vertical_and_slash", 1000, 6096, 1)

#: Phases of DuoAttention's attention (`duo_masks`).
DUO_PHASES = ("decode", "chunked", "prefill")


def _causal(n: int) -> Tensor:
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def _expand_kv(k: Tensor, n_heads: int) -> Tensor:
    return k if k.shape[0] == n_heads else k.repeat_interleave(n_heads // k.shape[0], dim=0)


# -- MInference ---------------------------------------------------------------------------------
def minference_vs_sizes(vertical_size: int, slash_size: int, n: int) -> tuple[int, int]:
    """The sizes ``vertical_and_slash_kernel`` really uses at ``n`` tokens: raised to its minimums
    (30 columns, 50 diagonals), capped at ``n``."""
    return min(n, max(int(vertical_size), MI_MIN_VERTICAL)), min(n, max(int(slash_size), MI_MIN_SLASH))


def _rank_desc(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest ``scores``, ties to the lower index (a deterministic stand-in
    for ``torch.topk``, whose order among equal values is unspecified)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k]


def minference_vs_indices(n: int, vertical_size: int, slash_size: int, q: Tensor | None = None,
                          k: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Key columns (ascending) and diagonal distances (``query - key``) MInference selects for one
    head, as ``vertical_and_slash_kernel`` in ``minference_forward.py`` does: softmax attention of
    the last 64 queries (scaled by ``1/sqrt(d)``, causal among themselves); column sums with the
    first 30 columns ranked first; diagonal sums with the last 100 diagonals (distances 0..99)
    ranked first; the top ``vertical_size`` columns and ``slash_size`` diagonals after
    `minference_vs_sizes`. Without ``q``/``k`` (``[n, d]`` each) the prior ranks earlier
    columns and nearer diagonals first. Ties go to earlier columns and nearer diagonals."""
    v, s = minference_vs_sizes(vertical_size, slash_size, n)
    dist = torch.arange(n)
    if q is None or k is None:
        col_score = -torch.arange(n, dtype=torch.float64)
        diag_score = -dist.to(torch.float64)
    else:
        lq = min(MI_LAST_Q, n)
        logits = (q[n - lq:].double() @ k.double().T) / math.sqrt(q.shape[-1])
        rows = torch.arange(n - lq, n)
        logits = logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], -math.inf)
        att = torch.softmax(logits, dim=-1)  # [lq, n]
        col_score = att.sum(0)
        d = (rows[:, None] - torch.arange(n)[None, :])  # distance of each (query, key) pair
        ok = d >= 0
        diag_score = torch.zeros(n, dtype=torch.float64).index_add_(0, d[ok], att[ok])
    col_score = col_score.clone()
    diag_score = diag_score.clone()
    col_score[:MI_FORCED_COLUMNS] = math.inf
    diag_score[:MI_FORCED_DIAGONALS] = math.inf
    cols = torch.sort(_rank_desc(col_score, v)).values
    dists = _rank_desc(diag_score, s)
    return cols, dists


def minference_vs_mask(n: int, cols: Tensor, dists: Tensor) -> Tensor:
    """Token mask ``[n, n]`` MInference runs for selected columns and diagonals.

    Re-states ``convert_vertical_slash_indexes`` (``csrc/vertical_slash_index.cu``) and the
    sparse kernel (``ops/pit_sparse_flash_attention_v2.py``): per 64-row query block, each
    diagonal becomes the 64-key range it crosses, ranges closer than 64 keys are merged by
    growing the current one 64 keys at a time, and the kernel computes those ranges whole
    (causal-masked); columns that fall in a gap between ranges are computed one by one;
    columns inside a range, or past the last range, add nothing.
    """
    out = torch.zeros(n, n, dtype=torch.bool)
    col_list = sorted(int(c) for c in cols.tolist())
    dist_desc = sorted((int(d) for d in dists.tolist()), reverse=True)
    causal = _causal(n)
    for start in range(0, n, MI_BLOCK):
        end = start + MI_BLOCK
        ends = [max(end - d, MI_BLOCK) for d in dist_desc if d < end]  # ascending range ends
        ranges: list[tuple[int, int]] = []
        taken: list[int] = []
        ci = 0
        cur: tuple[int, int] | None = None
        for e in ends:
            if cur is None:
                cur = (e - MI_BLOCK, e)
            elif e > cur[1] + MI_BLOCK:
                ranges.append(cur)
                cur = (e - MI_BLOCK, e)
            elif e > cur[1]:
                cur = (cur[0], cur[1] + MI_BLOCK)
            else:
                continue
            # columns below the current range's end are settled: in a gap, or inside a range
            while ci < len(col_list) and col_list[ci] < cur[1]:
                if col_list[ci] < cur[0] and not any(a <= col_list[ci] < b for a, b in ranges):
                    taken.append(col_list[ci])
                ci += 1
        if cur is not None:
            ranges.append(cur)
        rows = slice(start, min(end, n))
        for a, b in ranges:
            out[rows, a:min(b, n)] = True
        out[rows] &= causal[rows]
        keep = [c for c in taken if c < n]
        if keep:
            out[rows, keep] = True
    return out


def minference_stream_mask(n: int, n_init: int, n_local: int) -> Tensor:
    """``stream_llm``: ``streaming_forward`` (``ops/streaming_kernel.py``) attends a sliding
    window of ``n_local`` keys that includes the query (``0 <= i - j < n_local``) and the first
    ``n_init`` keys; token-exact."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & ((i - j < int(n_local)) | (j < int(n_init)))


def minference_block_sparse_blocks(n: int, q: Tensor | None = None, k: Tensor | None = None) -> Tensor:
    """Key blocks ``[QB, KB]`` (64 tokens each) ``block_sparse_attention`` computes per query block
    (``ops/block_sparse_flash_attention.py``, ``_build_block_index`` and its kernel): inputs padded
    with zeros by ``64 - n % 64`` (a whole block when ``n`` is a multiple of 64), queries and keys
    mean-pooled over 64, the top ``min(100, padded blocks)`` causal blocks by pooled ``q . k``;
    query block ``m`` reads the first ``min(m + 1, top)`` of them in index order (all its causal
    blocks while ``m < 100``). Without ``q``/``k`` the prior ranks the first block, then nearer
    blocks, first (attnlab's `prior_block_scores` at 64)."""
    pad = MI_BLOCK - (n & (MI_BLOCK - 1))
    nb_pad = (n + pad) // MI_BLOCK
    qb = torch.arange(nb_pad)[:, None]
    kb = torch.arange(nb_pad)[None, :]
    if q is None or k is None:
        score = -torch.minimum(kb, qb - kb).clamp(min=0).double()
    else:
        d = q.shape[-1]
        qp = torch.nn.functional.pad(q.double(), (0, 0, 0, pad)).reshape(nb_pad, MI_BLOCK, d).mean(1)
        kp = torch.nn.functional.pad(k.double(), (0, 0, 0, pad)).reshape(nb_pad, MI_BLOCK, d).mean(1)
        score = qp @ kp.T
    score = score.masked_fill(kb > qb, -math.inf)
    top = min(MI_BLOCK_SPARSE_TOPK, nb_pad)
    out = torch.zeros(nb_pad, nb_pad, dtype=torch.bool)
    for m in range(nb_pad):
        causal_blocks = m + 1
        if causal_blocks <= top:
            out[m, :causal_blocks] = True
        else:
            out[m, _rank_desc(score[m], top)] = True
    nb = -(-n // MI_BLOCK)
    return out[:nb, :nb]


def minference_head_mask(entry: Sequence[Any] | None, n: int, q: Tensor | None = None, k: Tensor | None = None) -> Tensor:
    """Token mask ``[n, n]`` of one head's config entry ``[kind, vertical_size, slash_size, score]``
    (None: MInference's default for a missing head), as ``minference_forward`` dispatches it."""
    kind, v, s = (entry or MI_DEFAULT_PATTERN)[:3]
    if kind == "stream_llm":
        return minference_stream_mask(n, int(v), int(s))
    if kind == "vertical_and_slash":
        cols, dists = minference_vs_indices(n, int(v), int(s), q, k)
        return minference_vs_mask(n, cols, dists)
    if kind == "block_sparse":  # both numbers are ignored: block_sparse_kernel passes topk=100
        blocks = minference_block_sparse_blocks(n, q, k)
        tok = blocks.repeat_interleave(MI_BLOCK, 0).repeat_interleave(MI_BLOCK, 1)[:n, :n]
        return tok & _causal(n)
    raise ValueError(f"unknown MInference kind {kind!r}")


def minference_masks(config: Sequence[dict[str, Any]], n: int, qk: QK | None = None, n_heads: int | None = None) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]``: what MInference runs for ``config`` (its per-layer
    ``{head: [kind, vertical, slash, score]}`` list) on a prefill of ``n`` tokens (a single
    query, ``n == 1``, is dense in MInference). Masks of heads with the same entry and no input
    are computed once."""
    out = []
    cache: dict[str, Tensor] = {}
    for lay, layer in enumerate(config):
        h_count = n_heads or len(layer)
        q = k = None
        if qk is not None:
            q, k = qk(lay)
            k = _expand_kv(k, q.shape[0])
        heads = []
        for h in range(h_count):
            entry = layer.get(str(h))
            if n == 1:
                heads.append(torch.ones(1, 1, dtype=torch.bool))
                continue
            dynamic = q is not None and (entry or MI_DEFAULT_PATTERN)[0] != "stream_llm"
            if dynamic:
                heads.append(minference_head_mask(entry, n, q[h], k[h]))
            else:
                key = json.dumps(list((entry or MI_DEFAULT_PATTERN)[:3]))
                if key not in cache:
                    cache[key] = minference_head_mask(entry, n)
                heads.append(cache[key])
        out.append(torch.stack(heads))
    return out


# -- DuoAttention --------------------------------------------------------------------------------
def duo_full_heads(gates: np.ndarray, *, sparsity: float | None = None, threshold: float | None = None,
                   noise_seed: int | None = None) -> np.ndarray:
    """Which KV heads run full attention, as ``sparsify_attention_heads`` (``duo_attn/utils.py``)
    decides from the clipped gates: with ``sparsity``, the threshold is the ``sparsity``
    quantile of all gates (all full at ``<= 0``, none at ``>= 1``); a head is full when its gate
    is ``>=`` the threshold. Duo adds uniform noise below 1e-6 to break ties: attnlab's exports
    space gates far wider, so by default the emulation leaves it out; ``noise_seed`` adds it
    (tied gates, e.g. 0/1 files, then split at random as in Duo)."""
    g = np.clip(np.asarray(gates, dtype=float), 0, 1)
    if noise_seed is not None:
        g = g + np.random.default_rng(noise_seed).uniform(0, 1e-6, g.shape)
    if sparsity is not None:
        if sparsity >= 1:
            return np.zeros(g.shape, dtype=bool)
        if sparsity <= 0:
            return np.ones(g.shape, dtype=bool)
        threshold = float(np.quantile(g, sparsity))
    if threshold is None:
        raise ValueError("DuoAttention needs a sparsity (or a threshold)")
    return g >= threshold


def duo_streaming_mask(n: int, sink: int, recent: int, chunk: int) -> Tensor:
    """One streaming head's token mask over ``n`` tokens fed ``chunk`` at a time
    (``llama_duo_attention_forward_one_way_reordered``, ``duo_attn/patch/llama.py``): the first
    chunk (``q_len == kv_seq_len``) is dense causal attention for every head; a later chunk
    starting at ``c0`` sees the streaming cache, the first ``sink`` keys and the ``recent`` keys
    before ``c0`` once the cache was cut (more than ``sink + recent`` keys), else every earlier
    key, plus its own keys causally. ``chunk = 1`` is decoding: ``j < sink or i - j <= recent``."""
    out = _causal(n).clone()
    j = torch.arange(n)
    for c0 in range(chunk, n, chunk):
        if c0 > sink + recent:
            seen = (j < sink) | ((j >= c0 - recent) & (j < c0)) | (j >= c0)
            out[c0:c0 + chunk] &= seen[None, :]
    return out


def read_duo(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``full_attention_heads.tsv`` gates ``[layers, kv_heads]`` and ``config.json`` of a Duo
    pattern folder (or the TSV), as ``load_attn_pattern`` (``duo_attn/utils.py``) reads them."""
    p = Path(path)
    tsv = p / "full_attention_heads.tsv" if p.is_dir() else p
    gates = np.clip(np.loadtxt(tsv, dtype=float, delimiter="\t", ndmin=2), 0, 1)
    cfg = json.loads((tsv.parent / "config.json").read_text())
    return gates, cfg


def duo_masks(path: str | os.PathLike, n: int, n_heads: int, *, phase: str = "decode", chunk: int | None = None,
              sparsity: float | None = None, noise_seed: int | None = None) -> list[Tensor]:
    """Per layer, bool ``[n_heads, n, n]``: what DuoAttention runs from a pattern folder over
    ``n`` tokens. ``phase``: ``decode`` (one token at a time after a one-token prefill: the
    streaming rule per token), ``chunked`` (``chunk`` tokens per forward) or ``prefill`` (one
    forward: dense for every head). ``sparsity`` defaults to the one the export recorded."""
    gates, cfg = read_duo(path)
    return duo_masks_from(gates, cfg, n, n_heads, phase=phase, chunk=chunk, sparsity=sparsity, noise_seed=noise_seed)


def duo_masks_from(gates: np.ndarray, cfg: dict[str, Any], n: int, n_heads: int, *, phase: str = "decode",
                   chunk: int | None = None, sparsity: float | None = None, noise_seed: int | None = None) -> list[Tensor]:
    """`duo_masks` from gates ``[layers, kv_heads]`` and a ``config.json`` already read."""
    if phase not in DUO_PHASES:
        raise ValueError(f"phase must be one of {DUO_PHASES}")
    if sparsity is None:
        sparsity = cfg.get("sparsity")
    full = duo_full_heads(gates, sparsity=sparsity, threshold=None if sparsity is not None else 0.5, noise_seed=noise_seed)
    size = {"decode": 1, "prefill": n, "chunked": chunk}[phase]
    if not size or size < 1:
        raise ValueError("phase 'chunked' needs chunk >= 1")
    stream = duo_streaming_mask(n, int(cfg["sink_size"]), int(cfg["recent_size"]), int(size))
    dense = _causal(n)
    group = n_heads // full.shape[1]
    return [torch.stack([dense if full[lay, h // group] else stream for h in range(n_heads)]) for lay in range(full.shape[0])]


# -- FlexAttention ---------------------------------------------------------------------------------
def flex_masks(path: str | os.PathLike, *, with_mask_mod: bool = True, compiled: bool = True) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]``: what ``flex_attention`` runs with the BlockMask that
    ``BlockMask.from_kv_blocks`` (``torch/nn/attention/flex_attention.py``) builds from an
    exported flex file. Compiled Flex computes full blocks unmasked and partial blocks through
    the ``mask_mod``; without one (the file's tensors alone) it computes partial blocks whole.
    Eager Flex (``compiled=False``) ignores the block lists and calls the ``mask_mod`` for every
    pair: everything without one. ``with_mask_mod``: the README loader's (block membership,
    causal, bounds, per-head sink/window), exact either way."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlab"])
    t = load_file(str(path))
    n, b = int(meta["seq_len"]), int(meta["block_size"])
    out = []
    if not with_mask_mod and not compiled:
        return [torch.ones(int(t[f"layer{lay}.sink"].numel()), n, n, dtype=torch.bool) for lay in range(int(meta["n_layers"]))]
    for lay in range(int(meta["n_layers"])):
        full = _padded_blocks(t[f"layer{lay}.full_kv_num_blocks"], t[f"layer{lay}.full_kv_indices"])
        part = _padded_blocks(t[f"layer{lay}.kv_num_blocks"], t[f"layer{lay}.kv_indices"])
        def tok(x: Tensor) -> Tensor:
            return x.repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :n, :n]
        if with_mask_mod:
            i = torch.arange(n)[None, :, None]
            j = torch.arange(n)[None, None, :]
            s = t[f"layer{lay}.sink"].long()[:, None, None]
            w = t[f"layer{lay}.window"].long()[:, None, None]
            pred = (j <= i) & ((w == 0) | (j < s) | (i - j < w))
            out.append(tok(full) | (tok(part) & pred))
        else:
            out.append(tok(full) | tok(part))
    return out


def _padded_blocks(num: Tensor, idx: Tensor) -> Tensor:
    """Dense ``[H, QB, KB]`` from Flex's padded ``num_blocks [1, H, QB]`` and ``indices [1, H, QB, KB]``."""
    num, idx = num[0].long(), idx[0].long()
    kb = idx.shape[-1]
    used = torch.arange(kb)[None, None, :] < num[..., None]
    dense = torch.zeros(*num.shape, kb + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(used, idx, kb), True)
    return dense[..., :kb]


# -- FlashInfer ------------------------------------------------------------------------------------
def flashinfer_masks(path: str | os.PathLike) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]``: what FlashInfer's ``BlockSparseAttentionWrapper``
    (``flashinfer/sparse.py``, ``plan``/``run``) computes from an exported file, one wrapper per
    KV head: the BSR rows (``indptr``/``indices``) select ``R x C`` blocks and, because a
    per-element ``mask (nnz, R, C)`` is given, only its pairs inside them (``causal`` is then
    ignored by ``plan``); every query head of a KV group shares them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlab"])
    t = load_file(str(path))
    n, b, group, nkv = int(meta["seq_len"]), int(meta["block_size"]), int(meta["group"]), int(meta["n_kv_heads"])
    qb = n // b
    out = []
    for lay in range(int(meta["n_layers"])):
        heads = []
        for g in range(nkv):
            indptr = t[f"layer{lay}.kv{g}.indptr"].long()
            cols = t[f"layer{lay}.kv{g}.indices"].long()
            mask = t[f"layer{lay}.kv{g}.mask"].bool()
            rows = torch.repeat_interleave(torch.arange(qb), indptr[1:] - indptr[:-1])
            tiles = torch.zeros(qb, qb, b, b, dtype=torch.bool)
            tiles[rows, cols] = mask
            tok = tiles.permute(0, 2, 1, 3).reshape(n, n)
            heads.extend([tok] * group)
        out.append(torch.stack(heads))
    return out


# -- npz / safetensors --------------------------------------------------------------------------------
def mask_file_masks(path: str | os.PathLike) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]`` of an npz or safetensors mask file, read the way the README's
    numpy-only reader reads it (the metadata's ``arrays`` description: CSR rows per (head, query
    block), full and partial lists, then the token predicate inside partial blocks)."""
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: np.array(z[k]) for k in z.files if k != "__meta__"}
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(p), framework="np") as f:
            meta = json.loads(f.metadata()["attnlab"])
        arrays = load_file(str(p))
    n, b = int(meta["seq_len"]), int(meta["block_size"])
    qb = -(-n // b)
    out = []
    for lay in range(int(meta["n_layers"])):
        a = {name: arrays[f"layer{lay}.{name}"].astype(np.int64) for name in
             ("full_kv_count", "full_kv_offset", "full_kv_index", "kv_count", "kv_offset", "kv_index", "sink", "window")}
        h_count = a["sink"].shape[0]
        full = np.zeros((h_count, qb, qb), dtype=bool)
        part = np.zeros((h_count, qb, qb), dtype=bool)
        for dense, pre in ((full, "full_kv"), (part, "kv")):
            for h in range(h_count):
                for m in range(qb):
                    o, c = a[f"{pre}_offset"][h, m], a[f"{pre}_count"][h, m]
                    dense[h, m, a[f"{pre}_index"][o:o + c]] = True
        i = np.arange(n)[None, :, None]
        j = np.arange(n)[None, None, :]
        s, w = a["sink"][:, None, None], a["window"][:, None, None]
        pred = (j <= i) & ((w == 0) | (j < s) | (i - j < w))
        def tok(x: np.ndarray) -> np.ndarray:
            return x.repeat(b, 1).repeat(b, 2)[:, :n, :n]
        out.append(torch.from_numpy(tok(full) | (tok(part) & pred)))
    return out


# -- a policy as deployed ---------------------------------------------------------------------------
def deployed_masks(policy: Any, fmt: str, n: int, *, block_size: int | None = None, qk: QK | None = None,
                   phase: str = "decode", chunk: int | None = None, lossy: bool = True,
                   export_len: int | None = None, flex_mask_mod: bool = False, flex_compiled: bool = True) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]``: what the target tool runs at ``n`` tokens from the file
    ``attnlab export --format fmt`` writes for ``policy`` (exported at ``export_len``, default
    ``n``). The export goes to a temporary folder; ``lossy`` as ``--lossy``. Flex: the file's
    tensors alone unless ``flex_mask_mod`` (the README loader), compiled unless not
    ``flex_compiled``. Mask formats hold one length:
    ``n`` must equal the export length."""
    from .export import FILENAMES, export_policy

    m = export_len or n
    with tempfile.TemporaryDirectory() as tmp:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_policy(policy, tmp, fmt, seq_len=m, block_size=block_size, lossy=lossy)
        path = Path(tmp) / FILENAMES[fmt][0]
        if fmt == "minference":
            return minference_masks(json.loads(path.read_text()), n, qk, n_heads=policy.n_heads)
        if fmt == "duo":
            return duo_masks(tmp, n, policy.n_heads, phase=phase, chunk=chunk)
        if n != m:
            raise ValueError(f"a {fmt} file holds masks for {m} tokens only")
        if fmt == "flex":
            return flex_masks(path, with_mask_mod=flex_mask_mod, compiled=flex_compiled)
        if fmt == "flashinfer":
            return flashinfer_masks(path)
        return mask_file_masks(path)


class Deployment:
    """A policy exported once to ``fmt`` and read back as the target reads it, for per-input use
    (``attnlab validate --as FORMAT``): `layer_mask` gives, for one layer and one input, the
    token mask the target runs. ``seq_len``: the export length (required for the mask formats,
    whose files hold one length; the config formats default to the policy's longest profiled
    length, as ``attnlab export`` does). Nothing stays on disk."""

    def __init__(self, policy: Any, fmt: str, *, seq_len: int | None = None, block_size: int | None = None,
                 lossy: bool = True, phase: str = "decode", chunk: int | None = None, flex_mask_mod: bool = True) -> None:
        from .export import FILENAMES, export_policy

        self.policy, self.fmt, self.phase, self.chunk = policy, fmt, phase, chunk
        self.seq_len = seq_len
        with tempfile.TemporaryDirectory() as tmp:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_policy(policy, tmp, fmt, seq_len=seq_len, block_size=block_size, lossy=lossy)
            path = Path(tmp) / FILENAMES[fmt][0]
            self.config: Any = None
            self.duo: tuple[np.ndarray, dict[str, Any]] | None = None
            self.masks: list[Tensor] | None = None
            if fmt == "minference":
                self.config = json.loads(path.read_text())
            elif fmt == "duo":
                self.duo = read_duo(tmp)
            elif fmt == "flex":
                self.masks = flex_masks(path, with_mask_mod=flex_mask_mod)
            elif fmt == "flashinfer":
                self.masks = flashinfer_masks(path)
            else:
                self.masks = mask_file_masks(path)
        self._duo_cache: dict[int, list[Tensor]] = {}

    def layer_mask(self, layer: int, q: Tensor, k: Tensor) -> Tensor:
        """Bool ``[H, n, n]``: what the target runs for ``layer`` on one prefill (``q [H, n, d]``,
        ``k [H_kv, n, d]``, post-RoPE); MInference's dynamic heads select from this q/k."""
        n = int(q.shape[-2])
        if self.config is not None:
            return minference_masks([self.config[layer]], n, lambda _: (q, k), n_heads=self.policy.n_heads)[0]
        if self.duo is not None:
            if n not in self._duo_cache:
                self._duo_cache = {n: duo_masks_from(*self.duo, n, self.policy.n_heads, phase=self.phase, chunk=self.chunk)}
            return self._duo_cache[n][layer]
        assert self.masks is not None
        if n != self.masks[layer].shape[-1]:
            raise ValueError(f"a {self.fmt} file holds masks for {self.masks[layer].shape[-1]} tokens, the input has {n}: "
                             f"export at --seq-len {n}")
        return self.masks[layer]


def deployed_masks_for_input(policy: Any, fmt: str, layer: int, q: Tensor, k: Tensor, **kwargs: Any) -> Tensor:
    """Bool ``[H, n, n]``: what the target runs for one layer on one input (``q [H, n, d]``,
    ``k [H_kv, n, d]``, post-RoPE), exported at the input's length. For many layers or inputs
    build one `Deployment` and call its `Deployment.layer_mask`."""
    return Deployment(policy, fmt, seq_len=int(q.shape[-2]), **kwargs).layer_mask(layer, q, k)


def validated_masks(policy: Any, n: int, *, block_size: int | None = None, qk: QK | None = None) -> list[Tensor]:
    """Per layer, bool ``[H, n, n]``: the masks attnlab validates (`BlockSparseLayout.token_mask`
    of the compiled policy; dynamic heads from ``qk`` as `compile_for_input` selects, else the prior)."""
    import warnings

    from .masks import compile_for_input, compile_layer

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lay in range(policy.n_layers):
            if qk is not None:
                q, k = qk(lay)
                out.append(compile_for_input(policy, lay, q, k, block_size).token_mask())
            else:
                out.append(compile_layer(policy, lay, n, block_size).token_mask())
    return out


@dataclass
class HeadDeployment:
    """One head as deployed against as validated: densities are attended pairs / causal pairs."""

    layer: int
    head: int
    kind: str
    validated_density: float
    deployed_density: float
    added: int
    dropped: int
    future: int = 0

    @property
    def dense(self) -> bool:
        return self.deployed_density >= 1.0 and self.validated_density < 1.0


@dataclass
class DeploymentReport:
    """`compare_deployment`'s result: per head, and the totals ``attnlab export`` prints."""

    fmt: str
    n: int
    heads: list[HeadDeployment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(h.added == 0 and h.dropped == 0 for h in self.heads)

    @property
    def superset(self) -> bool:
        return all(h.dropped == 0 for h in self.heads)

    def lines(self) -> list[str]:
        """Human-readable summary, one line each."""
        if not self.heads:
            return list(self.notes)
        v = sum(h.validated_density for h in self.heads) / len(self.heads)
        d = sum(h.deployed_density for h in self.heads) / len(self.heads)
        differ = [h for h in self.heads if h.added or h.dropped]
        head = f"as {self.fmt} runs it at {self.n} tokens: mean density {d:.4f} (validated {v:.4f})"
        if not differ:
            return [head + ", every head identical", *self.notes]
        dense = [h for h in self.heads if h.dense]
        out = [head + f", {len(differ)} of {len(self.heads)} heads differ"
               + (f", {len(dense)} run dense" if dense else "")]
        by_kind: dict[str, list[HeadDeployment]] = {}
        for h in differ:
            by_kind.setdefault(h.kind, []).append(h)
        for kind, hs in by_kind.items():
            added = sum(h.added for h in hs)
            dropped = sum(h.dropped for h in hs)
            future = sum(h.future for h in hs)
            dv = sum(h.validated_density for h in hs) / len(hs)
            dd = sum(h.deployed_density for h in hs) / len(hs)
            why = (f" ({future} of them future tokens: a wrong result)" if future
                   else "" if dropped else " (a superset: recall can only rise)")
            out.append(f"  {kind}: {len(hs)} heads, density {dv:.4f} -> {dd:.4f}, +{added} / -{dropped} token pairs{why}")
        return out + list(self.notes)


def compare_deployment(policy: Any, validated: Sequence[Tensor], deployed: Sequence[Tensor], fmt: str) -> DeploymentReport:
    """Per head, the deployed mask against the validated one (both ``[H, n, n]`` per layer)."""
    n = int(validated[0].shape[-1]) if validated else 0
    causal = max(1, n * (n + 1) // 2)
    future_pairs = ~_causal(n)
    rep = DeploymentReport(fmt, n)
    for lay, (a, b) in enumerate(zip(validated, deployed, strict=True)):
        # numpy's count_nonzero is ~30x faster than torch's on bool tensors
        counts = [np.count_nonzero(x.numpy().reshape(x.shape[0], -1), axis=1).tolist()
                  for x in (a, b, b & ~a, a & ~b, b & future_pairs)]
        for h, (va, vb, add, drop, fut) in enumerate(zip(*counts, strict=True)):
            rep.heads.append(HeadDeployment(lay, h, policy.entry(lay, h).kind, va / causal, vb / causal, add, drop, fut))
    return rep


#: ``attnlab export`` emulates at most this many tokens (token masks are O(n^2) per head).
REPORT_MAX_TOKENS = 1024


def deployment_report(policy: Any, fmt: str, n: int, *, block_size: int | None = None, lossy: bool = False) -> DeploymentReport:
    """What ``attnlab export`` prints: the policy as the target runs it against as attnlab
    validates it, without an input (dynamic heads on the prior), at ``min(n, REPORT_MAX_TOKENS)``.
    Duo is emulated in decode (where it streams); Flex from the file's tensors alone."""
    m = min(n, REPORT_MAX_TOKENS)
    b = block_size or policy.block_size
    val = validated_masks(policy, m, block_size=b)
    dep = deployed_masks(policy, fmt, m, block_size=b, lossy=lossy, export_len=m)
    rep = compare_deployment(policy, val, dep, fmt)
    if m < n:
        rep.notes.append(f"  (emulated at {m} tokens, not {n}: token masks are O(n^2))")
    dynamic = sum(1 for e in policy.heads if not get_kind(e.kind).static)
    if fmt == "minference" and dynamic:
        rep.notes.append(f"  {dynamic} dynamic heads compared on the prior (no input); MInference selects per token from "
                         "the last 64 queries: validate with --as minference for the numbers on real inputs")
    if fmt == "duo":
        rep.notes.append("  (decoding; DuoAttention runs a single prefill forward dense for every head, and a chunked "
                         "prefill with each chunk's own keys plus sink + recent)")
    if fmt == "flex" and not rep.equal:
        rep.notes.append("  that is compiled Flex with BlockMask.from_kv_blocks on the file's tensors alone (partial blocks "
                         "attended whole; eager Flex would attend every pair): load it with the README loader (a mask_mod "
                         "from its block lists, sink and window) to run exactly the validated mask")
    return rep

