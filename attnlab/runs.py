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
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from attnlab.errors import RunError
from attnlab.identity import ModelIdentity

SCHEMA_VERSION = 1

#: Columns of ``head_stats.parquet`` (long format). ``kv_head`` is the KV head the query head
#: reads (GQA); ``probe`` names the prompt set; ``sample`` indexes prompts within it;
#: ``n_tokens`` is that prompt's length.
HEAD_STATS_COLUMNS = ("layer", "head", "kv_head", "statistic", "probe", "sample", "n_tokens", "value")
#: Columns of ``detections.parquet`` (see `attnlab.probes.detections`).
DETECTION_COLUMNS = ("layer", "head", "kv_head", "head_type", "score", "probe", "evidence")


# ---------------------------------------------------------------------------------------
# the artifact registry: every file a run can hold, declared once
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    """One kind of file in a run directory.

    Attributes:
        key: short stable name (``"head_stats"``).
        filename: the file's name in the run directory; nothing outside this module spells it.
        format: ``parquet``, ``csv``, ``json`` or ``safetensors`` — decides how `Run.read`
            and `Run.write` handle it.
        holds: what the file holds, in one line.
        made_by: the command that writes it; ``{run}`` is replaced by the run's path and
            ``MODEL`` by the run's model name in `Artifact.command`.
        columns: columns a Parquet artifact must have (checked on every read).
        internal: resume state of an unfinished stage, not a result.

    An `Artifact` is path-like (``run.path / HEAD_STATS``) and prints as its file name.
    """

    key: str
    filename: str
    format: str
    holds: str
    made_by: str
    columns: tuple[str, ...] = ()
    internal: bool = False

    def __fspath__(self) -> str:
        return self.filename

    def __str__(self) -> str:
        return self.filename

    def command(self, run_path: str | os.PathLike, model: str | None = None) -> str:
        """The command that (re)writes this artifact into the run at ``run_path``."""
        cmd = self.made_by.format(run=run_path)
        return cmd.replace("MODEL", model) if model else cmd


#: Every artifact, by key, in the order a run gains them.
ARTIFACTS: dict[str, Artifact] = {}


def _declare(key: str, filename: str, fmt: str, holds: str, made_by: str, columns: tuple[str, ...] = (), internal: bool = False) -> Artifact:
    art = Artifact(key, filename, fmt, holds, made_by, tuple(columns), internal)
    ARTIFACTS[key] = art
    return art


MANIFEST = _declare("manifest", "manifest.json", "json", "schema, model identity, stages run with their parameters and summaries, versions, time",
                    "attnlab profile --model MODEL --out {run}")
HEAD_STATS = _declare("head_stats", "head_stats.parquet", "parquet", "per-head attention statistics, one row per (layer, head, statistic, probe, sample)",
                      "attnlab profile --model MODEL --out {run} --force", HEAD_STATS_COLUMNS)
BLOCK_MAPS = _declare("block_maps", "block_maps.safetensors", "safetensors", "block-level attention mass maps (sum- and max-pooled), see `BlockMaps`",
                      "attnlab profile --model MODEL --out {run} --force")
PROFILE_ACCUM = _declare("profile_accum", "block_accum.safetensors", "safetensors",
                         "block-map sums of an unfinished profile and the samples they hold (resume state)",
                         "attnlab profile --model MODEL --out {run}", internal=True)
DETECTIONS = _declare("detections", "detections.parquet", "parquet", "a score per (head, head type) with its evidence",
                      "attnlab probe all --model MODEL --out {run}", DETECTION_COLUMNS)
FAMILIES = _declare("families", "families.parquet", "parquet", "head families (PCA + k-means over statistics and detections)",
                    "attnlab probe families --model MODEL --out {run}", ("layer", "head", "kv_head", "pc1", "pc2", "family"))
NEEDLE_RESULTS = _declare("needle_results", "needle_results.parquet", "parquet", "every needle sample of the retrieval probe and the model's answer",
                          "attnlab probe retrieval --model MODEL --out {run}")
RETRIEVAL_TRACE = _declare("retrieval_trace", "retrieval_trace.parquet", "parquet", "per decoding step, which heads copied from the needle",
                           "attnlab probe retrieval --model MODEL --out {run}")
RETRIEVAL_SUMMARY = _declare("retrieval_summary", "retrieval_summary.json", "json", "the retrieval probe's accuracy, stability and settings",
                             "attnlab probe retrieval --model MODEL --out {run}")
