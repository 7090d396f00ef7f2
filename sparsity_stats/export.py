"""Exporters and importers: per-head masks and other tools' policy formats.

Exports (``attnlab export POLICY --format F --out DIR``), each a file other stacks can load:

=============  ===================================  ============================================
format         file(s) in ``DIR``                   content
=============  ===================================  ============================================
``npz``        ``masks.npz``                        per layer the layout's CSR arrays
                                                    (``layer{l}.full_kv_count`` ...), optional
                                                    dense ``layer{l}.block_mask``, ``__meta__``
                                                    (``arrays``/``units`` describe them;
                                                    ``dynamic``/``estimator`` per head)
``safetensors````masks.safetensors``                the same arrays; metadata key ``attnlab``
``flex``       ``flex_block_masks.safetensors``     FlexAttention's padded ``kv_num_blocks``,
                                                    ``kv_indices``, ``full_*`` per layer and the
                                                    per-head ``sink``/``window`` its mask_mod
                                                    needs; `load_flex_block_masks` (or the
                                                    README's torch-only loader) rebuilds BlockMasks
``minference`` ``minference_config.json``           MInference's per-layer
                                                    ``{head: [kind, vertical, slash, score]}``
``duo``        ``full_attention_heads.tsv``,        DuoAttention: layers x KV heads gates that rank
               ``config.json``                      heads (> 0.5 full), ``sink_size``,
                                                    ``recent_size = window - 1``, ``sparsity``
``vllm``       ``sparse_attention_config.json``,    vLLM dual-chunk attention (Qwen2.5-1M): per
               ``dual_chunk_attention_config.json`` layer ``{head: ["vertical_and_slash", v, s,
                                                    score]}``; the keys to merge into the model's
                                                    ``dual_chunk_attention_config`` (threshold,
                                                    last_q) with notes
=============  ===================================  ============================================

What each target *runs* from these files is emulated in `attnlab.sparsity_stats.emulators`;
``attnlab export`` prints it against the validated mask.

Mask files carry the policy they were compiled from in their metadata, so `import_policy`
reads every format back (a round trip is a test). MInference and DuoAttention files hold only
sizes at one length: importing them needs the model identity (``--model``), and exporting
resolves elastic sizes at ``--seq-len``.

MInference mapping (sizes in its units, tokens, with its minimums applied so the file states
what runs): ``dense`` -> ``vertical_and_slash`` 2^30/2^30 (every column and diagonal at any
length; an old ``(n_ctx, n_ctx)`` entry still imports as dense); ``streaming`` <->
``stream_llm`` (sink, window; token-exact); ``vertical_slash`` -> ``vertical_and_slash`` with
``max(blocks * B, 30)`` columns and ``max(blocks * B, 100)`` diagonals. ``block_topk``,
``a_shape`` and the gamma threshold have no faithful form (MInference's ``block_sparse`` keeps
the top 100 blocks of 64 whatever the file says): export refuses them unless ``lossy=True``.

vLLM mapping (Qwen2.5-1M dual-chunk attention, sizes in tokens; `vllm_config`): every head is
``vertical_and_slash`` (the only kind vLLM's dual-chunk prefill runs); ``dense`` -> both sizes =
the model's context; ``vertical_slash`` -> ``max(blocks * B, 31)`` columns and ``max(blocks * B,
100)`` diagonals (vLLM always keeps columns 0..29 and distances 0..99 and runs a vertical size of
exactly 30 as 130); ``streaming``/``a_shape`` -> 31/100 when the sink is at most 30 tokens and the
window at most 100 (a superset), else refused without ``lossy``; ``block_topk`` only with
``lossy``. ``dual_chunk_attention_config.json`` holds the keys to merge into the model's
``dual_chunk_attention_config`` (``sparse_attention_threshold = seq_len - 1``: shorter prompts
run dense) and notes; the per-layer list imports back.

Nothing is written when the input is bad: all checks and all content come first, then each
file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.kernels.layout import (
    TENSOR_FIELDS,
    TOKEN_SEMANTICS,
    BlockSparseLayout,
    csr_from_counts,
)
from attnlab.names import head_label
from attnlab.runs import atomic_path, check_output_files, load_json

from .errors import (
    ERR_CORRUPT,
    ERR_FORMAT,
    ERR_NOT_REPRESENTABLE,
    ERR_SHAPE,
    FormatError,
    PolicyError,
)
from .kinds import Elastic, get_kind
from .masks import check_block_size, check_seq_len, compile_policy
from .policy import HeadPolicy, Policy, model_entry

EXPORT_FORMATS = ("npz", "safetensors", "flex", "minference", "duo", "flashinfer", "vllm")
IMPORT_FORMATS = ("npz", "safetensors", "flex", "minference", "duo", "vllm")
MASK_FORMATS = ("npz", "safetensors", "flex")
#: Formats compiled at one length (``--seq-len`` required).
COMPILED_FORMATS = (*MASK_FORMATS, "flashinfer")
MASKS_FORMAT = "attnlab-masks"
MASKS_SCHEMA = 1
FILENAMES = {
    "npz": ("masks.npz",),
    "safetensors": ("masks.safetensors",),
    "flex": ("flex_block_masks.safetensors",),
    "minference": ("minference_config.json",),
    "duo": ("full_attention_heads.tsv", "config.json"),
    "flashinfer": ("flashinfer_bsr.safetensors",),
    "vllm": ("sparse_attention_config.json", "dual_chunk_attention_config.json"),
}


def _check_format(fmt: str, known: tuple[str, ...]) -> str:
    if fmt not in known:
        raise FormatError(ERR_FORMAT.format(got=fmt, known=", ".join(known)))
    return fmt


def _targets(out_dir: Path, fmt: str, force: bool) -> list[Path]:
    if out_dir.exists() and not out_dir.is_dir():
        raise FormatError(f"--out {out_dir} is a file: give a directory for the exported files")
    return check_output_files([out_dir / name for name in FILENAMES[fmt]], force=force, error=FormatError)


# -- export ---------------------------------------------------------------------------------
def export_policy(
    policy: Policy,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    seq_len: int | None = None,
    block_size: int | None = None,
    force: bool = False,
    lossy: bool = False,
    dense_blocks: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``policy`` in format ``fmt`` into ``out_dir``; returns the files written.

    Mask formats compile every layer at ``seq_len`` (required) and ``block_size`` (default: the
    policy's); dynamic heads get their prior layout (estimate at run time with
    `estimate_block_scores`). Config formats resolve sizes at ``seq_len`` (default: the longest
    profiled length, else the model's context).
    """
    _check_format(fmt, EXPORT_FORMATS)
    out_dir = Path(out_dir)
    b = check_block_size(block_size if block_size is not None else policy.block_size)
    if fmt in COMPILED_FORMATS:
        if seq_len is None:
            raise FormatError(f"--seq-len is required for {fmt} masks: the masks are compiled at one length")
        n = check_seq_len(seq_len, policy.model)
    else:
        default = max(policy.profiled_lengths) if policy.profiled_lengths else policy.model.get("n_ctx")
        n = check_seq_len(seq_len if seq_len is not None else (default or 4096), policy.model)
    if fmt == "flashinfer":
        _check_flashinfer(policy, n, b)
    paths = _targets(out_dir, fmt, force)
    if fmt == "flashinfer":
        layouts = compile_policy(policy, n, b, progress=progress)
        _write_flashinfer(paths[0], policy, layouts, _mask_meta(policy, layouts, n, b))
    elif fmt in MASK_FORMATS:
        layouts = compile_policy(policy, n, b, progress=progress)
        meta = _mask_meta(policy, layouts, n, b, flex=fmt == "flex")
        writer = {"npz": _write_npz, "safetensors": _write_safetensors, "flex": _write_flex}[fmt]
        writer(paths[0], layouts, meta, dense_blocks)
    elif fmt == "minference":
        content = json.dumps(minference_config(policy, n, b, lossy=lossy)) + "\n"
        with atomic_path(paths[0]) as tmp:
            tmp.write_text(content)
    elif fmt == "vllm":
        sparse, side = vllm_config(policy, n, b, lossy=lossy)
        with ExitStack() as stack:
            t1 = stack.enter_context(atomic_path(paths[0]))
            t2 = stack.enter_context(atomic_path(paths[1]))
            t1.write_text(json.dumps(sparse) + "\n")
            t2.write_text(json.dumps(side, indent=2) + "\n")
    else:
        tsv, config = duo_config(policy, n)
        with ExitStack() as stack:  # both temporary files, then both renames
            t1 = stack.enter_context(atomic_path(paths[0]))
            t2 = stack.enter_context(atomic_path(paths[1]))
            t1.write_text(tsv)
            t2.write_text(json.dumps(config, indent=2) + "\n")
    return paths


