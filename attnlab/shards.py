"""Shards and merge: split a long job over processes or machines, then join the parts.

A sharded stage (``--shard I/N``) does the units ``j`` of its deterministic work list with
``j % N == I`` (round-robin, so long and short units spread evenly) and writes a complete,
ordinary run that records which shard it is (``manifest["shard"]``: index, count, the stage,
its parameters, the names of the units it did, and its wall seconds). ``attnlab merge SHARD... --out RUN`` checks
that the shards belong together — one model (the identity check), one stage with the same
parameters, the same shard count, every index once (a missing or duplicated shard is named) —
and writes the run a single process would have written. Any launcher works: a shell loop, a
SLURM array, Ray. ``merge --partial`` joins some of an eval job's shards (`PARTIAL_STAGES`) into
a run that records which are missing (`partial_record`), to report a long job before it ends.

Which stages merge, and how, is declared here (`MERGERS`): a merger reads the shards' files and
writes the merged run's. The merged manifest keeps every shard's wall seconds and unit count
(``stages[stage]["shards"]``), from which `predict_wall` predicts the wall time of a job on more
workers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from attnlab.cliargs import layers_text, positive_int
from attnlab.errors import AttnlabError

if TYPE_CHECKING:  # the run store pulls in torch; the CLI's parser must not
    from attnlab.runs import Run

T = TypeVar("T")

_ERR_SPEC = "--shard takes I/N with 0 <= I < N (e.g. 0/4 for the first of four shards), got {text!r}"


class ShardError(AttnlabError):
    """Shards that can't be made or merged as asked."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ShardError(_ERR_SPEC.format(text=text)) from None
        if not (n >= 1 and 0 <= i < n):
            raise ShardError(_ERR_SPEC.format(text=text))
        return cls(i, n)

    def take(self, units: Sequence[T]) -> list[T]:
        """This shard's share of ``units``: every ``count``-th, from ``index``."""
        return list(units[self.index :: self.count])

    def record(self, stage: str, parameters: dict[str, Any], units: Sequence[str], total: int, *,
               seconds: float | None = None, unit_seconds: Sequence[float] | None = None) -> dict[str, Any]:
        """What a shard run's manifest says about the shard (``manifest["shard"]``): which job and
        units, and how long it took — ``seconds`` the shard's wall time (model load excluded),
        ``unit_seconds`` each unit's, in the order of ``units``, when the stage times them."""
        rec: dict[str, Any] = {"index": self.index, "count": self.count, "stage": stage, "parameters": parameters,
                               "units": list(units), "total": int(total), "n_units": len(units)}
        if seconds is not None:
            rec["seconds"] = float(seconds)
        if unit_seconds is not None:
            if len(unit_seconds) != len(units):
                raise ValueError(f"{len(unit_seconds)} unit times for {len(units)} units")
            rec["unit_seconds"] = [float(t) for t in unit_seconds]
        return rec

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_type(text: str) -> Shard:
    """argparse type of ``--shard I/N``."""
    try:
        return Shard.parse(text)
    except ShardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=shard_type, metavar="I/N",
                        help="do shard I of N of the work (round-robin over its units: samples, or heads for circuit) into its own run; "
                             "join the N runs with `attnlab merge`")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run the shards as Ray tasks and merge them: on a local cluster started here, or on "
                             "the cluster at ADDRESS (needs pip install 'attnlab[ray]')")
    parser.add_argument("--workers", type=positive_int, default=2, help="shards (Ray tasks) with --ray (default 2)")


def check_share(shard: Shard | None, units: Sequence[T], what: str = "sample") -> list[T]:
    """``shard``'s share of ``units`` (all of them without a shard); a shard that would get
    nothing is refused with the largest usable shard count."""
    if shard is None:
        return list(units)
    share = shard.take(units)
    if not share:
        raise ShardError(f"--shard {shard} gets no {what} of {len(units)}: use at most {len(units)} shards")
    return share


class Stopwatch:
    """Wall seconds of a shard's work: ``with Stopwatch() as clock: ...; clock.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def mark_shard(run: Run, record: dict[str, Any]) -> None:
    """Write the shard record into a finished shard run's manifest (under its lock)."""
    from attnlab.runs import MANIFEST, write_json

    with run.locked():
        run._reload_manifest()
        run.manifest["shard"] = record
        write_json(run.path / MANIFEST, run.manifest)


