"""Device-map check for a GPU machine: a model split over two devices computes what it computes
on one (not run on the CPU-only development machine; tests/test_device_map.py covers the CPU).

    python benchmarks/device_map_check.py                          # cuda:0 + cpu (CPU offload)
    python benchmarks/device_map_check.py --split cuda:0,cuda:1    # two GPUs
    python benchmarks/device_map_check.py --model smollm2-135m     # a real model (default: tiny Llama)
    python benchmarks/device_map_check.py --split cpu,cpu          # the script itself, on a CPU

The first half of the layers (and the embedding) go on the first device, the rest (and the
final norm and unembedding) on the second; with ``cpu`` second, accelerate keeps those weights
in CPU memory and runs the layers on the first GPU (CPU offload). Compared with the same model
on the first device alone: logits, both capture paths, greedy generation, the reference
executor under a streaming policy, and the identity (fingerprint). Needs torch, transformers,
transformer-lens and accelerate; no network (the default model is built from a config, with a
word-level tokenizer made on the spot). Prints one line per check; exit 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def save_tiny(directory: Path, n_layers: int = 4) -> None:
    """A random tiny Llama with a word-level tokenizer, as a plain HF directory (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(509)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)


def split_map(model, first: str, second: str) -> dict[str, str]:
    base = "model"
    half = model.n_layers // 2
    return {f"{base}.embed_tokens": first, f"{base}.rotary_emb": first,
            **{f"{base}.layers.{i}": first if i < half else second for i in range(model.n_layers)},
            f"{base}.norm": second, "lm_head": second}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from attnlab.capture import capture
    from attnlab.models import load_model
    from attnlab.sparsity_stats.executors import run_with_policy
    from attnlab.sparsity_stats.policy import uniform_policy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model to load (default: a tiny Llama built here)")
    p.add_argument("--split", default="cuda:0,cpu", help="two devices: first half, second half (default: cuda:0,cpu)")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)
    first, second = args.split.split(",")
    if "cuda" in args.split and not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine (tests/test_device_map.py covers the CPU)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source is None:
            source = str(Path(tmp) / "tiny")
            save_tiny(Path(source))
        single = load_model(source, device=first, verbose=False)
        placement = split_map(single, first, second)
        placed = load_model(source, device_map=placement, verbose=False)
        ids = torch.randint(3, min(500, single.hf_model.config.vocab_size), (1, args.length), generator=torch.Generator().manual_seed(0))
        print(f"model {single.name}: {single.n_layers} layers; map {first} | {second}")
        print("layer devices:", [str(placed.layer_device(i)) for i in range(placed.n_layers)], "input device:", placed.device)
        failures = 0

        def check(name: str, ok: bool, detail: str = "") -> None:
            nonlocal failures
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")

        def diff(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.float().cpu() - b.float().cpu()).abs().max())

        with torch.no_grad():
            d = diff(placed.bridge(ids), single.bridge(ids))
        check("forward logits", d <= args.atol, f"max |diff| {d:.2e}")
        for path in ("pattern", "qk"):
            d = diff(capture(placed, ids, path=path).values(), capture(single, ids, path=path).values())
            check(f"capture {path}", d <= args.atol, f"max |diff| {d:.2e}")
        g1, g2 = placed.generate(ids[:, :64], max_new_tokens=8), single.generate(ids[:, :64], max_new_tokens=8)
        check("greedy generate", torch.equal(g1.cpu(), g2.cpu()))
        policy = uniform_policy(single, "streaming", {"sink": 16, "window": 64}, block_size=32)
        with torch.no_grad():
            with run_with_policy(placed, policy, "reference"):
                a = placed.bridge(ids)
            with run_with_policy(single, policy, "reference"):
                b = single.bridge(ids)
        check("reference executor", diff(a, b) <= args.atol, f"max |diff| {diff(a, b):.2e}")
        check("identity (fingerprint)", placed.identity() == single.identity(), placed.identity().fingerprint)
        print("all ok" if not failures else f"{failures} check(s) failed")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