#: What each array of a mask file holds (written into its metadata as ``arrays``).
ARRAY_DOC = {
    "layer{l}.full_kv_count": "int32 [H, QB]: per query head h (axis 0: QUERY heads, not KV heads) and query block qb, "
                              "how many FULL key blocks (every pair attended, no masking) row (h, qb) lists",
    "layer{l}.full_kv_offset": "int32 [H, QB]: where row (h, qb) starts in full_kv_index",
    "layer{l}.full_kv_index": "int32 [n_full]: key-block numbers, ascending within a row; row (h, qb) is "
                              "full_kv_index[offset : offset + count]",
    "layer{l}.kv_count": "int32 [H, QB]: the same for PARTIAL key blocks (attend only the pairs token_semantics allows)",
    "layer{l}.kv_offset": "int32 [H, QB]: where row (h, qb) starts in kv_index",
    "layer{l}.kv_index": "int32 [n_partial]: partial key-block numbers, ascending within a row",
    "layer{l}.sink": "int32 [H]: tokens per query head always attended inside partial blocks (0: none)",
    "layer{l}.window": "int32 [H]: sliding window per query head, counting the query itself (0: no window rule)",
    "layer{l}.block_mask": "bool [H, QB, KB], optional (--dense-blocks): every listed block, full or partial",
}
#: The same for flex files (FlexAttention's padded layout; a loader is in the README).
FLEX_ARRAY_DOC = {
    "layer{l}.full_kv_num_blocks": "int32 [1, H, QB]: full blocks per (query head, query block): Flex's full_kv_num_blocks",
    "layer{l}.full_kv_indices": "int32 [1, H, QB, KB]: their key-block numbers, padded with 0 past the count",
    "layer{l}.kv_num_blocks": "int32 [1, H, QB]: PARTIAL blocks: Flex's kv_num_blocks; they need a mask_mod",
    "layer{l}.kv_indices": "int32 [1, H, QB, KB]: their key-block numbers, padded with 0",
    "layer{l}.sink": "int32 [H]: the mask_mod's sink per query head",
    "layer{l}.window": "int32 [H]: the mask_mod's window per query head (counts the query; 0: none)",
}
#: Units and axes of every mask file (metadata ``units``).
UNITS = ("seq_len, sink, window: tokens; block_size: tokens per block (square tiles: query block qb holds "
         "queries qb*B .. qb*B+B-1, key block kb keys kb*B .. kb*B+B-1, the last block ragged when B does not "
         "divide seq_len); QB = KB = ceil(seq_len / B); H = query heads (a KV head's group is consecutive)")


def _head_estimators(policy: Policy, lay: int) -> tuple[list[bool], list[Any]]:
    entries = policy.layer(lay)
    dyn = [not get_kind(e.kind).static for e in entries]
    est = [dict(e.params.get("estimate", {})) if d else None for e, d in zip(entries, dyn, strict=True)]
    return dyn, est


def _mask_meta(policy: Policy, layouts: list[BlockSparseLayout], n: int, b: int, flex: bool = False) -> dict[str, Any]:
    dyn_est = [_head_estimators(policy, lay.layer if lay.layer is not None else i) for i, lay in enumerate(layouts)]
    return {
        "format": MASKS_FORMAT,
        "schema": MASKS_SCHEMA,
        "seq_len": n,
        "block_size": b,
        "causal": True,
        "n_layers": len(layouts),
        "n_heads": policy.n_heads,
        "model": policy.model,
        "dynamic_heads": "prior layout; estimate per input with attnlab.sparsity_stats.estimate_block_scores",
        "dynamic": [d for d, _ in dyn_est],
        "estimator": [e for _, e in dyn_est],
        "dynamic_note": ("dynamic[l][h] true: the head picks its blocks per input (rule in estimator[l][h]: last_q = "
                         "MInference's last-queries column/diagonal sums, pooled_qk = mean-pooled q.k per block, "
                         "antidiagonal = XAttention's strided antidiagonal sums of q.k); "
                         "its arrays hold the PRIOR choice (first columns, nearest diagonals), not what it runs"),
        "units": UNITS,
        "arrays": FLEX_ARRAY_DOC if flex else ARRAY_DOC,
        "density": [[round(float(x), 6) for x in lay.density.tolist()] for lay in layouts],
        "head_names": [list(lay.head_names) for lay in layouts],
        "token_semantics": TOKEN_SEMANTICS,
        "policy": policy.to_dict(),
    }


