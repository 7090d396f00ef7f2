"""`attnlab profile`: capture every head's statistics over a prompt set into a run directory.

The run is built under ``<out>.partial/`` — one Parquet shard per finished sample plus the
running block-map sums — and renamed to ``<out>`` only when every sample is done. Running the
same command again after an interruption resumes from the shards; a different command on the
same ``--out`` is refused unless ``--force``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from attnlab.capture import capture, check_length
from attnlab.errors import RunError
from attnlab.models import LoadedModel
from attnlab.names import head_label
from attnlab.prompts import Prompt
from attnlab.runs import (
    BLOCK_MAPS,
    HEAD_STATS,
    LOCK_NAME,
    MANIFEST,
    PROFILE_ACCUM,
    BlockMaps,
    Run,
    check_writable_target,
    file_lock,
    finalize_partial,
    new_manifest,
    partial_dir,
    read_safetensors,
    write_json,
    write_parquet,
    write_safetensors,
)
from attnlab.shards import Shard
from attnlab.stats import StatConfig

_ERR_OTHER_PARTIAL = (
    "{partial} holds an interrupted run with different parameters: rerun the original command "
    "to resume it, or pass --force to discard it"
)


def sample_table(result_values: torch.Tensor, names: Sequence[str], prompt: Prompt, sample: int, probe: str, group: int) -> pd.DataFrame:
    """Long-format rows for one sample: ``[layers, heads, n_stats]`` → one row per value."""
    n_layers, n_heads, n_stats = result_values.shape
    layer = torch.arange(n_layers).repeat_interleave(n_heads * n_stats)
    head = torch.arange(n_heads).repeat_interleave(n_stats).repeat(n_layers)
    return pd.DataFrame(
        {
            "layer": layer.to(torch.int16).numpy(),
            "head": head.to(torch.int16).numpy(),
            "kv_head": (head // group).to(torch.int16).numpy(),
            "statistic": pd.Categorical(list(names) * (n_layers * n_heads), categories=list(names)),
            "probe": probe,
            "sample": sample,
            "n_tokens": prompt.n_tokens,
            "value": result_values.reshape(-1).to(torch.float64).numpy(),
        }
    )


def profile(
    model: LoadedModel,
    prompts: Sequence[Prompt],
    out: str | Path,
    *,
    config: StatConfig | None = None,
    path: str = "pattern",
    probe: str = "builtin",
    force: bool = False,
    progress: bool = True,
    extra_parameters: dict[str, Any] | None = None,
    shard: Shard | None = None,
) -> Run:
    """Profile ``prompts`` on ``model`` and write the run directory ``out``.

    Every input is checked before anything is written: an existing ``out`` without ``force``,
    an unwritable parent, a prompt longer than the model's context. With ``shard`` (``I/N``)
    only the samples ``i % N == I`` are profiled (keeping their global sample numbers) into a
    shard run that also keeps its exact block-map sums, for `attnlab merge`.
    """
    config = config or StatConfig()
    out = check_writable_target(out, force=force)
    if not prompts:
        raise RunError("no prompts to profile: give --samples > 0 or a prompt file with content")
    for p in prompts:
        check_length(model, p.n_tokens, p.name)

    parameters = {
        "path": path,
        "probe": probe,
        "stat_config": config.to_dict(),
        "prompts": [p.name for p in prompts],
        "lengths": [p.n_tokens for p in prompts],
        **(extra_parameters or {}),
    }
    parameters = json.loads(json.dumps(parameters))  # tuples -> lists, as they read back
    partial = partial_dir(out)
    partial.mkdir(parents=True, exist_ok=True)
    # one profile per --out at a time: a second one is told who holds it, and never crashes
    # into the first one's partial folder (the lock moves into the finished run with it)
    with file_lock(partial, wait=False, what="the same command to resume"):
        return _profile_locked(model, prompts, out, partial, config, path, probe, force, progress, parameters, shard)


def _profile_locked(model: LoadedModel, prompts: Sequence[Prompt], out: Path, partial: Path, config: StatConfig, path: str,
                    probe: str, force: bool, progress: bool, parameters: dict[str, Any], shard: Shard | None = None) -> Run:
    todo = list(range(len(prompts))) if shard is None else shard.take(range(len(prompts)))
    if not todo:
        raise RunError(f"--shard {shard} gets no sample of {len(prompts)}: use at most {len(prompts)} shards")
    manifest = new_manifest("profile", model.identity(), parameters)
    if shard is not None:
        manifest["shard"] = shard.record("profile", parameters, [str(i) for i in todo], len(prompts))
    done: set[int] = set()
    old = _read_manifest(partial)
    if old is not None and old.get("parameters") == parameters and old.get("model") == manifest["model"]:
        done = _read_done(partial)
    elif force or old is None:
        _clear(partial)
    else:
        raise RunError(_ERR_OTHER_PARTIAL.format(partial=partial))
    (partial / "samples").mkdir(parents=True, exist_ok=True)
    write_json(partial / MANIFEST, manifest)

    max_blocks = -(-max(p.n_tokens for p in prompts) // config.block_size)
    acc = _load_accum(partial, done, model, max_blocks)
    names = config.names
    bar = tqdm(total=len(todo), desc=f"profiling {model.name}", unit="sample", disable=not progress, initial=len(done))
    t_start = time.perf_counter()
    for i in todo:
        prompt = prompts[i]
        if i in done:
            continue
        bar.set_postfix_str(f"{prompt.n_tokens} tokens, {path} path")
        result = capture(model, prompt.input_ids, config, path=path, name=prompt.name)
        write_parquet(partial / "samples" / f"{i:05d}.parquet", sample_table(result.values(), names, prompt, i, probe, model.group_size))
        _add_sample_blocks(acc, result, config.block_size)
        done.add(i)
        # the samples done travel in the accumulator file's metadata: one atomic write, so a
        # kill between two files can never count a sample twice
        write_safetensors(partial / PROFILE_ACCUM, acc, {"done": json.dumps(sorted(done))})
        bar.update(1)
    bar.close()

    parts = [pd.read_parquet(partial / "samples" / f"{i:05d}.parquet") for i in todo]
    table = pd.concat(parts, ignore_index=True)
    table["statistic"] = table["statistic"].astype(str)
    write_parquet(partial / HEAD_STATS, table)
    _block_maps_from(acc, config.block_size).save(partial / BLOCK_MAPS)
    shutil.rmtree(partial / "samples")
    if shard is None:
        (partial / PROFILE_ACCUM).unlink()  # a shard keeps its exact float64 sums for the merge
    if shard is not None:  # wall seconds of this process's samples (a resumed shard: since the resume)
        manifest["shard"]["seconds"] = time.perf_counter() - t_start
    manifest["status"] = "complete"
    manifest["tables"] = {HEAD_STATS.filename: len(table), BLOCK_MAPS.filename: list(acc["sum"].shape)}
    write_json(partial / MANIFEST, manifest)
    finalize_partial(partial, out)
    return Run.open(out)


def _block_maps_from(acc: dict[str, torch.Tensor], block_size: int) -> BlockMaps:
    """Mean block maps from the running float64 sums over the cells measured."""
    count = acc["count"]
    denom = count.clamp_min(1).to(torch.float64)
    return BlockMaps(
        block_size=block_size,
        mass_sum=(acc["sum"] / denom).to(torch.float32),
        mass_max=(acc["max"] / denom).to(torch.float32),
        count=count.to(torch.int32),
    )


def _clear(partial: Path) -> None:
    """Empty a partial folder we hold the lock of (the lock file itself stays)."""
    for p in partial.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _read_manifest(partial: Path) -> dict | None:
    try:
        return json.loads((partial / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_done(partial: Path) -> set[int]:
    """Samples an interrupted profile finished: kept in the accumulator file's metadata, so the
    sums and the list can never disagree (a sample whose parquet shard is missing is redone)."""
    try:
        _, meta = read_safetensors(partial / PROFILE_ACCUM)
        done = {int(i) for i in json.loads(meta.get("done", "[]"))}
    except Exception:  # absent or unreadable (killed mid-write before the rename): start over
        return set()
    return done


def _load_accum(partial: Path, done: set[int], model: LoadedModel, max_blocks: int) -> dict[str, torch.Tensor]:
    shape = (model.n_layers, model.n_heads, max_blocks, max_blocks)
    if done and (partial / PROFILE_ACCUM).is_file():
        tensors, _ = read_safetensors(partial / PROFILE_ACCUM)
        if tuple(tensors["sum"].shape) == shape and all((partial / "samples" / f"{i:05d}.parquet").is_file() for i in done):
            return tensors
        done.clear()
    return {
        "sum": torch.zeros(shape, dtype=torch.float64),
        "max": torch.zeros(shape, dtype=torch.float64),
        "count": torch.zeros(max_blocks, max_blocks, dtype=torch.int64),
    }


def _add_sample_blocks(acc: dict[str, torch.Tensor], result, block_size: int) -> None:
    """Add one sample's block maps to the running sums over the cells it measured."""
    s = torch.stack([layer.block_sum for layer in result.layers]).to(torch.float64)
    m = torch.stack([layer.block_max for layer in result.layers]).to(torch.float64)
    rows = result.layers[0].block_rows > 0  # [qb] measured query blocks
    nb = s.shape[-1]
    measured = rows[:, None].expand(nb, nb)
    acc["sum"][:, :, :nb, :nb] += s * measured
    acc["max"][:, :, :nb, :nb] += m * measured
    acc["count"][:nb, :nb] += measured.to(torch.int64)


