"""Measured recall of a policy (``benchmarks/policy.py``'s `measure_recall`) on a tiny model.

- On the prompts a policy was fitted on, with dynamic heads keeping the blocks the profile
  scored, the measured attention mass of every block-granular kind equals the predicted
  ``expected_recall`` head by head (both are exact sums of the same probabilities).
- The fast summation paths (block sums, streaming by cumulative sums) equal the token-level
  mask of the layout contract.
- The budgeted policy keeps at least as much as uniform streaming at the same budget on the
  prompts it was fitted on, and at most ``HELD_OUT_SLACK`` less on held-out prompts of other kinds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab.prompts import builtin_prompts
from attnlab.sparsity_stats import (
    Candidate,
    PolicyGenerator,
    and_masks,
    compute_curves,
    generate_causal,
    generate_sink,
    generate_window,
    or_masks,
    uniform_streaming,
)
from attnlab.sparsity_stats.generator import policy_from_choices
from attnlab.sparsity_stats.masks import layout_from_patterns
from attnlab.stats import StatConfig

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "policy.py"
N = 256
BLOCK = 16
BLOCK_KINDS = ("dense", "a_shape", "vertical_slash", "block_topk")


#: Recall the budgeted policy may lose to uniform streaming on held-out prompts (prompt shift).
HELD_OUT_SLACK = 0.05


def _bench():
    name = "attnlab_benchmarks_policy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def fitted(tiny_llama, tmp_path_factory):
    torch.manual_seed(0)
    prompts = builtin_prompts(tiny_llama.tokenizer, [N], 2, seed=0)
    run = attnlab.profile(tiny_llama, prompts, tmp_path_factory.mktemp("runs") / "tiny", config=StatConfig(block_size=BLOCK),
                          path="qk", force=True, progress=False)
    return prompts, compute_curves(run)


@pytest.fixture(scope="module")
def held_out(tiny_llama):
    return builtin_prompts(tiny_llama.tokenizer, [N], 2, seed=1, kinds=("code", "list"))


def _uniform(curves, cand: Candidate):
    nl, nh = curves.recall.shape[:2]
    return policy_from_choices(curves.extend([cand]), {(la, h): cand for la in range(nl) for h in range(nh)}, reason="test")


def _predicted(policy) -> np.ndarray:
    return np.array([[policy.entry(la, h).expected_recall for h in range(policy.n_heads)] for la in range(policy.n_layers)])


def test_measured_recall_equals_prediction_for_block_granular_kinds(tiny_llama, fitted):
    bench = _bench()
    prompts, curves = fitted
    est = curves.estimator
    policies = {
        "a_shape": _uniform(curves, Candidate.make("a_shape", sink=BLOCK, window=3 * BLOCK)),
        "vertical_slash": _uniform(curves, Candidate.make("vertical_slash", vertical=2 * BLOCK, slash=2 * BLOCK)),
        "block_topk": _uniform(curves, Candidate.make("block_topk", topk=4 * BLOCK)),
        "block_gamma": _uniform(curves, Candidate.make("block_topk", gamma=0.9)),
        "budgeted": PolicyGenerator(budget=0.35, kinds=BLOCK_KINDS).fit(curves).emit(),
    }
    kinds = {e.kind for e in policies["budgeted"].heads}
    assert kinds & {"vertical_slash", "block_topk"}, f"the budgeted policy should use a dynamic kind here, got {kinds}"
    scores = bench.profile_scores(est)
    measured = bench.measure_recall(tiny_llama, policies, prompts, scores={k: scores for k in policies})
    for name, pol in policies.items():
        got = measured[name]
        assert got.paths["exact"] == 0 and got.paths["stream"] == 0
        np.testing.assert_allclose(got.recall, _predicted(pol), atol=1e-5, err_msg=name)
        assert got.n_queries == 2 * N
        for e in pol.heads:  # achieved density: exact kinds equal, vertical-slash within its bound
            d = got.density[e.layer, e.head]
            if e.density_is == "exact":
                assert d == pytest.approx(e.expected_density, abs=1e-9), (name, e.kind)
            elif e.density_is == "upper_bound":
                assert d <= e.expected_density + 1e-9, (name, e.kind)


def test_fast_paths_equal_the_token_mask(tiny_llama, fitted, held_out):
    bench = _bench()
    _, curves = fitted
    nl, nh = curves.recall.shape[:2]
    mix = [Candidate.make("streaming", sink=4, window=40), Candidate.make("a_shape", sink=BLOCK, window=2 * BLOCK),
           Candidate.make("block_topk", topk=3 * BLOCK), Candidate.make("streaming", sink=0, window=7)]
    mixed = policy_from_choices(curves.extend(mix), {(la, h): mix[(la + h) % len(mix)] for la in range(nl) for h in range(nh)},
                                reason="test")
    policies = {"mixed": mixed, "streaming": _uniform(curves, Candidate.make("streaming", sink=4, window=100))}
    fast = bench.measure_recall(tiny_llama, policies, held_out, chunk=96)
    exact = bench.measure_recall(tiny_llama, policies, held_out, exact=True)
    assert fast["mixed"].paths["stream"] > 0 and fast["mixed"].paths["block"] > 0 and fast["mixed"].paths["exact"] == 0
    assert exact["mixed"].paths["exact"] == nl * nh * len(held_out)
    for name in policies:
        np.testing.assert_allclose(fast[name].per_prompt, exact[name].per_prompt, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(fast[name].density, exact[name].density, atol=0)
    # the streaming band as tiles: what the fast path relies on
    for s, w in ((4, 40), (0, 7), (16, 1), (3, 300)):
        pat = and_masks(generate_causal(), or_masks(generate_sink(s), generate_window(w)))
        lay = layout_from_patterns([pat], N, N, BLOCK)
        assert torch.equal(bench.stream_tiles(N, BLOCK, s, w), lay.block_mask()[0]), (s, w)


def test_budgeted_keeps_at_least_uniform_streaming(tiny_llama, fitted, held_out):
    bench = _bench()
    prompts, curves = fitted
    est = curves.estimator
    budget = 0.45
    us = uniform_streaming(est, budget)
    assert us.within_budget and us.choices[0][0].param_dict["window"].resolve(N) > BLOCK  # a real window, not the minimum
    policies = {
        "budgeted": PolicyGenerator(budget=budget, extra_candidates=us.candidates()).fit(curves).emit(),
        "uniform_streaming": _uniform(curves, us.choices[0][0]),
    }
    scores = bench.profile_scores(est)
    on_fit = bench.measure_recall(tiny_llama, policies, prompts, scores={k: scores for k in policies})
    held = bench.measure_recall(tiny_llama, policies, held_out, scores="input")
    for got in (on_fit, held):
        assert got["budgeted"].mean_density <= budget + 1e-9
        assert got["uniform_streaming"].mean_density <= budget + 1e-9
    # On its own prompts the optimiser, offered uniform streaming's choice, can't do worse.
    assert on_fit["budgeted"].mean_recall >= on_fit["uniform_streaming"].mean_recall
    # On held-out prompts of other kinds nothing guarantees it (prompt shift: the dynamic heads
    # pick their blocks from another input); the loss is bounded here, and measured on the real
    # model in benchmarks/RESULTS.md. (It was 0.013 on this random model on 2026-12-01.)
    assert held["budgeted"].mean_recall >= held["uniform_streaming"].mean_recall - HELD_OUT_SLACK