def _write_npz(path: Path, layouts: list[BlockSparseLayout], meta: dict[str, Any], dense_blocks: bool) -> None:
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(meta))}
    for lay in layouts:
        for name, t in lay.to_arrays().items():
            arrays[f"layer{lay.layer}.{name}"] = t.numpy()
        if dense_blocks:
            arrays[f"layer{lay.layer}.block_mask"] = lay.block_mask().numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _write_safetensors(path: Path, layouts: list[BlockSparseLayout], meta: dict[str, Any], dense_blocks: bool) -> None:
    from attnlab.runs import write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for lay in layouts:
        for name, t in lay.to_arrays().items():
            tensors[f"layer{lay.layer}.{name}"] = t
        if dense_blocks:
            tensors[f"layer{lay.layer}.block_mask"] = lay.block_mask()
    write_safetensors(path, tensors, {"attnlab": json.dumps(meta)})


def _write_flex(path: Path, layouts: list[BlockSparseLayout], meta: dict[str, Any], dense_blocks: bool) -> None:
    from attnlab.runs import write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for lay in layouts:
        for name, t in lay.padded().items():
            tensors[f"layer{lay.layer}.{name}"] = t
        tensors[f"layer{lay.layer}.sink"] = lay.sink
        tensors[f"layer{lay.layer}.window"] = lay.window
    meta = {**meta, "flex": True, "flex_loader": ("BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, "
            "full_kv_indices, BLOCK_SIZE=block_size, mask_mod=M) with M(b, h, q, k) = k <= q & k < seq_len & "
            "(window[h] == 0 | k < sink[h] | q - k < window[h]); without mask_mod partial blocks are attended whole "
            "(see the README's Exports section)")}
    write_safetensors(path, tensors, {"attnlab": json.dumps(meta)})


# -- FlashInfer ------------------------------------------------------------------------------
#: How to run a flashinfer export (written into its metadata).
FLASHINFER_USAGE = (
    "per layer l and KV head g: BlockSparseAttentionWrapper.plan(indptr, indices, M=seq_len, N=seq_len, R=block_size, "
    "C=block_size, num_qo_heads=group, num_kv_heads=1, head_dim, mask=mask.bool()) with the arrays layer{l}.kv{g}.*, then run "
    "on that KV head's query heads (query heads g*group .. g*group+group-1) and its K/V"
)