# ---------------------------------------------------------------------------------------
# reading a run back
# ---------------------------------------------------------------------------------------
def merge_profile_shards(shards: list[Run], merged: Run) -> None:
    """`attnlab merge` of ``profile`` shards: statistics in sample order, block maps from the
    shards' exact sums (what one process would have written)."""
    tables = [run.read(HEAD_STATS) for run in shards]
    table = pd.concat(tables, ignore_index=True)
    table = table.iloc[table["sample"].argsort(kind="stable")].reset_index(drop=True)
    acc: dict[str, torch.Tensor] | None = None
    for run in shards:
        tensors, _ = read_safetensors(run.require(PROFILE_ACCUM))
        if acc is None:
            acc = {k: v.clone() for k, v in tensors.items() if k in ("sum", "max", "count")}
        else:
            if tuple(tensors["sum"].shape) != tuple(acc["sum"].shape):
                raise RunError(f"{run.file(PROFILE_ACCUM)} has block maps of another shape than the other shards: "
                               "re-run that shard with the job's command")
            for k in acc:
                acc[k] += tensors[k]
    merged.write(HEAD_STATS, table)
    _block_maps_from(acc, int(merged.manifest["parameters"]["stat_config"]["block_size"])).save(merged.file(BLOCK_MAPS))
    merged.manifest["tables"] = {HEAD_STATS.filename: len(table), BLOCK_MAPS.filename: list(acc["sum"].shape)}
    write_json(merged.file(MANIFEST), merged.manifest)