CAUSAL_CHECK = _declare("causal_check", "causal_check.parquet", "parquet", "needle accuracy with top-k retrieval heads ablated vs random heads",
                        "attnlab probe retrieval --model MODEL --out {run}", ("condition", "k", "accuracy"))
CAUSAL_SUMMARY = _declare("causal_summary", "causal_check.json", "json", "summary of the causal check (drop ratios)",
                          "attnlab probe retrieval --model MODEL --out {run}")
LINEAR_PROBES = _declare("linear_probes", "linear_probes.parquet", "parquet", "per-head linear probes with control-task selectivity",
                         "attnlab probe linear --model MODEL --out {run}", ("property", "layer", "head", "test_acc"))
POLICY = _declare("policy", "policy.json", "json", "a per-head sparse-attention policy (see `attnlab.sparsity_stats.policy`)",
                  "attnlab policy {run} --budget 0.15 --out {run}/policy.json")
POLICY_COMPARE = _declare("policy_compare", "policy_compare.csv", "csv", "the budgeted policy against the baselines at several budgets (the plot beside it as .html)",
                          "attnlab policy compare {run} --budgets 0.05,0.1,0.2,0.4", ("budget", "method", "density", "expected_recall"))
VALIDATION_HEADS = _declare("validation_heads", "validation_heads.parquet", "parquet", "per-head errors and recall of a validated policy",
                            "attnlab validate {run}/policy.json --model MODEL --out {run}", ("layer", "head"))
VALIDATION_SUMMARY = _declare("validation_summary", "validation.json", "json", "model-level validation: KL, perplexity, needle accuracy, density, time",
                              "attnlab validate {run}/policy.json --model MODEL --out {run}")
DECODE_SAMPLES = _declare("decode_samples", "decode_samples.parquet", "parquet",
                         "decode-phase validation, paired per sample: dense vs compressed KV cache (continuation agreement, KL, needle answers, KV bytes)",
                         "attnlab validate {run}/policy.json --phase decode --model MODEL --out {run}", ("task", "sample", "kv_fraction"))
DECODE_SUMMARY = _declare("decode_summary", "decode_validation.json", "json",
                          "decode-phase validation: token match, KL, needle accuracy dense vs compressed, KV bytes held vs dense vs predicted, decode speed",
                          "attnlab validate {run}/policy.json --phase decode --model MODEL --out {run}")
EVAL_SAMPLES = _declare("eval_samples", "eval_samples.parquet", "parquet", "task-suite answers: one row per sample and method (dense, each policy), graded",
                        "attnlab eval --policy {run}/policy.json --model MODEL --out {run}", ("sample", "task", "length", "method", "score", "correct", "density"))
EVAL_SUMMARY = _declare("eval_summary", "eval_summary.csv", "csv", "task-suite scores per task, length and method: 95% intervals, density, paired outcomes vs dense",
                        "attnlab eval --policy {run}/policy.json --model MODEL --out {run}", ("task", "length", "method", "n", "score", "ci_low", "ci_high", "density"))
ISO_DENSITY = _declare("iso_density", "iso_density.csv", "csv",
                       "every eval method at the same achieved densities per task and length, with 95% intervals "
                       "and the paired gap to dense (gap, gap_low, gap_high, n_paired; absent in reports made before it) "
                       "(the markdown table and the HTML plot beside it as .md and .html)",
                       "attnlab eval --compare {run}", ("task", "length", "target", "method", "setting", "density", "score", "ci_low", "ci_high"))
CIRCUIT = _declare("circuit", "circuit.json", "json", "a head-level circuit: nodes, edges, faithfulness curve",
                   "attnlab circuit --task ioi --model MODEL --out {run}")


def artifact(key: str | Artifact) -> Artifact:
    """The declared artifact for ``key`` (or the artifact itself)."""
    if isinstance(key, Artifact):
        return key
    try:
        return ARTIFACTS[key]
    except KeyError:
        raise RunError(f"unknown run artifact {key!r}: known are {', '.join(ARTIFACTS)}") from None


