"""XAttention's antidiagonal scores and FlexPrefill's Jensen–Shannon choice on hand-made q/k
where the right answer is known, and against their definitions written as plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.sparsity_stats.dynamic import (
    antidiagonal_block_scores,
    fewest_reaching,
    flexprefill_query_aware,
    js_distance,
)


def loop_antidiagonal(q, k, block, stride):
    """The definition, one tile at a time (single head, n a multiple of the block size)."""
    n, d = q.shape
    tiles = n // stride
    logits = torch.full((tiles, tiles), -float("inf"))
    for i in range(tiles):
        for j in range(i + 1):
            logits[i, j] = sum(
                float(q[i * stride + stride - 1 - t] @ k[j * stride + t]) for t in range(stride)
            ) / (stride * math.sqrt(d))
    att = torch.softmax(logits, -1)
    per = block // stride
    nb = n // block
    out = torch.zeros(nb, nb)
    for qb in range(nb):
        for kb in range(nb):
            out[qb, kb] = att[qb * per:(qb + 1) * per, kb * per:(kb + 1) * per].sum()
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_antidiagonal_scores_follow_the_definition(stride):
    g = torch.Generator().manual_seed(stride)
    q, k = torch.randn(2, 32, 8, generator=g), torch.randn(1, 32, 8, generator=g)
    got = antidiagonal_block_scores(q, k, 8, stride=stride)
    assert got.shape == (2, 4, 4)
    for h in range(2):
        torch.testing.assert_close(got[h], loop_antidiagonal(q[h], k[0], 8, stride), atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.sum(-1), torch.ones(2, 4))
    assert (got.triu(1) == 0).all(), "no mass on future blocks"


def test_antidiagonal_scores_find_the_block_every_query_attends():
    n, d, block = 64, 16, 16
    q = torch.zeros(1, n, d)
    q[..., 0] = 4.0  # every query points along axis 0
    k = torch.zeros(1, n, d)
    k[0, 16:32, 0] = 4.0  # only key block 1 points there too
    scores = antidiagonal_block_scores(q, k, block, stride=4)
    assert scores[0, 1:, 1].min() > 0.9, "rows that can see block 1 put their mass on it"
    assert scores[0, 0, 0] == pytest.approx(1.0)


def test_ragged_lengths_and_bad_strides():
    q, k = torch.randn(1, 50, 8), torch.randn(1, 50, 8)
    scores = antidiagonal_block_scores(q, k, 16, stride=8)
    assert scores.shape == (1, 4, 4) and torch.isfinite(scores).all()
    assert torch.allclose(scores.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="divide the block size"):
        antidiagonal_block_scores(q, k, 16, stride=32)
    with pytest.raises(ValueError, match="stride must be one of"):
        antidiagonal_block_scores(q, k, 18, stride=3)


def test_js_distance_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert js_distance(p, p).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    assert js_distance(p, disjoint).item() == pytest.approx(math.sqrt(math.log(2)), rel=1e-5)
    assert js_distance(p * 7, p).item() == pytest.approx(0.0, abs=1e-6), "unnormalised inputs are normalised"


def test_flexprefill_chooses_query_aware_only_when_the_estimate_agrees():
    blocks = torch.softmax(torch.randn(2, 4, 4), -1).tril()
    blocks = blocks / blocks.sum(-1, keepdim=True)
    vertical = torch.stack([blocks[0, -1] * 64, torch.tensor([0.0, 0.0, 0.0, 1.0])])
    choice = flexprefill_query_aware(vertical, blocks, delta=0.1)
    assert choice[0] and (not choice[1] or js_distance(vertical[1:], blocks[1:, -1]).item() < 0.1)


def test_fewest_reaching_by_hand():
    mass = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    assert fewest_reaching(mass, 0.8).tolist() == [[True, True, True, False]], "first forced, then 0.5, 0.3"
    assert fewest_reaching(mass, 0.8, force_first=False).tolist() == [[False, True, True, False]]
    assert fewest_reaching(mass, 1.0).all()
    assert fewest_reaching(torch.zeros(1, 3), 0.9).tolist() == [[True, False, False]]


# ---------------------------------------------------------------------------------------
# the kinds `xattention` and `flexprefill`, run per input
# ---------------------------------------------------------------------------------------
def test_published_kinds_validate_their_parameters(tiny_llama):
    from attnlab.sparsity_stats.dynamic import parse_baseline, published_policy
    from attnlab.sparsity_stats.errors import PolicyError

    policy = published_policy(tiny_llama, "xattention", block_size=16, tau=0.8)
    assert policy.heads[0].params == {"tau": 0.8, "stride": 8}
    assert published_policy(tiny_llama, "flexprefill", block_size=16).heads[0].params == {"gamma": 0.9, "delta": 0.1}
    for kind, params, match in [("xattention", {"tau": 0}, "tau"), ("xattention", {"stride": 3}, "stride"),
                                ("xattention", {"tau": float("nan")}, "tau"), ("flexprefill", {"delta": -1}, "delta"),
                                ("flexprefill", {"window": 4}, "window")]:
        with pytest.raises(PolicyError, match=match):
            published_policy(tiny_llama, kind, block_size=16, **params)
    assert parse_baseline("xattention:tau=0.95,stride=16") == ("xattention", {"tau": 0.95, "stride": 16.0})
    with pytest.raises(PolicyError, match="KEY=NUMBER"):
        parse_baseline("xattention:tau")


def test_a_baseline_sweep_expands_to_one_setting_per_value():
    from attnlab.sparsity_stats.dynamic import parse_baseline, parse_baselines
    from attnlab.sparsity_stats.errors import PolicyError

    assert parse_baselines("flexprefill") == [("flexprefill", {})]
    assert parse_baselines("xattention:tau=0.8/0.9,stride=8/16") == [
        ("xattention", {"tau": 0.8, "stride": 8.0}), ("xattention", {"tau": 0.8, "stride": 16.0}),
        ("xattention", {"tau": 0.9, "stride": 8.0}), ("xattention", {"tau": 0.9, "stride": 16.0})]
    with pytest.raises(PolicyError, match="a sweep of 2 settings"):
        parse_baseline("xattention:tau=0.8/0.9")
    with pytest.raises(PolicyError, match="KEY=NUMBER"):
        parse_baselines("xattention:tau=0.8/x")


def test_xattention_keeps_the_blocks_its_antidiagonal_scores_choose(tiny_llama):
    """compile_for_input on hand-made q/k: the kept blocks are the rows' cheapest prefix of the
    antidiagonal scores reaching tau (diagonal and first block always)."""
    from attnlab.sparsity_stats.dynamic import published_policy
    from attnlab.sparsity_stats.kinds import select_block_topk
    from attnlab.sparsity_stats.masks import compile_for_input

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 128, 16, generator=g) * 2, torch.randn(2, 128, 16, generator=g) * 2
    policy = published_policy(tiny_llama, "xattention", block_size=16, tau=0.6, stride=4)
    layout = compile_for_input(policy, 0, q, k)
    want = select_block_topk(antidiagonal_block_scores(q, k, 16, stride=4), gamma=0.6)
    assert torch.equal(layout.block_mask(), want)
    assert want.sum() < torch.ones(8, 8).tril().sum() * 4, "tau 0.6 drops blocks"


def test_flexprefill_picks_its_pattern_per_head_from_the_input(tiny_llama):
    """A head whose last queries attend like the pooled estimate goes query-aware; a head whose
    last queries look at one far column does not."""
    from attnlab.sparsity_stats.dynamic import published_policy
    from attnlab.sparsity_stats.masks import compile_for_input

    n, d = 128, 16
    q = torch.zeros(4, n, d)
    k = torch.zeros(2, n, d)
    # KV head 1: key 40 stands out for the last queries only (pooled q/k can't see it)
    q[2:, -16:, 0] = 8.0
    k[1, 40, 0] = 8.0
    policy = published_policy(tiny_llama, "flexprefill", block_size=16, gamma=0.9, delta=0.1)
    layout = compile_for_input(policy, 0, q, k)
    names = layout.head_names
    assert names[0].startswith("flexprefill_query_aware") and names[1].startswith("flexprefill_query_aware")
    assert names[2].startswith("flexprefill_vertical_slash") and names[3].startswith("flexprefill_vertical_slash")
    assert layout.block_mask()[2, -1, 40 // 16], "the column the last queries attend is kept"


def test_eval_runs_the_published_baselines(tiny_llama, tmp_path, capsys):
    from attnlab.cli import main
    from attnlab.runs import EVAL_SAMPLES, Run

    model_dir = tmp_path / "model"
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tiny_llama.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    argv = ["eval", "--model", str(model_dir), "--tasks", "niah_noise", "--lengths", "200", "--samples", "1",
            "--baseline", "xattention", "--baseline", "flexprefill:gamma=0.8", "--baseline-block-size", "16",
            "--executor", "reference", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    table = Run.open(tmp_path / "run").read(EVAL_SAMPLES)
    assert list(table.method) == ["dense", "xattention", "flexprefill:gamma=0.8"]
    assert (table.density[1:] < 1.0).all() and (table.density[1:] > 0).all()
    assert main([*argv[:-3], "--baseline", "minference", "--out", str(tmp_path / "r2")]) == 2
    assert "unknown kind 'minference'" in capsys.readouterr().err

    # the baselines with layer 1 dense: their own names, and more of the map kept than without
    assert main([*argv[:-3], "--baseline-dense-layers", "1", "--out", str(tmp_path / "r3"), "--quiet"]) == 0
    dense1 = Run.open(tmp_path / "r3").read(EVAL_SAMPLES)
    assert list(dense1.method) == ["dense", "xattention[dense1]", "flexprefill[dense1]:gamma=0.8"]
    assert (dense1.density.to_numpy()[1:] > table.density.to_numpy()[1:]).all()
    assert main([*argv[:-3], "--baseline-dense-layers", "2", "--out", str(tmp_path / "r4")]) == 2
    assert "dense layer(s) [2] outside the model's layers 0-1" in capsys.readouterr().err
    assert not (tmp_path / "r4").exists()
    no_baseline = [a for a in argv if a not in ("--baseline", "xattention", "flexprefill:gamma=0.8")]
    assert main([*no_baseline[:-3], "--baseline-dense-layers", "1", "--out", str(tmp_path / "r5")]) == 2
    assert "--baseline-dense-layers applies to the --baseline methods" in capsys.readouterr().err


def test_published_baselines_keep_the_given_layers_dense(tiny_llama):
    """dense_layers: those layers' heads are dense (the full causal map at run time), the other
    layers run the method; the name gives the layers in --protect-layers' form."""
    from attnlab.cliargs import layers_text
    from attnlab.sparsity_stats.dynamic import baseline_name, published_policy
    from attnlab.sparsity_stats.evaluate import method_family
    from attnlab.sparsity_stats.masks import compile_for_input

    policy = published_policy(tiny_llama, "xattention", block_size=16, dense_layers=[1], tau=0.5)
    assert {h.layer: h.kind for h in policy.heads} == {0: "xattention", 1: "dense"}
    assert policy.budget == {"method": "xattention", "dense_layers": [1]}
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 128, 16, generator=g) * 2, torch.randn(2, 128, 16, generator=g) * 2
    causal = torch.ones(8, 8, dtype=torch.bool).tril().expand(4, 8, 8)
    assert torch.equal(compile_for_input(policy, 1, q, k).block_mask(), causal)
    assert compile_for_input(policy, 0, q, k).block_mask().sum() < causal.sum(), "tau 0.5 drops blocks in layer 0"
    assert layers_text([8, 6, 7, 12, 14, 15]) == "6-8,12,14-15"
    name = baseline_name("xattention", {"tau": 0.7}, [6, 7, 8])
    assert name == "xattention[dense6-8]:tau=0.7" and method_family(name) == "xattention[dense6-8]"
    assert baseline_name("flexprefill", {}, []) == "flexprefill"
    from attnlab.sparsity_stats.dynamic import parse_baseline_name

    assert parse_baseline_name(name) == ("xattention", {"tau": 0.7}, [6, 7, 8])
    assert parse_baseline_name("flexprefill:gamma=0.8") == ("flexprefill", {"gamma": 0.8}, [])


