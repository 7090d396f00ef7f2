"""Ray as the built-in engine for sharded jobs (``--ray`` / ``--ray ADDRESS``).

`run_sharded` starts (or joins) a Ray cluster, runs shard ``I`` of ``N`` of a command as one Ray
task per shard — each task loads the model once and runs the ordinary ``--shard I/N`` command
(one GPU per task when the cluster has GPUs) — retries a failed shard, shows one progress bar
over the whole job, and merges the shards into the run one process would have written
(`attnlab.shards.merge_shards`). The merged manifest records Ray's start-up seconds apart from
the shards' own (``stages[stage]["ray_startup_s"]``; each shard's wall seconds are under
``shards``), so `attnlab.shards.predict_wall` can predict larger clusters. The shards live in a hidden folder beside the output and are
removed after the merge. Ray is an optional extra: ``pip install 'attnlab[ray]'``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence

from attnlab.errors import AttnlabError
from attnlab.runs import MANIFEST, Run, check_writable_target
from attnlab.shards import merge_shards

LOCAL = "local"
_ERR_NO_RAY = "--ray needs Ray, which is not installed: pip install 'attnlab[ray]' (or pip install ray)"


class RayError(AttnlabError):
    """A sharded job on Ray that could not run or finish."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayError(_ERR_NO_RAY) from None
    return ray


def _run_shard(argv: list[str], threads: int) -> int:
    """One shard in a Ray worker: the ordinary command, single-threaded torch by default."""
    import torch

    from attnlab.cli import main

    if threads > 0:
        torch.set_num_threads(threads)
    return main(argv)


def run_sharded(argv: Sequence[str], out: str | os.PathLike, *, shards: int, address: str | None = LOCAL,
                retries: int = 2, threads: int = 1, force: bool = False, progress: bool = True) -> Run:
    """Run ``attnlab ARGV --shard I/N --out SHARD_I`` for every ``I`` as Ray tasks, then merge.

    ``argv``: the command without ``--shard``/``--out`` (e.g. ``["eval", "--model", ...]``).
    ``address``: ``"local"`` starts a cluster on this machine; otherwise a Ray address
    (``ray://host:10001`` or ``host:6379``). ``threads``: torch threads per task (0 keeps
    torch's default). A shard that fails is retried ``retries`` times; if it still fails, the
    job stops with its error and the shards done so far are kept for inspection.
    """
    if shards < 1:
        raise RayError(f"--workers must be at least 1, got {shards}")
    out = check_writable_target(out, force=force).resolve()  # Ray workers need absolute paths
    ray = _import_ray()
    if address not in (None, LOCAL, "auto") and not ray.is_initialized():
        check_address(address)  # before anything is written: an address that does not answer is one line
    work = out.parent / f".{out.name}.shards"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_here:
        try:
            ray.init(address=None if address in (None, LOCAL) else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False,
                     num_cpus=max(shards, 1) if address in (None, LOCAL) else None)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            shutil.rmtree(work, ignore_errors=True)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayError(f"could not join the Ray cluster at {address}: {reason}; check the address "
                           "(`ray status` on the head node) or drop ADDRESS to start a local cluster") from None
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        startup = time.perf_counter() - t0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries, retry_exceptions=True)(_shard_task)
        paths = [work / f"shard-{i}" for i in range(shards)]
        pending = {task.remote(list(argv), i, shards, str(paths[i]), threads): i for i in range(shards)}
        from tqdm.auto import tqdm

        bar = tqdm(total=shards, desc=f"{argv[0]} on Ray", unit="shard", disable=not progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:
                    reason = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1]
                    raise RayError(f"shard {i}/{shards} failed after {retries} retries: {reason} "
                                   f"(the finished shards are in {work})") from None
                bar.update()
        bar.close()
        # start-up apart from the shards' time (model loads included), so both can be scaled
        run = merge_shards(paths, out, force=force,
                           engine={"engine": "ray", "workers": shards, "ray_startup_s": startup,
                                   "ray_shards_s": time.perf_counter() - t0 - startup})
    finally:
        if started_here:
            ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return run


#: Seconds to wait for a Ray address to accept a connection before giving up with one line.
CONNECT_TIMEOUT_S = 10.0
#: Fault injection for tests: when this environment variable names a file that does not exist
#: yet, the first attempt of shard 0 creates it and kills its own worker process (as an
#: out-of-memory kill would), so that the retry path runs for real.
CRASH_ONCE_ENV = "ATTNLAB_RAY_CRASH_ONCE"


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """`RayError` (one line) unless ``address`` (``host:port`` or ``ray://host:port``) accepts a
    TCP connection within ``timeout`` seconds."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayError(f"--ray {address!r} is not a Ray address: give HOST:PORT (e.g. 10.0.0.5:6379) or "
                       "ray://HOST:10001, or no ADDRESS to start a local cluster")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise RayError(f"the Ray cluster at {address} does not answer ({why} within {timeout:g} s): start it "
                       "(`ray start --head`) or check the address; nothing was written") from None


def _finished_shard(path: str) -> bool:
    """Whether ``path`` holds a shard run that finished (its manifest carries the shard record)."""
    import json

    try:
        with open(os.path.join(path, MANIFEST.filename), encoding="utf-8") as f:
            return isinstance(json.load(f).get("shard"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _shard_task(argv: list[str], index: int, count: int, out: str, threads: int) -> str:
    import contextlib
    import io

    if os.path.isdir(out) and not _finished_shard(out):  # a retry after a worker died mid-shard: start clean
        shutil.rmtree(out, ignore_errors=True)
    crash = os.environ.get(CRASH_ONCE_ENV)
    if crash and index == 0 and not os.path.exists(crash):
        with open(crash, "w") as f:
            f.write("killed once\n")
        os._exit(1)  # the worker process dies: Ray sees a lost worker, not an exception

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = _run_shard([*argv, "--shard", f"{index}/{count}", "--out", out, "--quiet"], threads)
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"attnlab {argv[0]} exited with {code}")
    return out