_ERR_NO_RUN = "no run directory at {path}: run `attnlab profile --out {path}` first, or check the path"
_ERR_NO_RUN_FILE = "nothing at {path}, and a run is a folder, not a file: give the folder a run was written to (e.g. runs/r1)"
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".npz", ".safetensors", ".html", ".tsv", ".pt")
_ERR_FILE_NOT_RUN = "{path} is a file, not a run directory: give the folder a run was written to (e.g. runs/r1)"
_ERR_OUT_IS_FILE = "--out {path} is a file, not a run directory: give a new folder or an existing run of this model"
_ERR_NO_MANIFEST = "{path} has no manifest.json, so it is not an attnlab run directory (or it was written by hand)"
_ERR_INCOMPLETE = "run {path} is incomplete (status {status!r}): rerun the command that created it to resume"
_ERR_SCHEMA = "run {path} has schema version {found}, this attnlab reads version {expected}: re-create it with `attnlab profile --force`"
_ERR_EXISTS = "{path} already exists: pass --force to overwrite it, or choose another --out"
_ERR_UNWRITABLE = "cannot write to {path}: {reason}. Choose an --out in a folder you can write to"
_ERR_MISSING_TABLE = "run {path} has no {name}: {hint}"
_ERR_COLUMNS = "{path} lacks the column(s) {missing} (it has {have}): it was written by an older attnlab; re-create it with `{command}`"


#: Largest JSON file a run, policy or config may be (a manifest is a few kB; a policy of a
#: 128-layer model under 10 MB).
MAX_JSON_BYTES = 64 << 20


