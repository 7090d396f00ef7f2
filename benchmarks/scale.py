"""Overhead of sharding on Ray: the same profile in one process and on a local Ray cluster, on
the embedded model, with Ray's start-up and each shard's time reported apart, and the wall time
of larger clusters predicted from the shards' times.

- baseline: ``attnlab profile`` in one process (torch's default threads: both cores), wall time
  of the whole command (model load included);
- ``--ray --workers 2``: a local Ray cluster started by the command, 2 single-threaded tasks
  (each loads the model), merged; wall time of the whole command; the merged manifest gives
  Ray's start-up (``ray_startup_s``) and every shard's own seconds (``shards``);
- the runs alternate (one process, Ray, one process, Ray, ...) so that a change of the shared
  machine's load hits both alike, and the merged statistics are checked equal to the baseline's
  (1e-6);
- prediction for N workers (`attnlab.shards.predict_wall`): Ray start-up + the slowest worker's
  share of the per-sample times (round-robin, each shard's seconds spread over its samples) +
  the fixed cost measured here (each worker's model load and the merge: the Ray wall time minus
  start-up minus the slowest shard).

    python benchmarks/scale.py --samples 16 --length 512 --repeats 2 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "attnlab.cli", *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"attnlab {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--predict", default="8,64", help="worker counts to predict the wall time of")
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()
    import pandas as pd

    from attnlab.runs import HEAD_STATS, Run
    from attnlab.shards import predict_wall

    singles, rays, details = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        common = ["profile", "--model", "smollm2-135m", "--samples", str(args.samples), "--lengths", str(args.length),
                  "--path", "qk", "--quiet"]
        for k in range(args.repeats):
            singles.append(timed([*common, "--out", f"{tmp}/single{k}"]))
            rays.append(timed([*common, "--ray", "--workers", str(args.workers), "--out", f"{tmp}/ray{k}"]))
            merged = Run.open(f"{tmp}/ray{k}")
            a, b = Run.open(f"{tmp}/single{k}").read(HEAD_STATS), merged.read(HEAD_STATS)
            pd.testing.assert_frame_equal(a, b, atol=1e-6)
            stage = merged.manifest["stages"]["profile"]
            details.append(stage)
            print(f"repeat {k}: one process {singles[-1]:.1f} s, Ray {rays[-1]:.1f} s "
                  f"(start-up {stage['ray_startup_s']:.1f} s, shards {[round(s['seconds'], 1) for s in stage['shards']]})",
                  flush=True)
    # per-sample seconds in the single-process work order, from the last Ray run's shards
    last = details[-1]
    unit_times: list[float] = [0.0] * args.samples
    for shard in last["shards"]:
        for j in range(shard["units"]):
            unit_times[j * args.workers + shard["index"]] = shard["seconds"] / shard["units"]
    startup = last["ray_startup_s"]
    fixed = rays[-1] - startup - max(s["seconds"] for s in last["shards"])
    check = predict_wall(unit_times, args.workers, startup=startup) + fixed
    predictions = {int(n): predict_wall(unit_times, int(n), startup=startup) + fixed for n in args.predict.split(",")}
    ratio = statistics.median(r / s for r, s in zip(rays, singles, strict=True))
    rows = [f"| {k} | {s:.1f} | {r:.1f} | {r / s:.2f} | {d['ray_startup_s']:.1f} | "
            f"{', '.join(format(x['seconds'], '.1f') for x in d['shards'])} |"
            for k, (s, r, d) in enumerate(zip(singles, rays, details, strict=True))]
    lines = [
        "## Scale-out: one process vs a local Ray cluster (`benchmarks/scale.py`)",
        "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} cores (shared), date "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `python benchmarks/scale.py --samples {args.samples} --length {args.length} --workers {args.workers} "
        f"--repeats {args.repeats}`",
        f"- job: `attnlab profile --model smollm2-135m --path qk`, {args.samples} samples of {args.length} tokens; wall "
        "time of the whole command (model loading and Ray's start-up included); one process and Ray alternate; the "
        "merged statistics equal the single process's (checked every repeat)",
        "",
        f"| repeat | one process s (baseline) | Ray, {args.workers} single-threaded workers s | Ray ÷ one process | "
        "Ray start-up s | shards' own s |",
        "|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Median Ray ÷ one process: **{ratio:.2f}×** (target ≤ 1.15×). Of the last Ray run's {rays[-1]:.1f} s, "
        f"{startup:.1f} s were Ray's start-up, the slowest shard took {max(s['seconds'] for s in last['shards']):.1f} s, "
        f"and {fixed:.1f} s went to each worker's model load and the merge.",
        "",
        f"Predicted wall time from the shards' per-sample times (`shards.predict_wall`: start-up + slowest worker's "
        f"round-robin share + the {fixed:.1f} s fixed cost), for single-threaded workers like these: "
        f"{args.workers} workers {check:.1f} s (measured {rays[-1]:.1f} s); "
        + "; ".join(f"{n} workers {t:.1f} s" for n, t in predictions.items())
        + f" (with more workers than the {args.samples} samples, the slowest single sample bounds it).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