def head_means(run: Run, statistics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean of each statistic over samples: one row per (layer, head), one column per statistic."""
    table = run.head_stats()
    table = table.assign(statistic=table["statistic"].astype(str))
    if statistics is not None:
        table = table[table["statistic"].isin(list(statistics))]
    wide = table.pivot_table(index=["layer", "head", "kv_head"], columns="statistic", values="value", aggfunc="mean")
    wide.columns.name = None
    return wide.reset_index()


def summarize(run: Run, top: int = 5) -> str:
    """A short text summary: top sink heads, most local heads, most diffuse heads."""
    means = head_means(run)
    m = run.model
    lines = [
        f"run {run.path}  model {m.get('name')}  ({m.get('n_layers')} layers × {m.get('n_heads')} heads, "
        f"{m.get('n_kv_heads')} KV heads)  samples {len(run.manifest['parameters']['lengths'])}  "
        f"path {run.manifest['parameters']['path']}",
    ]
    sink_col = next((c for c in means.columns if str(c).startswith("sink_mass_1")), None)
    local_col = "local_mass_64" if "local_mass_64" in means.columns else next((c for c in means.columns if str(c).startswith("local_mass_")), None)
    if sink_col:
        share = float((means[sink_col] > 0.3).mean())
        lines.append(f"{share:.0%} of heads put > 0.3 of their mass on the first token")
    sections = [
        (f"top sink heads ({sink_col}: mass on token 0)", sink_col, False),
        (f"most local heads ({local_col}: mass on the 64 most recent keys)", local_col, False),
        ("most diffuse heads (entropy_norm: 1 = uniform)", "entropy_norm", False),
    ]
    for title, col, ascending in sections:
        if col is None or col not in means.columns:
            continue
        best = means.sort_values(col, ascending=ascending).head(top)
        lines.append(title)
        lines.append("  " + "  ".join(f"{head_label(r.layer, r.head)}={getattr(r, col):.3f}" for r in best.itertuples()))
    return "\n".join(lines)