def load_json(path: str | os.PathLike, *, what: str = "file", fix: str = "re-create it", error: type[Exception] = RunError) -> Any:
    """Parse a JSON file with limits: at most `MAX_JSON_BYTES`, no nesting deep enough to
    exhaust the parser's recursion. Any failure is one ``error`` (a `RunError` unless the
    caller's stage has its own type) naming the file and ``fix``. Every JSON file attnlab reads
    — manifests, policies, tool configs, circuits — goes through here."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path} is {size} bytes, more than any attnlab {what} ({MAX_JSON_BYTES} bytes): {fix}")
        return loads_json(path.read_text(), where=str(path), what=what, fix=fix, error=error)
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc}): {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror or exc}): {fix}") from None


def loads_json(text: str, *, where: str, what: str = "file", fix: str = "re-create it", error: type[Exception] = RunError) -> Any:
    """`load_json` for text already read (one JSONL line, say); ``where`` names it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where} is nested too deeply to be an attnlab {what}: {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {fix}") from None
    except ValueError as exc:  # valid syntax beyond the parser's limits (an integer of thousands of digits)
        raise error(f"{where} is not a usable {what} ({str(exc).splitlines()[0]}): {fix}") from None


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


def _remove_dead_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by writers that were killed mid-write (their pid,
    part of the name, is gone). A live writer's temporary is never touched."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if not parts or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The lock file of a run directory (and of a partial one being built).
LOCK_NAME = ".attnlab.lock"


@contextmanager
def file_lock(folder: str | os.PathLike, *, name: str = LOCK_NAME, wait: bool = True, what: str = "this run") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (a ``name`` file in it) for the ``with`` block.

    With ``wait=False`` a lock held by another process is a `RunError` that names its pid —
    for work that must not run twice at once (two ``profile`` into one ``--out``). The lock
    dies with its process, so a killed writer never leaves a stale lock."""
    import fcntl

    path = Path(folder) / name
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunError(f"{folder} is being written by attnlab (pid {holder}); wait for it to finish, or stop it, then rerun {what}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs honour the umask
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
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
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
    def load(cls, path: str | os.PathLike, fix: str = "re-run `attnlab profile`") -> BlockMaps:
        try:
            tensors, meta = read_safetensors(path)
        except Exception as exc:  # safetensors raises its own error types for a truncated or corrupt file
            raise RunError(f"{path} is not a readable block-map file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {fix}") from None
        try:
            maps = cls(int(meta["block_size"]), tensors["mass_sum"], tensors["mass_max"], tensors["count"])
        except KeyError as exc:
            raise RunError(f"{path} is not an attnlab block-map file (missing {exc}); {fix}") from exc
        except ValueError as exc:
            raise RunError(f"{path} is not an attnlab block-map file (bad block_size); {fix}") from exc
        shape = tuple(maps.mass_sum.shape)
        if (maps.block_size < 1 or len(shape) != 4 or shape[2] != shape[3] or tuple(maps.mass_max.shape) != shape
                or tuple(maps.count.shape) != shape[2:]):
            raise RunError(f"{path} is not an attnlab block-map file (block_size {maps.block_size}, mass_sum {list(shape)}, "
                           f"mass_max {list(maps.mass_max.shape)}, count {list(maps.count.shape)} do not fit together); {fix}")
        return maps


class Run:
    """A run directory on disk.

    Open one with `Run.open(path)` (checks the manifest), or `Run.coerce(run_or_path)` where a
    function accepts either. Read and write its files only through the artifact registry:
    ``run.read(DETECTIONS)``, ``run.write(DETECTIONS, df)``, ``run.has(FAMILIES)``.
    """

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True) -> Run:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(_ERR_FILE_NOT_RUN.format(path=path))
        if not path.is_dir():
            partial = partial_dir(path)
            if partial.is_dir():
                raise RunError(_ERR_INCOMPLETE.format(path=path, status="interrupted"))
            if path.suffix.lower() in _FILE_SUFFIXES:  # a file name: creating a run there is no fix
                raise RunError(_ERR_NO_RUN_FILE.format(path=path))
            raise RunError(_ERR_NO_RUN.format(path=path))
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunError(_ERR_NO_MANIFEST.format(path=path))
        manifest = load_json(manifest_path, what="manifest", fix="re-create the run with --force")
        if not isinstance(manifest, dict):
            raise RunError(f"{manifest_path} is not an attnlab manifest (not a JSON object); re-create the run with --force")
        found = manifest.get("schema")
        if found != SCHEMA_VERSION:
            raise RunError(_ERR_SCHEMA.format(path=path, found=found, expected=SCHEMA_VERSION))
        if require_complete and manifest.get("status") != "complete":
            raise RunError(_ERR_INCOMPLETE.format(path=path, status=manifest.get("status")))
        run = cls(path, manifest)
        run.identity  # noqa: B018 - a manifest whose model entry is unusable is refused here, once
        if not isinstance(manifest.get("stages", {}), dict) or not isinstance(manifest.get("parameters", {}), dict):
            raise RunError(f"{manifest_path} has a malformed stages/parameters entry; re-create the run with --force")
        lengths = manifest.get("parameters", {}).get("lengths")
        if lengths is not None and not (isinstance(lengths, list) and all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths)):
            raise RunError(f"{manifest_path} has a malformed parameters.lengths entry (not a list of token counts); re-create the run with --force")
        return run

    @classmethod
    def coerce(cls, run: Run | str | os.PathLike) -> Run:
        """``run`` itself when it is a `Run`, else the complete run opened at that path."""
        return run if isinstance(run, Run) else cls.open(run)

    # -- identity -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> dict[str, Any]:
        """The manifest's model entry as stored (see `identity` for the checked form)."""
        return dict(self.manifest.get("model", {}))

    @property
    def identity(self) -> ModelIdentity:
        """The model this run was made with (`ModelIdentity`)."""
        return ModelIdentity.from_dict(self.manifest.get("model", {}), where=f"run {self.path}")

    def check_model(self, model: Any, *, fix: str = "choose another --out, or load the model this run was made with") -> None:
        """`IdentityError` unless ``model`` (a `LoadedModel` or identity) is the run's model."""
        ours = model.identity() if callable(getattr(model, "identity", None)) else ModelIdentity.from_dict(model)
        ours.check(self.identity, subject=f"run {self.path}", fix=fix)

    # -- artifacts ----------------------------------------------------------------------
    def has(self, art: Artifact | str) -> bool:
        return (self.path / _resolve(art)).is_file()

    def file(self, art: Artifact | str) -> Path:
        """The path of ``art`` in this run (whether or not it exists yet)."""
        return self.path / _resolve(art)

    def require(self, art: Artifact | str) -> Path:
        """The path of ``art``; `RunError` naming the command that makes it when it is absent."""
        art = _resolve(art)
        p = self.path / art
        if not p.is_file():
            raise RunError(_ERR_MISSING_TABLE.format(path=self.path, name=art.filename, hint=f"run `{self.command_for(art)}`"))
        return p

    def command_for(self, art: Artifact | str) -> str:
        """The command that writes ``art`` into this run, with the run's model filled in."""
        return _resolve(art).command(self.path, self.model.get("name"))

    def read(self, art: Artifact | str) -> Any:
        """Read an artifact: a DataFrame (columns checked) for Parquet, the parsed object for
        JSON, ``(tensors, metadata)`` for safetensors. Absent or unreadable: `RunError`."""
        art = _resolve(art)
        p = self.require(art)
        if art.format in ("parquet", "csv"):
            fix = f"re-create it with `{self.command_for(art)}`"
            df = _read_parquet(p, fix) if art.format == "parquet" else _read_csv(p, fix)
            missing = [c for c in art.columns if c not in df.columns]
            if missing:
                raise RunError(_ERR_COLUMNS.format(path=p, missing=", ".join(missing), have=", ".join(map(str, df.columns)),
                                                   command=self.command_for(art)))
            return df
        if art.format == "json":
            return load_json(p, what=art.key.replace("_", " "), fix=f"re-create it with `{self.command_for(art)}`")
        try:
            return read_safetensors(p)
        except Exception as exc:  # safetensors raises its own error types for a corrupt file
            raise RunError(f"{p} is not a readable safetensors file ({exc}); re-create it with `{self.command_for(art)}`") from exc

    def read_optional(self, art: Artifact | str) -> Any | None:
        """`read`, or ``None`` when the artifact is absent. A file that is there but unreadable
        still raises: only a missing file means "not made yet"."""
        return self.read(art) if self.has(art) else None

    def write(self, art: Artifact | str, obj: Any) -> Path:
        """Write an artifact atomically: a DataFrame for Parquet, a JSON-able object for JSON,
        ``tensors`` or ``(tensors, metadata)`` for safetensors."""
        art = _resolve(art)
        p = self.path / art
        if art.format in ("parquet", "csv"):
            missing = [c for c in art.columns if c not in obj.columns]
            if missing:
                raise ValueError(f"{art.filename} needs column(s) {missing}")
            if art.format == "parquet":
                write_parquet(p, obj)
            else:
                with atomic_path(p) as tmp:
                    obj.to_csv(tmp, index=False)
        elif art.format == "json":
            write_json(p, obj)
        else:
            tensors, meta = obj if isinstance(obj, tuple) else (obj, None)
            write_safetensors(p, tensors, meta)
        return p

    # the named readers every stage uses
    def head_stats(self) -> pd.DataFrame:
        """The long-format statistics table (`HEAD_STATS_COLUMNS`)."""
        return self.read(HEAD_STATS)

    def block_maps(self) -> BlockMaps:
        return BlockMaps.load(self.require(BLOCK_MAPS), fix=f"re-create it with `{self.command_for(BLOCK_MAPS)}`")

    def detections(self) -> pd.DataFrame:
        return self.read(DETECTIONS)

    # -- stages -------------------------------------------------------------------------
    def locked(self):
        """A context that holds this run's lock: wrap every read-merge-write of a run file in
        it, so two processes adding to one run never lose each other's rows."""
        return file_lock(self.path)

    def record_stage(self, stage: str, *, parameters: dict[str, Any] | None = None, summary: dict[str, Any] | None = None) -> None:
        """Record in the manifest that ``stage`` ran (``stages[stage]``: parameters, summary, time).
        Given fields replace the stage's old ones; others are kept."""
        with self.locked():
            self.record_stage_locked(stage, parameters=parameters, summary=summary)

    def record_stage_locked(self, stage: str, *, parameters: dict[str, Any] | None = None,
                            summary: dict[str, Any] | None = None) -> None:
        """`record_stage` for a caller that already holds the run's lock (`locked`): the lock
        is per open file, so taking it again in the same process would wait for itself."""
        self._reload_manifest()
        stages = dict(self.manifest.get("stages", {}))
        entry = dict(stages.get(stage, {}))
        if parameters is not None:
            entry["parameters"] = parameters
        if summary is not None:
            entry["summary"] = summary
        entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        stages[stage] = entry
        self.manifest["stages"] = stages
        write_json(self.path / MANIFEST, self.manifest)

    def update_manifest(self, **fields: Any) -> None:
        """Set top-level manifest fields (under the run's lock, over the manifest on disk)."""
        with self.locked():
            self._reload_manifest()
            self.manifest.update(fields)
            write_json(self.path / MANIFEST, self.manifest)

    def _reload_manifest(self) -> None:
        on_disk = load_json(self.path / MANIFEST, what="manifest", fix="re-create the run with --force")
        if isinstance(on_disk, dict):
            self.manifest = on_disk


def _resolve(art: Artifact | str) -> Artifact:
    """An `Artifact` from itself, its key or its file name."""
    if isinstance(art, Artifact):
        return art
    if art in ARTIFACTS:
        return ARTIFACTS[art]
    for a in ARTIFACTS.values():
        if a.filename == art:
            return a
    raise RunError(f"unknown run artifact {art!r}: known are {', '.join(ARTIFACTS)}")


def _read_parquet(path: Path, fix: str = "re-create it") -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RunError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}); {fix}") from exc


