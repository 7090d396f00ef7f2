"""Overhead of sharding and of Ray: the same profile in one process, as shards merged, and on a
local Ray cluster, on the embedded model (wall time of the whole command, model loading included).

- baseline: ``attnlab profile`` in one process (torch's default threads: both cores);
- ``--ray --workers 2``: a local Ray cluster started by the command, 2 single-threaded tasks,
  merged (includes Ray's start-up);
- the merged run is checked equal to the baseline's (statistics to 1e-6).

    python benchmarks/scale.py --samples 16 --length 512 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
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
    parser.add_argument("--append", type=Path)
    args = parser.parse_args()
    import pandas as pd

    from attnlab.runs import HEAD_STATS, Run

    with tempfile.TemporaryDirectory() as tmp:
        common = ["profile", "--model", "smollm2-135m", "--samples", str(args.samples), "--lengths", str(args.length),
                  "--path", "qk", "--quiet"]
        single = timed([*common, "--out", f"{tmp}/single"])
        ray = timed([*common, "--ray", "--workers", str(args.workers), "--out", f"{tmp}/ray"])
        a, b = Run.open(f"{tmp}/single").read(HEAD_STATS), Run.open(f"{tmp}/ray").read(HEAD_STATS)
        pd.testing.assert_frame_equal(a, b, atol=1e-6)
    lines = [
        "## Scale-out: one process vs a local Ray cluster (`benchmarks/scale.py`)",
        "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} cores (shared), date "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `python benchmarks/scale.py --samples {args.samples} --length {args.length} --workers {args.workers}`",
        f"- job: `attnlab profile --model smollm2-135m --path qk`, {args.samples} samples of {args.length} tokens; "
        "wall time of the whole command (model loading and Ray's start-up included); the merged statistics "
        "equal the single process's (checked)",
        "",
        "| run | seconds | vs one process |",
        "|---|---:|---:|",
        f"| one process (baseline) | {single:.1f} | 1.00 |",
        f"| Ray, {args.workers} single-threaded workers, merged | {ray:.1f} | {ray / single:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with args.append.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
