"""Batched patching gives the scores of the one-at-a-time reference: edge attribution with one
batched backward per receiver layer against one backward per receiver head, activation patching
with several heads stacked along the batch against one forward per head, the per-head output
projection against projecting one-hot copies, last-position logits against full logits."""

from __future__ import annotations

import pytest
import torch

import attnlab.circuits.patching as patching
from attnlab.circuits.patching import (
    PatchingError,
    _out_proj,
    activation_patching,
    attribution_patching,
    forward,
    head_writes,
)
from attnlab.circuits.tasks import induction_task
from attnlab.models import tiny_model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model3(request):
    """Three layers, so receivers in layer 2 have senders in two earlier layers."""
    return tiny_model(request.param, n_layers=3, seed=1)


@pytest.fixture(scope="module")
def task():
    # two lengths: two groups, so per-group weights are exercised too
    a = induction_task(vocab=(100, 5000), n=3, length=5, seed=1)
    b = induction_task(vocab=(100, 5000), n=2, length=7, seed=2)
    a.examples += b.examples
    return a


@pytest.mark.parametrize("direction,ig_steps", [("denoising", 0), ("noising", 0), ("denoising", 2)])
def test_batched_edges_equal_the_per_receiver_loop(model3, task, direction, ig_steps, monkeypatch):
    fast = attribution_patching(model3, task, direction=direction, ig_steps=ig_steps)
    # the reference is the original code path: one backward per receiver head, every position
    monkeypatch.setattr(patching, "_first_changed_position", lambda delta: 0)
    slow = attribution_patching(model3, task, direction=direction, ig_steps=ig_steps, batch_edges=False)
    assert fast.edges.abs().max() > 1e-4  # not trivially zero
    assert (fast.edges[:, :, 2] != 0).sum() == 2 * 4 * 4  # layer-2 receivers: every sender in layers 0 and 1
    assert (fast.edges[:, :, 0] == 0).all() and (fast.edges[2] == 0).all()  # no edge into layer 0, none out of the last
    assert torch.allclose(fast.edges, slow.edges, atol=1e-5, rtol=1e-5)
    assert torch.allclose(fast.logit_edges, slow.logit_edges, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.nodes, slow.nodes)


def test_edges_skip_only_positions_that_write_nothing(model3, task):
    delta = [torch.zeros(2, 6, 4, 16) for _ in range(3)]
    delta[1][1, 4, 2, 0] = 1e-3
    assert patching._first_changed_position(delta) == 4
    assert patching._first_changed_position([torch.zeros(1, 3, 4, 16)]) == 0
    # induction corruption changes token L-1 of the first copy: earlier positions are identical
    ex = task.examples[0]
    first = int((ex.clean != ex.corrupted).nonzero()[0, 0])
    clean, corr = forward(model3, ex.clean[None]), forward(model3, ex.corrupted[None])
    delta = [(c - x) for c, x in zip(clean.z, corr.z, strict=True)]
    assert patching._first_changed_position(delta) == first > 0


def test_head_writes_equal_projecting_one_hot_copies(model3):
    torch.manual_seed(0)
    dz = torch.randn(2, 5, 4, 16)
    proj = _out_proj(model3, 1)
    eye = torch.eye(4)
    per_head = (dz[None] * eye[:, None, None, :, None]).reshape(4, 2, 5, 64)
    expected = proj(per_head) - proj(torch.zeros(1, 64))
    got = head_writes(model3, 1, dz)
    assert got.shape == (4, 2, 5, 64)
    assert torch.allclose(got, expected, atol=1e-5)
    # the writes of all heads add up to the projection of the whole change (without bias)
    assert torch.allclose(got.sum(0), proj(dz.reshape(2, 5, 64)) - proj(torch.zeros(1, 64)), atol=1e-5)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_stacked_activation_patching_equals_one_forward_per_head(model3, task, direction):
    one = activation_patching(model3, task, direction=direction)
    for k in (3, 12):  # chunks that split layers and one chunk holding every head
        stacked = activation_patching(model3, task, direction=direction, batch_heads=k)
        assert torch.allclose(stacked.nodes, one.nodes, atol=1e-5, rtol=1e-5)
        assert stacked.clean_metric == pytest.approx(one.clean_metric, abs=1e-6)
    assert one.nodes.abs().max() > 1e-3 and (one.nodes != 0).sum() >= 6
    subset = activation_patching(model3, task, direction=direction, heads=[(2, 1), (0, 3)], batch_heads=2)
    assert subset.nodes[2, 1] == pytest.approx(float(one.nodes[2, 1]), abs=1e-5)
    assert subset.nodes[0, 3] == pytest.approx(float(one.nodes[0, 3]), abs=1e-5)
    assert (subset.nodes != 0).sum() == 2
    with pytest.raises(PatchingError, match="batch_heads"):
        activation_patching(model3, task, batch_heads=0)


def test_last_only_logits_are_the_last_position(model3):
    ids = torch.randint(100, 1000, (2, 7))
    full, last = forward(model3, ids), forward(model3, ids, last_only=True)
    assert last.logits.shape == (2, 1, full.logits.shape[-1])
    assert torch.allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(full.z, last.z, strict=True))