# ---------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------
#: stage → ``"module:function"`` that merges it: ``function(shard runs in index order, the merged
#: run being written)``. Named, not imported: the stages live above this core module.
MERGERS: dict[str, str] = {
    "circuit": "attnlab.circuits.circuit:merge_circuit_shards",
    "eval": "attnlab.sparsity_stats.evaluate:merge_eval_shards",
    "probe:retrieval": "attnlab.probes.retrieval:merge_retrieval_shards",
    "profile": "attnlab.profile:merge_profile_shards",
    "validate": "attnlab.sparsity_stats.validation:merge_validation_shards",
}


def _merger(stage: str) -> Callable[[list[Run], Run], None]:
    module, _, name = MERGERS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def shard_units(run: Run) -> tuple[int, int, list[str]]:
    """``(index, count, unit names)`` of a shard run, in the order it did them."""
    rec = _record(run)
    return int(rec["index"]), int(rec["count"]), [str(u) for u in rec.get("units", [])]


def full_order(shards: Sequence[Run]) -> dict[str, int]:
    """Each unit's place in the single-process work list (shard I did units I, I+N, I+2N, ...)."""
    position = {}
    for run in shards:
        index, count, units = shard_units(run)
        for j, name in enumerate(units):
            position[name] = j * count + index
    return position


def _record(run: Run) -> dict[str, Any]:
    rec = run.manifest.get("shard")
    if not isinstance(rec, dict) or not {"index", "count", "stage", "parameters"} <= set(rec):
        raise ShardError(f"{run.path} is not a shard (its manifest has no shard record): pass runs made with --shard I/N")
    return rec


def _differ_in_digests_only(a: Any, b: Any) -> bool:
    """Two eval shards' parameters that differ only in that one records ``digests`` (from
    `attnlab eval` since it keeps answers by method digest) and the other does not."""
    if not (isinstance(a, dict) and isinstance(b, dict)) or ("digests" in a) == ("digests" in b):
        return False
    return {k: v for k, v in a.items() if k != "digests"} == {k: v for k, v in b.items() if k != "digests"}


#: Stages whose shards may be merged before the job is done (``merge --partial``): their units
#: are samples, each answered on its own, so a subset is a smaller sample of the same job, not a
#: wrong one. (A profile, circuit or validation merged from some shards would under-count.)
PARTIAL_STAGES = ("eval",)


def check_shards(runs: Sequence[Run], *, partial: bool = False) -> tuple[str, dict[str, Any], list[Run]]:
    """``(stage, parameters, runs in index order)`` when ``runs`` are the complete set of shards
    of one job (with ``partial``, of an `PARTIAL_STAGES` job: any of its shards, once each);
    otherwise a `ShardError` naming what is wrong."""
    if not runs:
        raise ShardError("merge needs the shard runs: attnlab merge SHARD... --out RUN")
    first = _record(runs[0])
    identity = runs[0].identity
    by_index: dict[int, Run] = {}
    for run in runs:
        rec = _record(run)
        identity.check(run.identity, subject=f"shard {run.path}", fix="merge only shards of one model")
        for key in ("stage", "count", "parameters"):
            if key == "parameters" and _differ_in_digests_only(rec[key], first[key]):
                old, new = (run, runs[0]) if "digests" not in rec[key] else (runs[0], run)
                raise ShardError(f"{old.path} was answered by an attnlab that recorded no method digests, {new.path} "
                                 "by one that does, so their answers cannot be shown to come from the same policies: "
                                 "run the older shards again (into empty folders), then merge")
            if rec[key] != first[key]:
                raise ShardError(f"{run.path} is a shard of another job than {runs[0].path}: its {key} differs "
                                 f"({rec[key]!r} vs {first[key]!r}); merge only the shards of one job")
        i = int(rec["index"])
        if i in by_index:
            raise ShardError(f"shard {i}/{first['count']} is given twice ({by_index[i].path} and {run.path}): pass each once")
        by_index[i] = run
    stage = str(first["stage"])
    count = int(first["count"])
    missing = [i for i in range(count) if i not in by_index]
    if partial and stage not in PARTIAL_STAGES:
        raise ShardError(f"--partial merges the shards of {', '.join(PARTIAL_STAGES)} only, not of {stage} (merged "
                         f"from some shards it would under-count): run every shard (--shard I/{count}), then merge "
                         "without --partial")
    if missing and not partial:
        names = ", ".join(f"{i}/{count}" for i in missing)
        more = " (or pass --partial to report the shards done so far)" if stage in PARTIAL_STAGES else ""
        raise ShardError(f"shard(s) {names} missing: run them (--shard I/{count}) and pass every shard to merge{more}")
    if stage not in MERGERS:
        raise ShardError(f"stage {stage!r} has no merge; mergeable stages: {', '.join(sorted(MERGERS))}")
    return stage, dict(first["parameters"]), [by_index[i] for i in sorted(by_index)]