def _read_csv(path: Path, fix: str = "re-create it") -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for a broken file
        raise RunError(f"{path} is not a readable CSV table ({type(exc).__name__}: {exc}); {fix}") from exc


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run that will end up at ``out`` is built: ``<parent>/.<name>.partial``."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_writable_target(out: str | os.PathLike, *, force: bool) -> Path:
    """Refuse an existing ``out`` without ``force`` and an unwritable parent, before any work.

    For a whole run folder: with ``force`` only a run or an empty folder may be replaced.
    Returns ``out`` as a Path. Creates nothing."""
    if not str(out).strip() or Path(out).name in ("", ".", ".."):
        raise RunError(f"--out {str(out)!r} names no new folder: give a run folder such as runs/r1")
    out = Path(out)
    if out.exists() and not force:
        raise RunError(_ERR_EXISTS.format(path=out))
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory: remove it or choose another --out")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        # --force replaces a run, never an arbitrary folder with the user's files in it
        raise RunError(f"{out} exists and is not an attnlab run (no {MANIFEST.filename}): --force only replaces runs; choose another --out")
    _check_parent_writable(out, RunError)
    return out


def check_output_files(paths: list[str | os.PathLike] | tuple, *, force: bool, error: type[Exception] = RunError) -> list[Path]:
    """The pre-flight for output files outside a run (a policy JSON, exported masks): each must
    be a file path (not a folder), absent unless ``force``, in a folder that can be created and
    written. Raises ``error`` (the caller's stage type) naming the path; creates nothing."""
    out = []
    for p in map(Path, paths):
        if not str(p).strip() or p.name in ("", ".", ".."):  # `.`, `x/..`: a folder by name, even where x is absent
            raise error(f"--out {str(p)!r} names a folder, not a file: give a file path for --out")
        if p.is_dir():
            raise error(f"{p} is a folder: give a file path for --out")
        if p.exists() and not force:
            raise error(_ERR_EXISTS.format(path=p))
        _check_parent_writable(p, error)
        out.append(p)
    return out