@pytest.mark.slow
def test_batched_edges_on_the_embedded_model(embedded, monkeypatch):
    from attnlab.circuits.tasks import IOI_TEMPLATES, ioi_task

    task = ioi_task(embedded.tokenizer, n=2, templates=IOI_TEMPLATES[:1])
    fast = attribution_patching(embedded, task)
    monkeypatch.setattr(patching, "_first_changed_position", lambda delta: 0)
    slow = attribution_patching(embedded, task, batch_edges=False)
    scale = float(slow.edges.abs().max())
    assert scale > 0.01
    assert float((fast.edges - slow.edges).abs().max()) <= 1e-4 * scale
    assert torch.equal(fast.nodes, slow.nodes)


# ---------------------------------------------------------------------------------------
# refinement: attribution under the current circuit
# ---------------------------------------------------------------------------------------
def _linear_toy():
    """One attention-only layer with an identity final norm: the metric is linear in ``z``, so
    attribution under any ablation is exact."""
    import types

    from attnlab.circuits.patching import _final_norm

    model = tiny_model("gpt2", n_layers=1, seed=3)
    with torch.no_grad():
        for p in model.hf_model.transformer.h[0].mlp.parameters():
            p.zero_()
        model.hf_model.transformer.h[0].attn.c_attn.weight.mul_(10)
        model.hf_model.transformer.h[0].attn.c_proj.weight.mul_(10)
    norm = _final_norm(model)
    object.__setattr__(norm, "forward", types.MethodType(lambda self, x, *a, **k: x, norm))
    return model


def test_ablated_attribution_is_exact_where_the_metric_is_linear():
    from attnlab.circuits.faithfulness import ablated_attribution, metric_with_heads

    model = _linear_toy()
    task = induction_task(vocab=(100, 5000), n=3, length=6, seed=1)
    keep = [(0, 1), (0, 3)]
    m, scores = ablated_attribution(model, task, keep)
    assert m == pytest.approx(metric_with_heads(model, task, keep), abs=1e-4)
    assert scores.abs().max() > 1e-2
    for h in range(4):
        if (0, h) in keep:  # what ablating it takes away
            exact = m - metric_with_heads(model, task, [k for k in keep if k != (0, h)])
        else:  # what restoring it adds
            exact = metric_with_heads(model, task, keep + [(0, h)]) - m
        assert float(scores[0, h]) == pytest.approx(exact, abs=1e-4, rel=1e-3)


@pytest.mark.parametrize("means", ["position", "global"])
def test_refine_paths_measure_the_documented_faithfulness(model3, task, means):
    from attnlab.circuits.faithfulness import FaithfulnessError, faithfulness_curve, refine_circuit

    grow = refine_circuit(model3, task, mode="grow", means=means, step=2, level=0.8)
    assert grow["sizes"] == list(range(0, 2 * len(grow["sizes"]), 2))[: len(grow["sizes"])]
    assert grow["f"][0] == pytest.approx(0.0, abs=1e-6)
    assert grow["f"][-1] >= 0.8 or grow["sizes"][-1] == 12
    assert sorted(grow["ranking"]) == [(a, b) for a in range(3) for b in range(4)]
    # every measured point is the faithfulness of the top-k of the returned ranking
    curve = faithfulness_curve(model3, task, grow["ranking"], sizes=grow["sizes"], means=means)
    assert curve["f"] == pytest.approx(grow["f"], abs=1e-4)
    assert grow["smallest_at_level"] == curve["smallest_at_level"]
    assert grow["circuit"] is None or sorted(grow["ranking"][: grow["smallest_at_level"]]) == grow["circuit"]

    prune = refine_circuit(model3, task, mode="prune", means=means, step=3, min_size=3)
    assert prune["sizes"] == [12, 9, 6, 3] and prune["f"][0] == pytest.approx(1.0, abs=1e-5)
    assert all(set(b) < set(a) for a, b in zip(prune["circuits"], prune["circuits"][1:], strict=False))
    curve = faithfulness_curve(model3, task, prune["ranking"], sizes=prune["sizes"], means=means)
    assert curve["f"] == pytest.approx(prune["f"], abs=1e-4)
    with pytest.raises(FaithfulnessError, match="mode"):
        refine_circuit(model3, task, mode="shrink")


def test_cli_refine_is_stored_with_the_circuit(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attnlab.circuits.circuit import load_circuit
    from attnlab.cli import main

    tokenizer = tiny_model("llama").tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    torch.manual_seed(2)
    path = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "run"
    argv = ["circuit", "--model", str(path), "--task", "induction", "--examples", "3", "--no-faithfulness",
            "--refine", "prune", "--refine-step", "4", "--out", str(out)]
    assert main(argv) == 0
    assert "refined (prune)" in capsys.readouterr().out
    refined = load_circuit(out).faithfulness["refined"]
    assert refined["mode"] == "prune" and refined["sizes"] == [8, 4, 1]
    assert refined["f"][0] == pytest.approx(1.0, abs=1e-5)
    bad = argv[:-2] + ["--refine", "shrink", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as refused:  # argparse refuses the choice, exit 2
        main(bad)
    assert refused.value.code == 2 and "--refine" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