def _planted(n_kv=2, n_heads=4):
    """q/k (128 tokens, 16-token blocks) where the last query block reads one key token in block 3
    that block 3's other keys cancel in the mean, while block 5's keys lean a little towards it
    on average: the mean-pooled estimate prefers block 5, the antidiagonals block 3."""
    g = torch.Generator().manual_seed(1)
    d = 16
    q = torch.randn(n_heads, 128, d, generator=g) * 0.1
    k = torch.randn(n_kv, 128, d, generator=g) * 0.1
    q[:, 112:, 0] = 4.0
    k[:, 48, 0] = 40.0
    k[:, 49:64, 0] = -40.0 / 15
    k[:, 80:96, 0] += 2.0
    return q, k


def test_block_topk_under_the_antidiagonal_rule_keeps_the_top_k_of_xattentions_scores(tiny_llama):
    """The same top-k (3 blocks), two estimates: the default mean-pooled one keeps block 5 in the
    last row, the antidiagonal one the planted block 3, and its whole mask is the top-k of
    `antidiagonal_block_scores` at the head's stride."""
    from attnlab.sparsity_stats.kinds import select_block_topk
    from attnlab.sparsity_stats.masks import compile_for_input
    from attnlab.sparsity_stats.policy import uniform_policy

    q, k = _planted()
    anti = uniform_policy(tiny_llama, "block_topk", {"topk": 48, "estimate": {"rule": "antidiagonal", "stride": 4}}, block_size=16)
    pooled = uniform_policy(tiny_llama, "block_topk", {"topk": 48}, block_size=16)
    got, base = compile_for_input(anti, 0, q, k).block_mask(), compile_for_input(pooled, 0, q, k).block_mask()
    assert torch.equal(got, select_block_topk(antidiagonal_block_scores(q, k, 16, stride=4), topk_blocks=3))
    assert got[:, -1].nonzero()[:, 1].tolist() == [0, 3, 7] * 4
    assert base[:, -1].nonzero()[:, 1].tolist() == [0, 5, 7] * 4
    assert got.sum() == base.sum(), "the rule changes which blocks, not how many"


