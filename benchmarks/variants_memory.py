"""Peak memory of the two capture paths on a Gemma-3-like model with sliding-window layers.

A random-weight Gemma 3 text model built from a config (no download): 6 layers alternating 5
local (sliding window 512) : 1 global, 4 query heads over 1 KV head of 64 dims, hidden 256, the
context limit lifted to 32k. Each measurement runs in its own subprocess: the plain forward
(the baseline), the pattern path (``hook_pattern``: a full ``[heads, n, n]`` map per layer) and
the q/k path (post-RoPE q/k, statistics in row chunks, the window honoured). Peak memory is the
growth of the peak RSS over the RSS before the call (``/proc/self/clear_refs``), so weights are
not counted.

    python benchmarks/variants_memory.py --lengths 4096 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

MODEL = r"""
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache, wrap_hf_model
tok = AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))
cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=512,
                       sliding_window_pattern=6, max_position_embeddings=32768, query_pre_attn_scalar=64)
cfg.architectures = ["Gemma3ForCausalLM"]
cfg._attn_implementation = "eager"
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
model = wrap_hf_model(hf, tok, name="gemma3-like", source="config", label="gemma3-like")
"""

#: The measuring child: ``sys.argv[1:3]`` are the mode (forward / pattern / qk) and the length; the
#: model code (``MODEL`` above, or another script's) defines ``model`` and may read ``sys.argv[3:]``.
CHILD = r"""
import json, sys, time, torch
from attnlab.capture import capture
from attnlab.stats import StatConfig
mode, n = sys.argv[1], int(sys.argv[2])
torch.set_grad_enabled(False)
{model}
ids = torch.randint(100, 30000, (1, n), generator=torch.Generator().manual_seed(1))
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
t = time.perf_counter()
if mode == "forward":
    model.hf_model.base_model(ids, use_cache=False) if "{base_only}" == "yes" else model.bridge(ids)
else:
    capture(model, ids, StatConfig(block_size=64), path=mode)
seconds = time.perf_counter() - t
print(json.dumps({{"mode": mode, "n": n, "seconds": seconds, "peak_bytes": rss("VmHWM:") - base,
                  "windows": [int(w) for w in model.identity().to_dict().get("attention", {{}}).get("layer_windows", [])]}}))
"""


def measure_child(model_code: str, mode: str, n: int, *extra: str, base_only: bool = False) -> dict:
    """One measurement in a fresh interpreter: ``{mode, n, seconds, peak_bytes, windows}``."""
    code = CHILD.format(model=model_code, base_only="yes" if base_only else "no")
    out = subprocess.run([sys.executable, "-c", code, mode, str(n), *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} at {n} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(mode: str, n: int) -> dict:
    return measure_child(MODEL, mode, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--append")
    args = parser.parse_args()
    rows = []
    windows = None
    for n in (int(v) for v in args.lengths.split(",")):
        res = {m: measure(m, n) for m in ("forward", "pattern", "qk")}
        windows = res["qk"]["windows"]
        mib = {m: r["peak_bytes"] / 2**20 for m, r in res.items()}
        rows.append(f"| {n} | {res['forward']['seconds']:.2f} | {res['pattern']['seconds']:.2f} | {res['qk']['seconds']:.2f} | "
                    f"{mib['forward']:.0f} | {mib['pattern']:.0f} | {mib['qk']:.0f} | {mib['qk'] / max(mib['pattern'], 1e-9):.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "## Sliding-window layers: capture memory (`benchmarks/variants_memory.py`)",
        "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} cores (shared), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `python benchmarks/variants_memory.py --lengths {args.lengths}`",
        "- model: random Gemma-3-like text model (6 layers: 5 local with window 512 : 1 global; 4 query heads, "
        f"1 KV head, head_dim 64, hidden 256); layer windows as attnlab read them: {windows}",
        "- baseline: the plain forward of the same model and input in the same run; target: q/k peak memory "
        "≤ 25% of the pattern path's at 4k tokens",
        "",
        "| tokens | forward s | pattern s | q/k s | forward peak MiB | pattern peak MiB | q/k peak MiB | q/k ÷ pattern memory |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
