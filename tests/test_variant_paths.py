"""The attention variants (sliding windows, soft-capping, learned sinks) on the paths beyond
capture and the executors: validation, validation as deployed, the needle probe's greedy
answers, circuit patching and the head inspector all run the model's own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_ids

from attnlab.models import tiny_model
from attnlab.names import attn_hook
from attnlab.sparsity_stats.policy import uniform_policy as make_uniform_policy

VARIANTS = ["gemma2", "gpt-oss", "mistral-window"]


@pytest.fixture(scope="module", params=VARIANTS)
def variant_model(request):
    return tiny_model(request.param)


def uniform_policy(model, kind, params, block_size=16):
    return make_uniform_policy(model, kind, params, block_size=block_size)


def test_validation_measures_against_the_models_own_attention(variant_model):
    """An all-dense policy is the model's own attention: no error, full recall; a streaming one
    loses some (the yardstick and the executor agree on the variant)."""
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.validation import head_errors

    ids = random_ids(96, seed=1)
    dense = head_errors(variant_model, PolicyExecutor(uniform_policy(variant_model, "dense", {}), "reference"), ids)
    assert dense.rel_l2.max() < 1e-5 and dense.recall.min() > 1 - 1e-5
    stream = head_errors(variant_model, PolicyExecutor(uniform_policy(variant_model, "streaming", {"sink": 1, "window": 2}),
                                                       "reference"), ids)
    assert stream.recall.min() < 0.999


def test_validate_and_as_deployed_run_on_variant_models(variant_model, tmp_path):
    from attnlab.sparsity_stats.validation import validate_policy

    policy = uniform_policy(variant_model, "streaming", {"sink": 4, "window": 32})
    report = validate_policy(variant_model, policy, executor="reference", n_prompts=1, prompt_tokens=128,
                             needle_samples=1, needle_length=256, progress=False)
    deployed = validate_policy(variant_model, policy, deployed_as="npz", n_prompts=1, prompt_tokens=128, progress=False)
    # npz runs exactly the validated mask: the same per-head recall
    np.testing.assert_allclose(deployed.heads.recall, report.heads.recall, atol=1e-4)
    assert report.summary["needle_n"] == 1


def test_inspector_pattern_is_the_models_own(variant_model):
    """The inspector's live map equals the bridge's eager ``hook_pattern`` (window, soft-cap and
    learned sinks included)."""
    from attnlab.app import inspector

    ids = random_ids(40, seed=3)
    layer, head = 0, 1
    qk = inspector.capture_layer_qk(variant_model, ids, layer)
    got = np.nan_to_num(inspector.token_pattern(qk, head), nan=0.0)
    seen = {}

    def hook(pattern, hook=None):
        seen["p"] = pattern[0, head].detach().float().numpy()

    variant_model.bridge.run_with_hooks(ids, fwd_hooks=[(attn_hook(layer, "hook_pattern"), hook)], stop_at_layer=layer + 1)
    np.testing.assert_allclose(got, seen["p"], atol=1e-5)


def test_greedy_needle_answers_and_patching_run_on_variant_models(variant_model):
    from attnlab.circuits.patching import forward
    from attnlab.probes.needle import greedy_answer, needle_samples

    sample = needle_samples(variant_model, lengths=[200], kinds=("passkey",), n_samples=1, seed=0)[0]
    answer = greedy_answer(variant_model, sample, max_new_tokens=4)
    with torch.no_grad():
        want = variant_model.hf_model.generate(sample.input_ids, attention_mask=torch.ones_like(sample.input_ids),
                                               max_new_tokens=4, do_sample=False,
                                               pad_token_id=variant_model.tokenizer.eos_token_id)
    assert answer.generated_ids == want[0, sample.input_ids.shape[1]:].tolist()[: len(answer.generated_ids)]
    ids = random_ids(32, seed=2)
    trace = forward(variant_model, ids)  # the routed forward patching uses equals the model's own
    with torch.no_grad():
        plain = variant_model.hf_model(ids, use_cache=False).logits
    assert (trace.logits - plain).abs().max().item() < 1e-4


@pytest.mark.parametrize("n_q,n_k,window", [(1000, 1000, 300), (1, 700, 64), (64, 1200, 512), (700, 700, 0), (600, 600, 1)])
def test_windowed_sdpa_equals_masked_sdpa(n_q, n_k, window):
    """Sliding-window attention one query chunk at a time over only the visible keys (the
    memory-lean path) equals SDPA with the full window mask."""
    from attnlab.attention import key_mask, windowed_sdpa

    g = torch.Generator().manual_seed(n_q + window)
    q, k, v = torch.randn(1, 4, n_q, 16, generator=g), torch.randn(1, 2, n_k, 16, generator=g), torch.randn(1, 2, n_k, 16, generator=g)
    got = windowed_sdpa(q, k, v, scaling=0.25, window=window, chunk=256)
    mask = key_mask(torch.arange(n_k - n_q, n_k), n_k, window)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