def test_each_head_gets_the_antidiagonal_stride_it_asks_for(tiny_llama):
    """One layer mixing an XAttention head (stride 2), antidiagonal top-k heads (strides 4 and 8)
    and a mean-pooled one: each head's row of the layer's antidiagonal scores is its own stride's."""
    from attnlab.sparsity_stats.masks import estimate_layer_scores
    from attnlab.sparsity_stats.policy import Policy, uniform_policy

    d = uniform_policy(tiny_llama, "block_topk", {"topk": 48, "estimate": {"rule": "antidiagonal", "stride": 4}}, block_size=16).to_dict()
    layer0 = {h["head"]: h for h in d["heads"] if h["layer"] == 0}
    layer0[1]["params"]["estimate"]["stride"] = 8
    layer0[2].update(kind="xattention", params={"tau": 0.9, "stride": 2})
    layer0[3]["params"] = {"topk": 48}
    q, k = _planted()
    scores = estimate_layer_scores(Policy.from_dict(d), 0, q, k)
    for head, stride in {0: 4, 1: 8, 2: 2}.items():
        assert torch.allclose(scores.antidiagonal[head], antidiagonal_block_scores(q, k, 16, stride=stride)[head]), head
    assert not torch.allclose(scores.antidiagonal[0], scores.antidiagonal[1])


