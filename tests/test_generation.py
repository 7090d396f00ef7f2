"""Generation on a loaded model is the plain Hugging Face model's, with hooks firing at every step.

The bridge's attention used to miss the KV cache (transformers 5 passes it as ``cache=``), so
every decode step attended to itself alone: ``generate`` answered ``'The-----------'``."""

from __future__ import annotations

import pytest
import torch

from attnlab.names import attn_hook


def _plain_hf(model):
    """The same weights in a fresh Hugging Face model that no bridge has touched (`tiny_model`
    seeds torch before building it, so the same seed builds the same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(model.hf_model.config, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same model: a forward without a cache agrees
        torch.testing.assert_close(plain(ids).logits, model.hf_model(ids).logits, atol=1e-4, rtol=1e-4)
    return plain


def _greedy(hf_model, ids: torch.Tensor, n: int):
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_equals_the_plain_model_step_by_step(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = torch.randint(100, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_tokens, want_scores = _greedy(_plain_hf(model), ids, 8)
        got_tokens, got_scores = _greedy(model.hf_model, ids, 8)
    torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_tokens, want_tokens)
    assert torch.equal(model.generate(ids, max_new_tokens=8), want_tokens)


def test_hooks_fire_at_every_decode_step(tiny_llama):
    ids = torch.randint(100, 1000, (1, 10), generator=torch.Generator().manual_seed(2))
    shapes = []

    def grab(pattern, hook):
        shapes.append(tuple(pattern.shape[-2:]))
        return pattern

    tiny_llama.bridge.add_hook(attn_hook(0, "hook_pattern"), grab)
    try:
        tiny_llama.generate(ids, max_new_tokens=4)
    finally:
        tiny_llama.bridge.reset_hooks()
    assert shapes == [(10, 10), (1, 11), (1, 12), (1, 13)]  # prefill, then one query over a growing cache


@pytest.mark.slow
def test_embedded_model_answers_a_passkey_like_the_plain_model(embedded):
    from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache

    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 12
    text = f"{filler}The pass key is 70215. Remember it. 70215 is the pass key. {filler}What is the pass key? The pass key is"
    ids = embedded.encode(text)
    assert 300 < ids.shape[1] < 1000
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False),
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        want = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=embedded.tokenizer.eos_token_id)
    got = embedded.generate(ids, max_new_tokens=8)
    assert torch.equal(got, want)
    assert "70215" in embedded.tokenizer.decode(got[0, ids.shape[1]:])
    bridge_tokens = embedded.bridge.generate(ids, max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens")
    assert torch.equal(bridge_tokens[0, ids.shape[1]:], want[0, ids.shape[1]:])