def _check_flashinfer(policy: Policy, n: int, b: int) -> None:
    """FlashInfer's block-sparse rows are per KV head (one wrapper per KV head) and most of its
    backends need ``N`` divisible by ``C``: refuse what it cannot run."""
    if n % b:
        raise FormatError(f"flashinfer: --seq-len {n} is not a multiple of the block size {b}; FlashInfer's block-sparse "
                          f"attention needs N divisible by C: export at {n - n % b or b} or {n + b - n % b} tokens")
    group = policy.n_heads // int(policy.model["n_kv_heads"])
    for lay in range(policy.n_layers):
        entries = policy.layer(lay)
        for e in entries:
            first = entries[(e.head // group) * group]
            if (e.kind, get_kind(e.kind).to_json(e.params)) != (first.kind, get_kind(first.kind).to_json(first.params)):
                raise FormatError(ERR_NOT_REPRESENTABLE.format(
                    head=f"(layer {e.layer}, head {e.head})", kind=e.kind, fmt="flashinfer",
                    why=f"FlashInfer's block-sparse rows are per KV head and KV head {e.head // group} mixes "
                        f"{first.describe()} and {e.describe()}; generate with --gqa"))


def _write_flashinfer(path: Path, policy: Policy, layouts: list[BlockSparseLayout], meta: dict[str, Any]) -> None:
    """Per layer and KV head FlashInfer's block-sparse row arrays: ``indptr [QB + 1]``,
    ``indices [nnz]`` (key blocks of each query-block row) and ``mask [nnz, B, B]`` (uint8, the
    pairs of each listed block to attend: the layout's token semantics)."""
    from attnlab.runs import write_safetensors

    group = policy.n_heads // int(policy.model["n_kv_heads"])
    b = meta["block_size"]
    tensors: dict[str, torch.Tensor] = {}
    for lay in layouts:
        tm = lay.token_mask()
        blocks = lay.block_mask()
        for g in range(lay.n_heads // group):
            h = g * group
            rows, cols = torch.nonzero(blocks[h], as_tuple=True)
            counts = blocks[h].sum(-1)
            indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
            tiles = tm[h].reshape(lay.n_q_blocks, b, lay.n_k_blocks, b).permute(0, 2, 1, 3)
            tensors[f"layer{lay.layer}.kv{g}.indptr"] = indptr.to(torch.int32)
            tensors[f"layer{lay.layer}.kv{g}.indices"] = cols.to(torch.int32)
            tensors[f"layer{lay.layer}.kv{g}.mask"] = tiles[rows, cols].to(torch.uint8).contiguous()
    meta = {**meta, "format": "attnlab-flashinfer-bsr", "group": group, "n_kv_heads": int(policy.model["n_kv_heads"]),
            "usage": FLASHINFER_USAGE, "arrays": {
                "layer{l}.kv{g}.indptr": "int32 [QB + 1]: BSR row pointer over query blocks (block_size rows each)",
                "layer{l}.kv{g}.indices": "int32 [nnz]: key-block column of each listed block, ascending within a row",
                "layer{l}.kv{g}.mask": "uint8 [nnz, block_size, block_size]: 1 = that (query, key) pair is attended"}}
    write_safetensors(path, tensors, {"attnlab": json.dumps(meta)})


# -- MInference -----------------------------------------------------------------------------
#: MInference sizes for a dense head: ``vertical_and_slash_kernel`` caps both at the input length
#: (``min(q_len, ...)``), so this is every column and every diagonal at any length.
MINFERENCE_DENSE = 1 << 30


def _minference_entry(e: HeadPolicy, seq_len: int, b: int, lossy: bool) -> list:
    """One head's ``[kind, vertical_size, slash_size, score]`` in MInference's units (tokens, with
    its minimums already applied, so the file says what runs); `FormatError` if not expressible."""
    from .emulators import MI_FORCED_DIAGONALS, MI_MIN_VERTICAL

    score = round(float(e.expected_recall if e.expected_recall is not None else 1.0), 4)
    kind = get_kind(e.kind)
    where = f"(layer {e.layer}, head {e.head})"
    if e.kind == "dense":
        return ["vertical_and_slash", MINFERENCE_DENSE, MINFERENCE_DENSE, score]
    if e.kind == "streaming":  # stream_llm is token-exact: sink keys + a window that includes the query
        s, w = kind.stream(e.params, seq_len)
        return ["stream_llm", s, w, score]
    if e.kind == "vertical_slash":
        # attnlab keeps ceil(size / B) whole column blocks and block diagonals; the same tokens of
        # columns, and every diagonal those block diagonals touch, as MInference counts them
        nv, ns = kind.block_counts(e.params, seq_len, b)
        return ["vertical_and_slash", max(nv * b, MI_MIN_VERTICAL), max(ns * b, MI_FORCED_DIAGONALS), score]
    if not lossy:
        if e.kind == "block_topk":
            why = ("MInference's block_sparse ignores both sizes and keeps the top 100 blocks of 64 tokens per query block "
                   "(every block up to 6,400 tokens)")
        elif e.kind == "a_shape":
            why = "A-shape keeps whole blocks, stream_llm whole tokens"
        else:
            why = "a cumulative-mass threshold has no fixed size"
        raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="minference", why=why + " (pass --lossy to approximate)"))
    if e.kind == "a_shape":
        sb, wb = kind.block_counts(e.params, seq_len, b)
        return ["stream_llm", sb * b, wb * b, score]
    if e.kind == "block_topk" and "topk" in e.params:  # MInference runs 100 blocks of 64 instead
        return ["block_sparse", kind.topk_blocks(e.params, seq_len, b), b, score]
    nb = -(-seq_len // b)  # gamma, lossy: its expected blocks per query-block row
    per_row = (e.expected_density or 0.5) * nb * (nb + 1) / 2 / nb
    return ["block_sparse", max(2, round(per_row)), b, score]


def minference_config(policy: Policy, seq_len: int, block_size: int | None = None, *, lossy: bool = False) -> list[dict[str, list]]:
    """MInference's per-layer ``{head: [kind, vertical_size, slash_size, score]}`` for ``policy``
    with sizes resolved at ``seq_len``. `FormatError` naming the heads it cannot represent."""
    b = check_block_size(policy.block_size if block_size is None else block_size)
    return _per_head_config(policy, lambda e: _minference_entry(e, seq_len, b, lossy))


def _per_head_config(policy: Policy, entry: Callable[[Any], list]) -> list[dict[str, list]]:
    """One ``{head: entry(head)}`` per layer; `FormatError` (the first head's reason) naming
    every head the target can't run."""
    out: list[dict[str, list]] = []
    refused: list[str] = []
    first: FormatError | None = None
    for lay in range(policy.n_layers):
        layer: dict[str, list] = {}
        for e in policy.layer(lay):
            try:
                layer[str(e.head)] = entry(e)
            except FormatError as exc:
                first = first or exc
                refused.append(f"{head_label(e.layer, e.head)} {e.kind}")
        out.append(layer)
    if first is not None:
        more = f" ({len(refused)} heads: {', '.join(refused[:8])}{' ...' if len(refused) > 8 else ''})" if len(refused) > 1 else ""
        raise FormatError(str(first) + more)
    return out


def _read_json(path: Path, fmt: str) -> Any:
    if not path.is_file():
        raise FormatError(f"no {fmt} file at {path}: check the path")
    try:
        return load_json(path, what=f"{fmt} file", fix="", error=ValueError)
    except ValueError as exc:  # keep this module's own wording: what the file should have been
        reason = "nested too deeply" if "nested too deeply" in str(exc) else str(exc).split(" (", 1)[-1].split("):", 1)[0]
        raise FormatError(ERR_CORRUPT.format(path=path, fmt=fmt, reason=reason)) from None


#: The largest size an imported config may give (MInference's dense marker is 2**30).
MAX_IMPORT_SIZE = 1 << 31


def _pow2(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 16 and not (x & (x - 1))


def _int_size(v: Any, where: str, field: str, *, allow_zero: bool = False) -> int:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and int(v) == v
    if not ok or v < 0 or (v == 0 and not allow_zero) or v > MAX_IMPORT_SIZE:
        what = "a whole number of tokens >= 0" if allow_zero else "a positive whole number of tokens"
        raise FormatError(f"{where}: {field} must be {what} (at most {MAX_IMPORT_SIZE}), got {v!r}; fix the file")
    return int(v)


def minference_to_policy(config: Any, model: dict[str, Any], *, source: str = "minference", block_size: int = 64) -> Policy:
    """A `Policy` from MInference's per-layer config (see the module docstring for the mapping)."""
    model = model_entry(model, "--model")
    nl, nh = model["n_layers"], model["n_heads"]
    n_ctx = int(model.get("n_ctx") or 0)
    if not isinstance(config, list) or not all(isinstance(x, dict) for x in config):
        raise FormatError(ERR_CORRUPT.format(path=source, fmt="MInference config", reason="expected a JSON list of per-layer objects"))
    if len(config) != nl:
        raise FormatError(ERR_SHAPE.format(path=source, what="the layer list", got=len(config), model=model.get("name"), expected=f"{nl} layers"))
    group = nh // model["n_kv_heads"]
    heads = []
    for lay, layer in enumerate(config):
        keys = sorted(layer, key=lambda k: int(k) if str(k).isdigit() else -1)
        if [str(h) for h in range(nh)] != [str(k) for k in keys]:
            raise FormatError(ERR_SHAPE.format(path=source, what=f"layer {lay}", got=f"heads {keys[:4]}...", model=model.get("name"), expected=f"heads '0'..'{nh - 1}'"))
        for h in range(nh):
            where = f"{source}: head (layer {lay}, head {h})"
            entry = layer[str(h)]
            if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[0], str):
                raise FormatError(f"{where}: expected [kind, vertical_size, slash_size, score], got {entry!r}; fix the file")
            kind, v, s, score = entry
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise FormatError(f"{where}: score (4th field) must be a finite number, got {score!r}; fix the file")
            if kind == "vertical_and_slash":
                v, s = _int_size(v, where, "vertical_size"), _int_size(s, where, "slash_size")
                if n_ctx and v >= n_ctx and s >= n_ctx:
                    k, params = "dense", {}
                else:
                    k, params = "vertical_slash", {"vertical": v, "slash": s}
            elif kind == "stream_llm":
                k, params = "streaming", {"sink": _int_size(v, where, "vertical_size (sink)", allow_zero=True), "window": _int_size(s, where, "slash_size (window)")}
            elif kind == "block_sparse":
                blocks = _int_size(v, where, "vertical_size (blocks)")
                if not _pow2(s):
                    raise FormatError(f"{where}: slash_size (block size) of block_sparse must be a power of two >= 16, got {s!r}; "
                                      "fix the file (MInference itself runs 100 blocks of 64 whatever it says)")
                k, params = "block_topk", {"topk": blocks * s}
            else:
                raise FormatError(f"{where}: unknown MInference kind {kind!r}; use vertical_and_slash, stream_llm or block_sparse")
            spec = get_kind(k)
            p = spec.validate(params, where)
            heads.append(HeadPolicy(lay, h, h // group, k, p, float(min(1.0, max(0.0, score))), None,
                                    f"imported from MInference ({kind} {v}, {s}); score = its retained attention on its search sample",
                                    "exact"))
    return Policy(model, block_size, heads, {"path": source, "format": "minference"})


# -- vLLM dual-chunk attention (Qwen2.5-1M) -----------------------------------------------------------
#: The chunk sizes Qwen2.5-7B/14B-Instruct-1M ship in ``config.json`` (the export's report assumes them).
VLLM_QWEN_1M = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 32768}
#: Smallest sizes whose selection is deterministic: vLLM forces columns 0..29 and distances 0..99
#: to the top, so fewer are cut by ``torch.topk``'s unspecified tie order; 30 itself runs as 130.
VLLM_MIN_VERTICAL = 31
VLLM_MIN_SLASH = 100
#: How to deploy a vllm export (written into ``dual_chunk_attention_config.json``).
VLLM_USAGE = ("copy sparse_attention_config.json into the model folder beside config.json (vLLM's "
              "get_sparse_attention_config loads it from there) and merge the keys of 'dual_chunk_attention_config' "
              "below into the dual_chunk_attention_config of the model's config.json (keep the model's own chunk_size, "
              "local_size and original_max_position_embeddings); vLLM reads it only for a model whose config.json has "
              "dual_chunk_attention_config (Qwen2.5-1M), with VLLM_ATTENTION_BACKEND=DUAL_CHUNK_FLASH_ATTN")
VLLM_NOTES = {
    "units": "vertical and slash sizes are tokens: key columns and diagonals (distances query - key) kept per head",
    "threshold": ("vLLM runs every head dense when the sequence has at most sparse_attention_threshold tokens (its "
                  "default 32768); it is set to seq_len - 1 so prompts of seq_len tokens or more take the sparse path "
                  "with these sizes, shorter ones run dense"),
    "selection": ("per prefill chunk and head, vLLM ranks key columns and diagonals by the softmax attention of the "
                  "chunk's last sparse_attention_last_q queries, always keeps columns 0..29 and distances 0..99, and "
                  "computes diagonals as 64-key ranges per 64-query block and columns outside them one by one; a "
                  "vertical size of exactly 30 runs as 130, so sizes here are at least 31 columns and 100 diagonals"),
    "dense_heads": "dense heads are written with both sizes = the model's context: every column and diagonal up to it",
    "phase": ("sparse only in prefill (a single prefill is emulated); decoding is dense; dual-chunk splits a prompt into "
              "chunks of chunk_size - local_size tokens and scores earlier chunks with its re-positioned queries"),
}


def _vllm_entry(e: HeadPolicy, seq_len: int, b: int, dense_size: int, lossy: bool) -> list:
    """One head's ``["vertical_and_slash", vertical, slash, score]`` in tokens; `FormatError` when
    vLLM would drop pairs attnlab validates (unless ``lossy``)."""
    score = round(float(e.expected_recall if e.expected_recall is not None else 1.0), 4)
    kind = get_kind(e.kind)
    where = f"(layer {e.layer}, head {e.head})"

    def vs(v: int, s: int) -> list:
        return ["vertical_and_slash", max(int(v), VLLM_MIN_VERTICAL), max(int(s), VLLM_MIN_SLASH), score]
    if e.kind == "dense":
        return ["vertical_and_slash", dense_size, dense_size, score]
    if e.kind == "vertical_slash":  # the same tokens of columns, every diagonal its block diagonals touch
        nv, ns = kind.block_counts(e.params, seq_len, b)
        return vs(nv * b, ns * b)
    if e.kind in ("streaming", "a_shape"):  # fixed sink/window: exact only inside vLLM's forced columns/diagonals
        if e.kind == "streaming":
            sink, window = kind.stream(e.params, seq_len)
        else:
            sb, wb = kind.block_counts(e.params, seq_len, b)
            sink, window = sb * b, wb * b
        if sink <= VLLM_MIN_VERTICAL - 1 and window <= VLLM_MIN_SLASH or lossy:
            return vs(sink, window)
        why = (f"its sink of {sink} tokens and window of {window} are fixed, vLLM keeps only columns 0..29 and "
               "distances 0..99 for sure and picks the rest per input")
    elif e.kind == "block_topk":
        if lossy:
            k = kind.topk_blocks(e.params, seq_len, b)
            if k is None:
                nb = -(-seq_len // b)
                k = max(2, round((e.expected_density or 0.5) * (nb + 1) / 2))
            return vs(k * b, k * b)
        why = "vLLM selects columns and diagonals, not blocks"
    else:
        raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="vllm", why="unknown kind"))
    raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="vllm", why=why + " (pass --lossy to approximate)"))