def partial_record(run: Run) -> dict[str, Any] | None:
    """What a run merged with ``--partial`` from some of its job's shards recorded: ``{"shards":
    [indices merged], "count": N, "missing": [indices]}``, or None for a whole job (or no merge)."""
    for stage in (run.manifest.get("stages") or {}).values():
        if isinstance(stage, dict) and isinstance(stage.get("partial"), dict):
            return stage["partial"]
    return None


def describe_partial(record: dict[str, Any]) -> str:
    """One line for reports: which shards a partial merge holds."""
    done, count = len(record["shards"]), int(record["count"])
    return (f"partial job: {done} of its {count} shards merged (missing {layers_text(record['missing'])}); "
            "the figures are of the samples answered so far")


def shard_timing(shards: Sequence[Run]) -> list[dict[str, Any]]:
    """Each shard's index, unit count and wall seconds (None when the shard did not record them),
    in index order: what the merged manifest keeps under ``stages[stage]["shards"]``."""
    rows = []
    for run in shards:
        rec = _record(run)
        rows.append({"index": int(rec["index"]), "units": int(rec.get("n_units", len(rec.get("units", [])))),
                     "seconds": rec.get("seconds")})
    return rows


def unit_seconds(shards: Sequence[Run]) -> list[float]:
    """Per-unit wall seconds in the single-process work order: each unit's own time where its
    shard recorded it, else its shard's seconds shared evenly over the shard's units."""
    times: dict[int, float] = {}
    for run in shards:
        rec = _record(run)
        index, count, units = shard_units(run)
        own = rec.get("unit_seconds")
        if own is None:
            if rec.get("seconds") is None:
                raise ShardError(f"shard {run.path} recorded no time: re-run it with this attnlab")
            own = [float(rec["seconds"]) / max(len(units), 1)] * len(units)
        for j, t in enumerate(own):
            times[j * count + index] = float(t)
    return [times[k] for k in sorted(times)]


def predict_wall(unit_times: Sequence[float], workers: int, *, startup: float = 0.0) -> float:
    """Predicted wall seconds of a job on ``workers`` workers, from its units' times.

    The model is the one `Shard.take` implements: unit ``j`` (in the single-process work order)
    goes to worker ``j % workers`` (round-robin), every worker runs its units one after the
    other, and the job ends when its slowest worker does, after a fixed ``startup`` (e.g. Ray's
    start-up, `run_sharded`'s ``ray_startup_s``, plus a model load):
    ``wall = startup + max over w of sum(unit_times[w::workers])``. Communication and the merge
    are not modelled (the merge reads small files). With more workers than units the extra
    workers idle.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if any(t < 0 for t in unit_times):
        raise ValueError("unit times must be >= 0")
    loads = [sum(unit_times[w::workers]) for w in range(min(workers, len(unit_times)))]
    return float(startup) + (max(loads) if loads else 0.0)


def merge_shards(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, force: bool = False,
                 engine: dict[str, Any] | None = None, partial: bool = False) -> Run:
    """Merge shard runs into ``out`` (the run a single process would have written).

    The merged manifest's ``stages[stage]`` keeps the shards it came from, each shard's wall
    seconds and units (``shards``, ``shard_seconds``) and ``engine``'s fields (e.g. Ray's
    ``ray_startup_s``). With ``partial`` (eval only), some of a job's shards merge into a run of
    the samples answered so far; ``stages[stage]["partial"]`` then names the shards merged and
    missing (`partial_record`), and the reports say so. Merge the whole job again when it is done."""
    from attnlab.runs import (
        MANIFEST,
        Run,
        check_writable_target,
        finalize_partial,
        new_manifest,
        partial_dir,
        write_json,
    )

    runs = [Run.open(p) for p in paths]
    stage, parameters, ordered = check_shards(runs, partial=partial)
    out = check_writable_target(out, force=force)
    staging = partial_dir(out)  # the run is written here, then moved into place
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        manifest = new_manifest(stage, ordered[0].identity, parameters)
        timing = shard_timing(ordered)
        manifest["stages"] = {stage: {"parameters": parameters, "merged_from": [str(r.path) for r in ordered],
                                      "shards": timing, "shard_seconds": [t["seconds"] for t in timing],
                                      **(engine or {})}}
        count = int(_record(ordered[0])["count"])
        merged = [int(_record(r)["index"]) for r in ordered]
        if len(merged) < count:
            manifest["stages"][stage]["partial"] = {"shards": merged, "count": count,
                                                    "missing": [i for i in range(count) if i not in merged]}
        manifest["status"] = "complete"
        write_json(staging / MANIFEST, manifest)
        _merger(stage)(ordered, Run(staging, manifest))
        finalize_partial(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Run.open(out)
