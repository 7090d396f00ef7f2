"""Peer check: attnlab's per-head activation patching against TransformerLens's own patching.

`attnlab.circuits.patching.activation_patching` replaces one head's ``z`` inside attnlab's
routed forward (the Hugging Face model with attention computed by SDPA). TransformerLens's
`transformer_lens.patching.get_act_patch_attn_head_out_all_pos` does the same intervention
through the bridge's hook API: it hooks ``blocks.{l}.attn.hook_z`` in ``bridge.run_with_hooks``
(eager attention) and copies the head's slice from a clean ``run_with_cache``. The TL 4.x
utility accepts a ``TransformerBridge`` as is (it only needs ``cfg``, ``run_with_hooks`` and
eval mode), so the two implementations must agree on the same inputs and metric, up to the
float32 difference between SDPA and eager attention over 30 layers.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from attnlab.circuits.patching import activation_patching
from attnlab.circuits.tasks import IOI_TEMPLATES, ioi_task, logit_diff

#: Layers 20 and 23 hold the heads with the largest IOI effects on SmolLM2-135M (exact
#: patching, 4 examples: L20.H0 ≈ 2.6, L23.H3 ≈ 1.7, L23.H7 ≈ 1.6 logits), next to heads
#: with effects near zero, so the comparison covers both.
LAYERS = (20, 23)
#: SDPA (attnlab) vs eager (bridge) attention in float32: measured differences are ~6e-6.
ATOL = 1e-4


@pytest.fixture(scope="module")
def ioi(embedded):
    task = ioi_task(embedded.tokenizer, n=4, templates=IOI_TEMPLATES[:1])  # one length: one batch
    ((clean, corrupted, good, bad),) = task.groups()
    return task, clean, corrupted, good, bad


def _tl_patch(model, base_ids, source_ids, heads, metric):
    """TL's utility on the bridge: metric of ``base_ids`` with each head's ``z`` taken from
    ``source_ids``, and the unpatched metric of ``base_ids``."""
    _, source_cache = model.bridge.run_with_cache(source_ids)
    index = pd.DataFrame(heads, columns=["layer", "head"])
    result = tl_patching.get_act_patch_attn_head_out_all_pos(
        model.bridge, base_ids, source_cache, metric, index_axis_names=None, index_df=index, baseline=True,
    )
    return result.values.double(), float(result.baseline)


@pytest.mark.slow
def test_activation_patching_matches_transformer_lens(embedded, ioi):
    task, clean, corrupted, good, bad = ioi
    heads = [(layer, h) for layer in LAYERS for h in range(embedded.n_heads)]

    def metric(logits):
        return logit_diff(logits, good, bad)

    # denoising: corrupted run, one head's z from the clean run; effect = m(patched) - m(corrupted)
    ours = activation_patching(embedded, task, heads=heads)
    tl_values, tl_corrupted = _tl_patch(embedded, corrupted, clean, heads, metric)
    tl_effect = tl_values - tl_corrupted
    our_effect = torch.tensor([float(ours.nodes[h]) for h in heads], dtype=torch.float64)
    assert ours.corrupted_metric == pytest.approx(tl_corrupted, abs=ATOL)
    assert our_effect.abs().max() > 1.0  # the comparison includes heads that matter
    assert torch.allclose(our_effect, tl_effect, atol=ATOL), (our_effect - tl_effect).abs().max()
    # heads left out of `heads` are not patched: attnlab scores them 0
    assert float(ours.nodes.abs().sum()) == pytest.approx(float(our_effect.abs().sum()), rel=1e-6)

    # noising: clean run, one head's z from the corrupted run; effect = m(clean) - m(patched)
    few = [(20, 0), (23, 3), (23, 7), (23, 5)]
    noised = activation_patching(embedded, task, heads=few, direction="noising")
    tl_values, tl_clean = _tl_patch(embedded, clean, corrupted, few, metric)
    assert noised.clean_metric == pytest.approx(tl_clean, abs=ATOL)
    noised_effect = torch.tensor([float(noised.nodes[h]) for h in few], dtype=torch.float64)
    assert noised_effect.abs().max() > 0.5
    assert torch.allclose(noised_effect, tl_clean - tl_values, atol=ATOL)