def vllm_config(policy: Policy, seq_len: int, block_size: int | None = None, *, lossy: bool = False) -> tuple[list[dict[str, list]], dict[str, Any]]:
    """vLLM's ``sparse_attention_config.json`` content (per layer ``{head: ["vertical_and_slash",
    vertical, slash, score]}``, sizes resolved at ``seq_len``) and the companion
    ``dual_chunk_attention_config.json`` (the keys to merge into the model's config, the chunk
    sizes the report assumed, notes). `FormatError` naming every head vLLM cannot run as validated."""
    b = check_block_size(policy.block_size if block_size is None else block_size)
    n_ctx = policy.model.get("n_ctx")
    dense_size = max(int(n_ctx) if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else 0, seq_len)
    out = _per_head_config(policy, lambda e: _vllm_entry(e, seq_len, b, dense_size, lossy))
    side = {
        "dual_chunk_attention_config": {"sparse_attention_enabled": True, "sparse_attention_threshold": seq_len - 1,
                                        "sparse_attention_last_q": 64},
        "assumed_model_config": dict(VLLM_QWEN_1M),
        "exported_by": "attnlab", "model": policy.model.get("name"), "seq_len": seq_len, "block_size": b,
        "usage": VLLM_USAGE, "notes": VLLM_NOTES,
    }
    return out, side


