"""Run directories: the one place every pipeline stage reads from and writes to.

A run directory ``runs/<name>/`` holds

- ``manifest.json``: schema version, model identity, parameters, package versions, time,
  ``status`` (``"complete"`` once the stage that created it finished);
- ``head_stats.parquet``: long-format head statistics, one row per
  (layer, head, statistic, probe, sample) — see `HEAD_STATS_COLUMNS`;
- ``block_maps.safetensors``: block-level attention mass maps, see `BlockMaps`;
- later stages add ``detections.parquet``, ``policy.json``, ``validation.parquet``, ...

Every file is written atomically (temporary name in the same folder, then ``os.replace``), so
a reader never sees a half-written table. A stage that builds a whole new run writes it under
``<out>.partial/`` and renames it to ``<out>`` only when complete; an interrupted build leaves
only the ``.partial`` folder, from which the same command resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from attnlab.errors import RunError

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
HEAD_STATS = "head_stats.parquet"
BLOCK_MAPS = "block_maps.safetensors"
DETECTIONS = "detections.parquet"
POLICY = "policy.json"

#: Columns of ``head_stats.parquet`` (long format). ``kv_head`` is the KV head the query head
#: reads (GQA); ``probe`` names the prompt set; ``sample`` indexes prompts within it;
#: ``n_tokens`` is that prompt's length.
HEAD_STATS_COLUMNS = ("layer", "head", "kv_head", "statistic", "probe", "sample", "n_tokens", "value")

_ERR_NO_RUN = "no run directory at {path}: run `attnlab profile --out {path}` first, or check the path"
_ERR_NO_MANIFEST = "{path} has no manifest.json, so it is not an attnlab run directory (or it was written by hand)"
_ERR_INCOMPLETE = "run {path} is incomplete (status {status!r}): rerun the command that created it to resume"
_ERR_SCHEMA = "run {path} has schema version {found}, this attnlab reads version {expected}: re-create it with `attnlab profile --force`"
_ERR_EXISTS = "{path} already exists: pass --force to overwrite it, or choose another --out"
_ERR_UNWRITABLE = "cannot write to {path}: {reason}. Choose an --out in a folder you can write to"
_ERR_MISSING_TABLE = "run {path} has no {name}: {hint}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet, atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors (no pickling), atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a safetensors file."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


@dataclass
class BlockMaps:
    """Block-level attention mass maps, averaged over samples (SeerAttention-style ground truth).

    For one sample with attention probabilities ``A[i, j]`` and blocks of ``block_size`` tokens:

    - ``mass_sum[l, h, qb, kb] = (1 / |Q_qb|) * sum_{i in Q_qb, j in K_kb} A[i, j]`` — the mean
      mass that a query of block ``qb`` puts on key block ``kb`` (each row sums to 1 over ``kb``
      for the query blocks that were measured);
    - ``mass_max[l, h, qb, kb] = max_{i in Q_qb, j in K_kb} A[i, j]`` — the max-pooled map that
      SeerAttention calls the block ground truth.

    ``Q_qb`` is the set of *measured* queries in block ``qb`` (all queries, or only the last
    ``k`` when statistics use MInference's last-queries shortcut). Samples have different
    lengths, so maps are aligned at token 0 and each cell is averaged over the samples that
    measured it; ``count[qb, kb]`` is that number (0 where no sample reached the cell, and the
    maps hold 0 there).

    Shapes: ``mass_sum``, ``mass_max``: ``[layers, heads, q_blocks, k_blocks]`` float32;
    ``count``: ``[q_blocks, k_blocks]`` int32.
    """

    block_size: int
    mass_sum: torch.Tensor
    mass_max: torch.Tensor
    count: torch.Tensor

    def save(self, path: str | os.PathLike) -> None:
        write_safetensors(
            path,
            {"mass_sum": self.mass_sum, "mass_max": self.mass_max, "count": self.count},
            {"block_size": str(self.block_size), "schema": str(SCHEMA_VERSION)},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockMaps:
        tensors, meta = read_safetensors(path)
        try:
            return cls(int(meta["block_size"]), tensors["mass_sum"], tensors["mass_max"], tensors["count"])
        except KeyError as exc:
            raise RunError(f"{path} is not an attnlab block-map file (missing {exc}); re-run `attnlab profile`") from exc


class Run:
    """A run directory on disk. Open one with `Run.open(path)`; it checks the manifest."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True) -> Run:
        path = Path(path)
        if not path.is_dir():
            partial = partial_dir(path)
            if partial.is_dir():
                raise RunError(_ERR_INCOMPLETE.format(path=path, status="interrupted"))
            raise RunError(_ERR_NO_RUN.format(path=path))
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunError(_ERR_NO_MANIFEST.format(path=path))
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{manifest_path} is not valid JSON ({exc}); re-create the run with --force") from exc
        found = manifest.get("schema")
        if found != SCHEMA_VERSION:
            raise RunError(_ERR_SCHEMA.format(path=path, found=found, expected=SCHEMA_VERSION))
        if require_complete and manifest.get("status") != "complete":
            raise RunError(_ERR_INCOMPLETE.format(path=path, status=manifest.get("status")))
        return cls(path, manifest)

    # -- identity -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> dict[str, Any]:
        """Model identity: ``name``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``n_ctx``."""
        return dict(self.manifest.get("model", {}))

    def has(self, filename: str) -> bool:
        return (self.path / filename).is_file()

    def file(self, filename: str) -> Path:
        return self.path / filename

    # -- readers ------------------------------------------------------------------------
    def _require(self, filename: str, hint: str) -> Path:
        p = self.path / filename
        if not p.is_file():
            raise RunError(_ERR_MISSING_TABLE.format(path=self.path, name=filename, hint=hint))
        return p

    def head_stats(self) -> pd.DataFrame:
        """The long-format statistics table (`HEAD_STATS_COLUMNS`)."""
        p = self._require(HEAD_STATS, "run `attnlab profile` to capture statistics")
        return _read_parquet(p)

    def block_maps(self) -> BlockMaps:
        p = self._require(BLOCK_MAPS, "run `attnlab profile` to capture block maps")
        return BlockMaps.load(p)

    def detections(self) -> pd.DataFrame:
        p = self._require(DETECTIONS, "run `attnlab probe all --out RUN` to detect head types")
        return _read_parquet(p)

    def read_table(self, filename: str, hint: str) -> pd.DataFrame:
        return _read_parquet(self._require(filename, hint))

    def read_json(self, filename: str, hint: str) -> Any:
        p = self._require(filename, hint)
        try:
            return json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{p} is not valid JSON ({exc}); re-create it") from exc

    # -- writers (each atomic) ----------------------------------------------------------
    def write_table(self, filename: str, df: pd.DataFrame) -> Path:
        p = self.path / filename
        write_parquet(p, df)
        return p

    def write_json(self, filename: str, obj: Any) -> Path:
        p = self.path / filename
        write_json(p, obj)
        return p

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        write_json(self.path / MANIFEST, self.manifest)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}); re-create it") from exc


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run that will end up at ``out`` is built: ``<parent>/.<name>.partial``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_writable_target(out: str | os.PathLike, *, force: bool) -> Path:
    """Refuse an existing ``out`` without ``force`` and an unwritable parent, before any work.

    Returns ``out`` as a Path. Creates nothing.
    """
    out = Path(out)
    if out.exists() and not force:
        raise RunError(_ERR_EXISTS.format(path=out))
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory: remove it or choose another --out")
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(_ERR_UNWRITABLE.format(path=out, reason=f"{probe} is not a directory"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(_ERR_UNWRITABLE.format(path=out, reason=f"{probe} is not writable"))
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("attnlab", "torch", "transformers", "transformer-lens", "numpy", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def new_manifest(kind: str, model: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """A manifest for a new run, ``status`` ``"running"`` until the stage finishes."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "status": "running",
        "model": model,
        "parameters": parameters,
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finalize_partial(partial: Path, out: Path) -> None:
    """Move a finished ``partial`` run into place at ``out``, replacing an old run if any.

    The old run is renamed aside first and removed only after the new one is in place, so an
    error in between never loses both.
    """
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run directories (folders with a manifest.json) directly under ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def ensure_run(out: str | os.PathLike, model: dict[str, Any], kind: str, parameters: dict[str, Any]) -> Run:
    """The run directory a stage adds its results to: an existing run of the same model, or a
    new one (created atomically with a complete manifest).

    Call it after the stage's work is done and before writing its files, so that a failed stage
    leaves nothing behind. A stage's parameters are recorded under ``manifest["stages"][kind]``.
    """
    out = Path(out)
    if out.exists():
        run = Run.open(out)
        mine = {k: run.model.get(k) for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim")}
        theirs = {k: model.get(k) for k in mine}
        if mine != theirs:
            raise RunError(
                f"run {out} was made with model {run.model.get('name')!r} {mine}, not {model.get('name')!r} {theirs}: "
                "choose another --out"
            )
    else:
        check_writable_target(out, force=False)
        partial = partial_dir(out)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        manifest = new_manifest(kind, model, parameters)
        manifest["status"] = "complete"
        write_json(partial / MANIFEST, manifest)
        finalize_partial(partial, out)
        run = Run.open(out)
    stages = dict(run.manifest.get("stages", {}))
    stages[kind] = {"parameters": parameters, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run.update_manifest(stages=stages)
    return run