def _check_parent_writable(path: Path, error: type[Exception]) -> None:
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise error(_ERR_UNWRITABLE.format(path=path, reason=f"{probe} is not a directory"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(_ERR_UNWRITABLE.format(path=path, reason=f"{probe} is not writable"))


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


def new_manifest(kind: str, model: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """A manifest for a new run, ``status`` ``"running"`` until the stage finishes."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "status": "running",
        "model": dict(model),
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


def preflight_run(out: str | os.PathLike, model: Any) -> Path:
    """Fail before any work when ``out`` cannot take this model's results: an existing run that
    is incomplete or of another model, or a folder that cannot be written. Creates nothing.

    ``model`` is a `LoadedModel` or a `ModelIdentity`. This is the check `ensure_run` makes
    again after the work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(_ERR_OUT_IS_FILE.format(path=out))
    if out.exists():
        Run.open(out).check_model(model)
    else:
        check_writable_target(out, force=False)
    return out


def ensure_run(out: str | os.PathLike, model: Any, kind: str, parameters: dict[str, Any], *, record: bool = True) -> Run:
    """The run directory a stage adds its results to: an existing run of the same model, or a
    new one (created atomically with a complete manifest; never over a run another process
    created meanwhile, which is opened instead).

    ``model`` is a `LoadedModel`, a `ModelIdentity` or an identity dict. Call it after the
    stage's work is done and before writing its files, so that a failed stage leaves nothing
    behind. A stage's parameters are recorded under ``manifest["stages"][kind]``; with
    ``record=False`` the caller records them itself (e.g. merged with what another process
    recorded, under the run's lock).
    """
    out = Path(out)
    identity = model.identity() if callable(getattr(model, "identity", None)) else ModelIdentity.from_dict(model)
    if out.exists() and not out.is_dir():
        raise RunError(_ERR_OUT_IS_FILE.format(path=out))
    if not out.exists():
        check_writable_target(out, force=False)
        partial = partial_dir(out).with_name(f"{partial_dir(out).name}-{os.getpid()}")  # one per process
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        manifest = new_manifest(kind, identity, parameters)
        manifest["status"] = "complete"
        write_json(partial / MANIFEST, manifest)
        try:
            os.rename(partial, out)  # fails when another process made ``out`` since the check
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if not out.is_dir():
                raise
    run = Run.open(out)
    run.check_model(identity)
    if record:
        run.record_stage(kind, parameters=parameters)
    return run