def vllm_to_policy(config: Any, model: dict[str, Any], *, source: str = "vllm", block_size: int = 64) -> Policy:
    """A `Policy` from vLLM's ``sparse_attention_config`` list: ``vertical_and_slash`` heads become
    ``vertical_slash`` (30 columns as the 130 vLLM runs), or ``dense`` when both sizes reach the
    model's context. Malformed entries: `FormatError` naming the layer, head and field."""
    from .emulators import vllm_vs_sizes

    model = model_entry(model, "--model")
    nl, nh = model["n_layers"], model["n_heads"]
    n_ctx = int(model.get("n_ctx") or 0)
    if not isinstance(config, list) or not all(isinstance(x, dict) for x in config):
        why = "expected a JSON list of per-layer objects"
        if isinstance(config, dict):
            why += "; an object keyed by layer does not load in vLLM, which indexes the list by layer number"
        raise FormatError(ERR_CORRUPT.format(path=source, fmt="vLLM sparse_attention_config", reason=why))
    if len(config) != nl:
        raise FormatError(ERR_SHAPE.format(path=source, what="the layer list", got=len(config), model=model.get("name"), expected=f"{nl} layers"))
    group = nh // model["n_kv_heads"]
    heads = []
    for lay, layer in enumerate(config):
        if sorted(str(k) for k in layer) != sorted(str(h) for h in range(nh)):
            raise FormatError(ERR_SHAPE.format(path=source, what=f"layer {lay}", got=f"heads {sorted(layer)[:4]}...", model=model.get("name"), expected=f"heads '0'..'{nh - 1}'"))
        for h in range(nh):
            where = f"{source}: layer {lay}, head {h}"
            entry = layer[str(h)]
            if not isinstance(entry, list) or len(entry) != 4:
                raise FormatError(f"{where}: expected ['vertical_and_slash', vertical_size, slash_size, score], got {entry!r}; fix the file")
            kind, v, s, score = entry
            if kind != "vertical_and_slash":
                raise FormatError(f"{where}: field 1 (kind) is {kind!r}; vLLM's dual-chunk attention runs only 'vertical_and_slash'")
            v, s = _int_size(v, where, "field 2 (vertical_size)"), _int_size(s, where, "field 3 (slash_size)")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score)):
                raise FormatError(f"{where}: field 4 (score) must be a finite number or null, got {score!r}; fix the file")
            v_run = vllm_vs_sizes(v, s, MAX_IMPORT_SIZE)[0]
            if n_ctx and v_run >= n_ctx and s >= n_ctx:
                k, params = "dense", {}
            else:
                k, params = "vertical_slash", {"vertical": v_run, "slash": s}
            p = get_kind(k).validate(params, where)
            rec = None if score is None else float(min(1.0, max(0.0, score)))
            heads.append(HeadPolicy(lay, h, h // group, k, p, rec, None,
                                    f"imported from vLLM sparse_attention_config (vertical_and_slash {v}, {s})", "exact"))
    return Policy(model, block_size, heads, {"path": source, "format": "vllm"})


# -- DuoAttention ---------------------------------------------------------------------------
#: What a DuoAttention export says about when its heads stream (written into ``config.json``).
DUO_PHASE_NOTE = ("DuoAttention streams only in decoding and chunked prefill: a single prefill forward "
                  "(q_len == kv_seq_len) is dense for every head")


def _duo_gates(policy: Policy, full: np.ndarray) -> np.ndarray:
    """Real-valued gates ``[layers, kv_heads]`` that rank KV heads the way DuoAttention reads them
    (higher = more in need of full attention): streaming heads evenly in [0.05, 0.45] by the
    recall they lose when streaming (least loss lowest), full heads evenly in [0.55, 0.95] (by
    their recall if streamed when the policy records it as ``streaming_recall``, else model
    order). Spacing is far above the 1e-6 noise ``sparsify_attention_heads`` adds."""
    nkv = full.shape[1]
    group = policy.n_heads // nkv
    gates = np.zeros(full.shape)
    keys: dict[bool, list[tuple[float, int, int]]] = {True: [], False: []}
    for lay in range(full.shape[0]):
        for kv in range(nkv):
            members = [policy.entry(lay, kv * group + j) for j in range(group)]
            if full[lay, kv]:
                rec = [m.extra.get("streaming_recall") for m in members]
                loss = 1 - min(float(r) for r in rec) if all(isinstance(r, (int, float)) for r in rec) else 0.0
            else:
                loss = 1 - min(float(m.expected_recall) if m.expected_recall is not None else 1.0 for m in members)
            keys[bool(full[lay, kv])].append((loss, lay, kv))
    for is_full, lo, hi in ((False, 0.05, 0.45), (True, 0.55, 0.95)):
        ranked = sorted(keys[is_full])
        for r, (_, lay, kv) in enumerate(ranked):
            gates[lay, kv] = lo + (hi - lo) * (r + 1) / (len(ranked) + 1)
    return gates


def duo_sparsity(full: np.ndarray) -> float:
    """The ``sparsity`` for which ``sparsify_attention_heads`` streams exactly the heads not in
    ``full`` when the gates rank them below the full ones: its quantile then falls halfway
    between the last streaming and the first full gate."""
    m, total = int((~full).sum()), full.size
    if m == 0:
        return 0.0
    if m == total or total == 1:
        return 1.0
    return round((m - 0.5) / (total - 1), 12)


def duo_config(policy: Policy, seq_len: int) -> tuple[str, dict[str, Any]]:
    """DuoAttention's ``full_attention_heads.tsv`` text and ``config.json`` for ``policy``.

    Every KV head must be all dense or all streaming with one (sink, window) for the whole model;
    `FormatError` names the first head that is not. attnlab's window counts the query itself and
    DuoAttention's recent tokens do not, so ``recent_size = window - 1``. The gates are real
    numbers that rank heads (`_duo_gates`); ``sparsity`` is the value to pass to DuoAttention
    (its ``sparsify_attention_heads`` re-thresholds the gates with it)."""
    nl, nh, nkv = policy.n_layers, policy.n_heads, int(policy.model["n_kv_heads"])
    group = nh // nkv
    sizes: tuple[int, int] | None = None
    full = np.zeros((nl, nkv), dtype=bool)
    for lay in range(nl):
        for kv in range(nkv):
            members = [policy.entry(lay, kv * group + j) for j in range(group)]
            first = members[0]
            for e in members:
                where = f"(layer {e.layer}, head {e.head})"
                if e.kind not in ("dense", "streaming"):
                    raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="duo", why="DuoAttention heads are either full or streaming"))
                if e.kind != first.kind:
                    raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="duo", why=f"its KV head {kv} mixes {first.kind} and {e.kind}; generate with --gqa"))
                if e.kind == "streaming":
                    sw = get_kind("streaming").stream(e.params, seq_len)
                    if sizes is None:
                        sizes = sw
                    elif sw != sizes:
                        raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="duo", why=f"sink/window {sw} differ from {sizes}; DuoAttention has one sink_size and recent_size"))
                    if sw[1] < 2:
                        raise FormatError(ERR_NOT_REPRESENTABLE.format(head=where, kind=e.kind, fmt="duo", why="a window of 1 token is recent_size 0, which DuoAttention reads as the whole cache"))
            full[lay, kv] = first.kind == "dense"
    sink, window = sizes if sizes is not None else (64, 257)
    gates = _duo_gates(policy, full)
    rows = ["\t".join(f"{g:.6f}" for g in row) for row in gates]
    config = {
        "sink_size": sink, "recent_size": window - 1, "sparsity": duo_sparsity(full),
        "exported_by": "attnlab", "model": policy.model.get("name"), "seq_len": seq_len,
        "attnlab_window": window,
        "window_note": "attnlab's window counts the query itself; DuoAttention's recent tokens do not: recent_size = window - 1",
        "gates_note": "gates rank KV heads (higher = keep full); run DuoAttention with this sparsity to get exactly these heads streaming",
        "phase": DUO_PHASE_NOTE,
    }
    return "\n".join(rows) + "\n", config


