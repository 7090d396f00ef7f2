"""The GPU benchmark script: it parses, explains itself, refuses to run without CUDA, and
builds the layout of every pattern it times with the density it claims."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("attnlab_kernel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_works_without_a_gpu():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--lengths" in result.stdout and "--out" in result.stdout
    assert "--softcap" in result.stdout and "--model-window" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")
def test_refuses_to_run_without_cuda():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--lengths", "256"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "needs a CUDA device" in result.stderr


def test_patterns_build_valid_layouts_with_sensible_density():
    bench = load_benchmark()
    n, block = 4096, 64
    densities = {}
    for pattern in bench.PATTERNS:
        index = bench.build_layout(pattern, n, 4, block)
        index.validate()
        densities[pattern] = bench.density_of(index)
        assert bench.kernel_flops(index, 64, 1) > 0
        listed = index.block_mask()
        assert not (listed & ~torch.ones_like(listed[0]).tril()).any(), "not causal"
        assert listed.any(-1).all(), "every query block keeps a block (the diagonal)"
    assert densities["dense"] == pytest.approx(1.0)
    assert densities["streaming"] < 0.2
    assert densities["streaming"] < densities["mixed"] < 1.0
    assert 0.4 < densities["topk50"] < 0.6
    assert densities["topk5"] < densities["topk10"] < densities["topk25"] < densities["topk50"]
    assert densities["vertical_slash"] < 0.3


def test_patterns_inside_a_model_window():
    bench = load_benchmark()
    n, block = 2048, 64
    for pattern in ("dense", "mixed", "topk25"):
        index = bench.build_layout(pattern, n, 4, block, model_window=512)
        index.validate()
        assert index.model_window == 512
        # nothing listed beyond the window: at most 512 / 64 + 1 key blocks per query block
        assert int(index.block_mask().sum(-1).max()) <= 512 // block + 1
    windowed = bench.build_layout("dense", n, 4, block, model_window=512)
    # against full causal attention the windowed dense layer computes under half the blocks;
    # against its own windowed dense cost (the layout's density) it is dense
    assert bench.density_of(windowed) < 0.5
    assert windowed.density.tolist() == [1.0] * 4
