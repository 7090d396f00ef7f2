"""Peak memory of q/k capture at long context: 8k, 16k and 32k tokens on a SmolLM2-shaped model.

A random-weight Llama model with SmolLM2-135M's layer shape (hidden 576, 9 query heads over 3 KV
heads of 64 dims, MLP 1536, its tokenizer's vocabulary) and the context limit lifted to the
longest length measured. Random weights are enough: memory does not depend on their values.
Each measurement runs in its own subprocess (`variants_memory.measure_child`): peak memory is
the growth of the peak RSS over the RSS before the call, so weights are not counted.

The q/k path keeps, per layer, O(n) running sums and the block maps (``heads × (n/block)²``,
quadratic but 1/block² of a pattern); its transient memory is one row chunk of scores
(``heads × query_chunk × n``). So the peak should grow about linearly, a little faster where
the block maps weigh in. The number of layers is a parameter because a 32k-token capture of
all 30 layers takes hours on 2 CPU cores; the persistent per-layer part is reported so the
full model's peak can be read off.

    python benchmarks/long_context_memory.py --lengths 8192,16384,32768 --layers 2 --append benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

from variants_memory import measure_child

MODEL = r"""
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache, wrap_hf_model
tok = AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=int(sys.argv[3]),
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=int(sys.argv[4]),
                  rope_theta=100000.0, tie_word_embeddings=True)
cfg.architectures = ["LlamaForCausalLM"]
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
model = wrap_hf_model(hf, tok, name="smollm2-shaped", source="config", label="smollm2-shaped")
if mode == "forward":  # the baseline: the same routed forward with plain causal SDPA and no statistics
    from attnlab.attention import route_attention, sdpa
    routed = route_attention(model, lambda layer, q, k, v, *, scaling, attention_mask=None, **kw: sdpa(q, k, v, scaling=scaling))
    routed.__enter__()  # kept referenced: a collected context manager would restore the model's attention
"""


def persistent_bytes(n: int, heads: int = 9, block: int = 64) -> int:
    """Bytes one layer's accumulator keeps for the whole capture (stats.HeadStatAccumulator):
    column and diagonal sums (float64, ``heads × n``) and the block maps (float64 sums + float32
    maxima, ``heads × nb²``)."""
    nb = -(-n // block)
    return heads * n * 8 * 2 + heads * nb * nb * (8 + 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--append")
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    longest = max(lengths)
    res = {}
    for n in lengths:
        res[n] = {m: measure_child(MODEL, m, n, str(args.layers), str(longest), base_only=True) for m in ("forward", "qk")}
        print(n, {m: (round(r["seconds"], 1), r["peak_bytes"] >> 20) for m, r in res[n].items()}, flush=True)
    base = lengths[0]
    mib = {n: {m: r["peak_bytes"] / 2**20 for m, r in res[n].items()} for n in lengths}
    rows = [
        f"| {n} | {n / base:.0f}× | {res[n]['forward']['seconds']:.1f} | {res[n]['qk']['seconds']:.1f} | "
        f"{mib[n]['forward']:.0f} | {mib[n]['qk']:.0f} | {mib[n]['qk'] / mib[base]['qk']:.2f}× | "
        f"{persistent_bytes(n) * args.layers / 2**20:.0f} | {persistent_bytes(n) * 30 / 2**20:.0f} |"
        for n in lengths
    ]
    text = "\n".join([
        "## Long-context memory of q/k capture (`benchmarks/long_context_memory.py`)",
        "",
        f"- machine: `{platform.platform()}`, {os.cpu_count()} cores (shared), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `python benchmarks/long_context_memory.py --lengths {args.lengths} --layers {args.layers}`",
        f"- model: random-weight Llama with SmolLM2-135M's layer shape (hidden 576, 9 query / 3 KV heads, head_dim 64), "
        f"{args.layers} layers, context limit lifted to {longest}; `capture(..., path=\"qk\")` with the default "
        "StatConfig (64-token blocks, 256-row query chunks)",
        "- baseline: the same forward routed through plain causal SDPA without statistics (no unembedding, as the q/k path runs it; HF's own SDPA forward builds an n × n mask and a CPU SDPA then materialises every score: 5 GiB at 8k) of the same model and input in the same run; target: q/k peak at 32k "
        "≤ 4.5× its peak at 8k",
        "- persistent = what the accumulators keep for the whole capture (computed from their shapes): with the "
        "measured layers, and for all 30 layers of SmolLM2",
        "",
        f"| tokens | vs {base} | forward s | q/k s | forward peak MiB | q/k peak MiB | q/k peak vs {base} | "
        f"persistent MiB ({args.layers} layers) | persistent MiB (30 layers) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