def _duo_gate_table(tsv: Path) -> np.ndarray:
    try:
        text = tsv.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(ERR_CORRUPT.format(path=tsv, fmt="DuoAttention TSV", reason=type(exc).__name__)) from None
    if not text.strip():
        raise FormatError(f"{tsv} is empty: a DuoAttention full_attention_heads.tsv has one line of tab-separated gates per layer; fix the file")
    for no, line in enumerate(text.splitlines(), 1):
        for field_no, cell in enumerate(line.split("\t"), 1):
            try:
                value = float(cell)
            except ValueError:
                raise FormatError(f"{tsv}: line {no}, field {field_no}: {cell.strip()[:20]!r} is not a number; fix the file") from None
            if not math.isfinite(value):
                raise FormatError(f"{tsv}: line {no}, field {field_no}: gate {cell.strip()!r} is not finite; gates are numbers in [0, 1]")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.loadtxt(tsv, dtype=float, delimiter="\t", ndmin=2)
    except ValueError as exc:
        raise FormatError(ERR_CORRUPT.format(path=tsv, fmt="DuoAttention TSV", reason=str(exc).splitlines()[0])) from None


def duo_to_policy(path: str | os.PathLike, model: dict[str, Any], *, threshold: float = 0.5, sparsity: float | None = None,
                  block_size: int = 64) -> Policy:
    """A `Policy` from a DuoAttention pattern (a folder with ``full_attention_heads.tsv`` and
    ``config.json``, or the TSV with the config beside it). A KV head is dense when its gate is
    ``>= threshold``; with ``sparsity``, DuoAttention's own rule decides (the gates' ``sparsity``
    quantile is the threshold). Streaming heads get ``window = recent_size + 1`` (Duo's recent
    tokens exclude the query, attnlab's window counts it)."""
    from .emulators import duo_full_heads

    model = model_entry(model, "--model")
    for name, value in (("--threshold", threshold), ("--sparsity", sparsity)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise FormatError(f"{name} must be a number in [0, 1], got {value!r}")
    p = Path(path)
    tsv = p / "full_attention_heads.tsv" if p.is_dir() else p
    cfg_path = tsv.parent / "config.json"
    if not tsv.is_file():
        raise FormatError(f"no DuoAttention full_attention_heads.tsv at {tsv}: give the pattern folder or the TSV")
    gates = _duo_gate_table(tsv)
    nl, nh, nkv = model["n_layers"], model["n_heads"], model["n_kv_heads"]
    if gates.shape not in ((nl, nkv), (nl, nh)):
        raise FormatError(ERR_SHAPE.format(path=tsv, what="the gate table", got=list(gates.shape), model=model.get("name"), expected=f"[{nl}, {nkv}] (layers x KV heads)"))
    cfg = _read_json(cfg_path, "DuoAttention config.json")
    if not isinstance(cfg, dict):
        raise FormatError(ERR_CORRUPT.format(path=cfg_path, fmt="DuoAttention config.json", reason="expected an object"))
    for key in ("sink_size", "recent_size"):
        if key not in cfg:
            raise FormatError(f"{cfg_path}: DuoAttention config.json needs {key!r}; add it")
    where = str(cfg_path)
    sink = _int_size(cfg["sink_size"], where, "sink_size", allow_zero=True)
    recent = _int_size(cfg["recent_size"], where, "recent_size")
    gates = np.clip(gates, 0, 1)
    full = duo_full_heads(gates, sparsity=sparsity) if sparsity is not None else gates >= threshold
    per_head = gates.shape[1] == nh and nh != nkv
    group = nh // nkv
    heads = []
    for lay in range(nl):
        for h in range(nh):
            col = h if per_head else h // group
            dense = bool(full[lay, col])
            kind = "dense" if dense else "streaming"
            params = {} if dense else {"sink": Elastic(sink), "window": Elastic(recent + 1)}
            heads.append(HeadPolicy(lay, h, h // group, kind, params, None, None,
                                    f"imported from DuoAttention (gate {gates[lay, col]:.3f} {'>=' if dense else '<'} cut)", "exact"))
    return Policy(model, block_size, heads, {"path": str(tsv.parent), "format": "duo"})


# -- reading mask files ---------------------------------------------------------------------
@dataclass
class MaskFile:
    """A mask file read back: the layouts, the policy they came from, and the metadata."""

    layouts: list[BlockSparseLayout]
    policy: Policy
    meta: dict[str, Any]


def _parse_meta(raw: Any, path: Path, fmt: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != MASKS_FORMAT:
        raise FormatError(ERR_CORRUPT.format(path=path, fmt=f"attnlab {fmt} mask", reason="no attnlab mask metadata; a foreign file?"))
    if meta.get("schema") != MASKS_SCHEMA:
        raise FormatError(f"{path} has mask schema {meta.get('schema')!r}, this attnlab reads {MASKS_SCHEMA}: re-export it")
    return meta


#: The largest metadata entry a mask file may hold (a 128-layer policy's JSON is a few MB).
MAX_META_BYTES = 64 << 20


def _max_array_bytes(meta: dict[str, Any], path: Path) -> int:
    """The most bytes one array of a mask file can need, from its declared shape: a dense block
    grid per layer, 8-byte entries, doubled for slack. A file whose arrays are larger than its
    metadata allows is refused before it is loaded (a tiny compressed file can hold a huge array)."""
    try:
        n, b, heads = int(meta["seq_len"]), int(meta["block_size"]), int(meta["n_heads"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(ERR_CORRUPT.format(path=path, fmt="mask", reason="its metadata lacks seq_len, block_size or n_heads")) from None
    if n < 1 or b < 1 or heads < 1 or n > 1 << 24 or heads > 1 << 12:
        raise FormatError(ERR_CORRUPT.format(path=path, fmt="mask", reason=f"implausible seq_len {n}, block_size {b} or n_heads {heads}"))
    nb = -(-n // b)
    return 2 * 8 * heads * nb * (nb + 1) + (1 << 20)


def _read_arrays(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if not path.is_file():
        raise FormatError(f"no mask file at {path}: check the path (attnlab export writes masks.npz, masks.safetensors or flex_block_masks.safetensors)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise FormatError(f"{path} is empty (0 bytes): not an attnlab mask file; re-export it with attnlab export")
    if head[:2] == b"PK":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "__meta__" not in z.files:
                    raise FormatError(ERR_CORRUPT.format(path=path, fmt="npz mask", reason="no __meta__ entry; a foreign file?"))
                if z.zip.getinfo("__meta__.npy").file_size > MAX_META_BYTES:
                    raise FormatError(ERR_CORRUPT.format(path=path, fmt="npz mask", reason="its metadata is implausibly large"))
                meta = _parse_meta(str(z["__meta__"]), path, "npz")
                limit = _max_array_bytes(meta, path)
                for k in z.files:  # sizes as declared in the archive, checked before anything is read
                    if k != "__meta__" and z.zip.getinfo(f"{k}.npy").file_size > limit:
                        raise FormatError(ERR_CORRUPT.format(path=path, fmt="npz mask", reason=f"array {k} is larger than any layout of its declared shape"))
                arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files if k != "__meta__"}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise FormatError(ERR_CORRUPT.format(path=path, fmt="npz mask", reason=f"{type(exc).__name__}: {exc}")) from None
        return arrays, meta, "npz"
    from attnlab.runs import read_safetensors

    try:
        arrays, md = read_safetensors(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FormatError(ERR_CORRUPT.format(path=path, fmt="safetensors mask", reason=f"{type(exc).__name__}: {exc}")) from None
    meta = _parse_meta(md.get("attnlab"), path, "safetensors")
    return arrays, meta, "flex" if meta.get("flex") else "safetensors"


def _unpad(padded_count: torch.Tensor, padded_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `BlockSparseLayout.padded` for one list: ``(count, offset, index)``."""
    count = padded_count[0]
    keep = torch.arange(padded_index.shape[-1])[None, None, :] < count[..., None]
    return csr_from_counts(count, padded_index[0][keep])


def load_masks(path: str | os.PathLike, model: dict[str, Any] | None = None) -> MaskFile:
    """Read an exported mask file (npz, safetensors or flex) back into layouts and its policy."""
    path = Path(path)
    arrays, meta, kind = _read_arrays(path)
    try:
        policy = Policy.from_dict(meta.get("policy"), model=model, path=f"{path} (embedded policy)")
    except PolicyError as exc:
        raise FormatError(str(exc)) from None
    n, b, nl = int(meta["seq_len"]), int(meta["block_size"]), int(meta["n_layers"])
    names = meta.get("head_names") or [[] for _ in range(nl)]
    layouts = []
    for lay in range(nl):
        try:
            if kind == "flex":
                fc, fo, fi = _unpad(arrays[f"layer{lay}.full_kv_num_blocks"], arrays[f"layer{lay}.full_kv_indices"])
                pc, po, pi = _unpad(arrays[f"layer{lay}.kv_num_blocks"], arrays[f"layer{lay}.kv_indices"])
                a = {"full_kv_count": fc, "full_kv_offset": fo, "full_kv_index": fi, "kv_count": pc, "kv_offset": po,
                     "kv_index": pi, "sink": arrays[f"layer{lay}.sink"], "window": arrays[f"layer{lay}.window"]}
            else:
                a = {name: arrays[f"layer{lay}.{name}"] for name in TENSOR_FIELDS}
        except KeyError as exc:
            raise FormatError(ERR_CORRUPT.format(path=path, fmt=f"{kind} mask", reason=f"missing array {exc}")) from None
        try:
            layouts.append(BlockSparseLayout.from_arrays(a, block_size=b, n_q=n, n_k=n, causal=bool(meta.get("causal", True)),
                                                         layer=lay, head_names=names[lay] if lay < len(names) else ()))
        except Exception as exc:
            raise FormatError(ERR_CORRUPT.format(path=path, fmt=f"{kind} mask", reason=f"layer {lay}: {exc}")) from None
    return MaskFile(layouts, policy, meta)


def load_flex_block_masks(path: str | os.PathLike) -> list:
    """FlexAttention ``BlockMask`` per layer from an exported mask file (any of the three)."""
    return [lay.to_flex_block_mask() for lay in load_masks(path).layouts]


# -- import ---------------------------------------------------------------------------------
def import_policy(
    fmt: str,
    path: str | os.PathLike,
    model: dict[str, Any] | None = None,
    *,
    threshold: float = 0.5,
    sparsity: float | None = None,
    block_size: int = 64,
    seq_len: int | None = None,
    estimator=None,
) -> Policy:
    """Read a policy from ``fmt`` (`IMPORT_FORMATS`). Config formats need ``model`` (a run's
    ``run.model``). Imported heads get ``expected_density`` at ``seq_len`` (default: the model's
    context) and, given a `ProfileEstimator`, ``expected_recall`` from that run."""
    _check_format(fmt, IMPORT_FORMATS)
    if fmt in MASK_FORMATS:
        return load_masks(path, model).policy
    if model is None:
        raise FormatError(f"importing {fmt} needs the model identity: pass --run RUN (a profiled run of the model) or a model JSON")
    b = check_block_size(block_size)
    if fmt == "minference":
        pol = minference_to_policy(_read_json(Path(path), "MInference config"), model, source=str(path), block_size=b)
    elif fmt == "vllm":
        p = Path(path)
        p = p / FILENAMES["vllm"][0] if p.is_dir() else p
        pol = vllm_to_policy(_read_json(p, "vLLM sparse_attention_config"), model, source=str(p), block_size=b)
    else:
        pol = duo_to_policy(path, model, threshold=threshold, sparsity=sparsity, block_size=b)
    if seq_len is not None:
        n = check_seq_len(seq_len, pol.model)
    else:
        n_ctx = pol.model.get("n_ctx")
        n = check_seq_len(n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else 4096, pol.model)
    fill_expectations(pol, n, estimator)
    return pol


def fill_expectations(policy: Policy, seq_len: int, estimator=None) -> Policy:
    """Set each head's ``expected_density`` (at ``seq_len``) and, with a `ProfileEstimator` of
    the same model, ``expected_recall``; in place, returns ``policy``."""
    from .curves import causal_tiles, count_tiles

    b = policy.block_size
    total = causal_tiles(seq_len, b)
    cache: dict[str, tuple[float, str]] = {}
    for e in policy.heads:
        cand = e.candidate
        key = cand.key()
        if key not in cache:
            kind = get_kind(e.kind)
            bound = kind.block_bound(e.params, seq_len, b)
            if kind.static and e.kind != "dense":
                cache[key] = (count_tiles(kind.pattern(e.params, seq_len, b), seq_len, b) / total, "exact")
            elif bound is not None:
                cache[key] = (bound / total, "upper_bound" if e.kind == "vertical_slash" else "exact")
            else:
                cache[key] = (float("nan"), "expected")
        d, how = cache[key]
        e.expected_density = None if d != d else float(min(1.0, d))
        e.density_is = how
        if estimator is not None:
            e.expected_recall = float(estimator.evaluate(cand).recall[e.layer, e.head])
    return policy
