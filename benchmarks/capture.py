"""Capture cost on the embedded model: time and peak memory of each path against the plain forward.

For each length, each measurement runs in a fresh subprocess (so peak memory is its own):
the plain bridge forward (eager attention, no hooks — the baseline), the pattern path
(``hook_pattern``) and the q/k path (post-RoPE q/k, SDPA for the output). Peak memory is the
growth of the process's peak RSS over its RSS just before the measured call (Linux
``/proc/self/clear_refs`` resets the peak), so model weights are not counted.

    python benchmarks/capture.py                     # 512, 2048, 8192 tokens
    python benchmarks/capture.py --lengths 512 --repeats 1 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time, torch
from attnlab.models import load_model
from attnlab.capture import capture
from attnlab.prompts import builtin_prompts
from attnlab.stats import StatConfig
mode, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_grad_enabled(False)
model = load_model("smollm2-135m", verbose=False)
ids = builtin_prompts(model.tokenizer, [n], 1, seed=1)[0].input_ids
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
def run():
    if mode == "forward":
        model.bridge(ids)
    else:
        capture(model, ids, StatConfig(), path=mode)
times = []
for r in range(repeats):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS:")
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    peak = rss("VmHWM:") - base
print(json.dumps({"mode": mode, "n": n, "seconds": min(times), "peak_bytes": peak}))
"""


def measure(mode: str, n: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), str(repeats)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} at {n} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--repeats", type=int, default=2, help="best of N per measurement (default 2)")
    parser.add_argument("--append", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    rows = []
    for n in lengths:
        res = {mode: measure(mode, n, args.repeats if n <= 2048 else 1) for mode in ("forward", "pattern", "qk")}
        base = res["forward"]
        row = {
            "n": n,
            "forward_s": base["seconds"],
            "pattern_s": res["pattern"]["seconds"],
            "qk_s": res["qk"]["seconds"],
            "pattern_x": res["pattern"]["seconds"] / base["seconds"],
            "qk_x": res["qk"]["seconds"] / base["seconds"],
            "qk_vs_pattern_time": res["qk"]["seconds"] / res["pattern"]["seconds"],
            "forward_mib": base["peak_bytes"] / 2**20,
            "pattern_mib": res["pattern"]["peak_bytes"] / 2**20,
            "qk_mib": res["qk"]["peak_bytes"] / 2**20,
            "qk_vs_pattern_mem": res["qk"]["peak_bytes"] / max(res["pattern"]["peak_bytes"], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = (
        f"### capture — {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
        f"`python benchmarks/capture.py --lengths {args.lengths} --repeats {args.repeats}`\n\n"
        "Baseline: the plain bridge forward (eager attention, no hooks) of the same prompt in the same run.\n\n"
        "| tokens | forward s | pattern s (× fwd) | q/k s (× fwd) | q/k ÷ pattern time | forward peak MiB | pattern peak MiB | q/k peak MiB | q/k ÷ pattern memory |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['n']} | {r['forward_s']:.2f} | {r['pattern_s']:.2f} ({r['pattern_x']:.2f}×) | {r['qk_s']:.2f} ({r['qk_x']:.2f}×) | "
        f"{r['qk_vs_pattern_time']:.2f} | {r['forward_mib']:.0f} | {r['pattern_mib']:.0f} | {r['qk_mib']:.0f} | {r['qk_vs_pattern_mem']:.2f} |\n"
        for r in rows
    )
    print(header + body)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + header + body)


if __name__ == "__main__":
    main()