@pytest.mark.parametrize(("estimate", "match"), [
    ({"rule": "antidiagonal", "stride": 32}, r"layer 0 head 0: field 'params.estimate.stride' is 32, which does not divide the block size 16"),
    ({"rule": "antidiagonal", "stride": 3}, r"field 'params.estimate.stride' must be one of 1, 2, 4, 8, 16, 32, 64, got 3"),
    ({"rule": "antidiagonal", "pool": "mean"}, r"field 'params.estimate.pool' is not a field of rule 'antidiagonal'"),
    ({"rule": "strided"}, r"use 'pooled_qk' or 'antidiagonal'"),
])
def test_a_bad_antidiagonal_estimate_is_refused_when_the_policy_loads(tiny_llama, estimate, match):
    from attnlab.sparsity_stats.errors import PolicyError
    from attnlab.sparsity_stats.policy import uniform_policy

    with pytest.raises(PolicyError, match=match):
        uniform_policy(tiny_llama, "block_topk", {"topk": 48, "estimate": estimate}, block_size=16)


def test_an_xattention_stride_that_does_not_divide_the_block_size_is_refused_when_the_policy_loads(tiny_llama):
    from attnlab.sparsity_stats.errors import PolicyError
    from attnlab.sparsity_stats.policy import uniform_policy

    with pytest.raises(PolicyError, match=r"field 'params.stride' is 32, which does not divide the block size 16 \(antidiagonals are scored within blocks\); use a stride that divides 16, e.g. 8"):
        uniform_policy(tiny_llama, "xattention", {"tau": 0.9, "stride": 32}, block_size=16)
