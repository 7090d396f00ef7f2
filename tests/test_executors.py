"""Executors agree with each other and with dense attention; validation reports and restores."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from attnlab.errors import AttnlabError
from attnlab.names import attn_hook
from attnlab.runs import VALIDATION_HEADS, VALIDATION_SUMMARY
from attnlab.sparsity_stats.executors import EXECUTORS, run_with_policy
from attnlab.sparsity_stats.policy import POLICY_FORMAT, POLICY_SCHEMA, Policy
from attnlab.sparsity_stats.validation import validate_policy

MIXED = [
    ("dense", {}),
    ("streaming", {"sink": 4, "window": 24}),
    ("block_topk", {"topk": 2}),
    ("vertical_slash", {"vertical": 2, "slash": 2}),
    ("a_shape", {"sink": 16, "window": 32}),
]


def make_policy(model, kinds=MIXED, block_size=16) -> Policy:
    """Every head gets a kind, cycling through ``kinds`` (all of the vocabulary by default)."""
    heads = []
    i = 0
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            kind, params = kinds[i % len(kinds)]
            i += 1
            heads.append({"layer": layer, "head": head, "kv_head": model.kv_head(head), "kind": kind, "params": params})
    return Policy.from_dict(
        {"format": POLICY_FORMAT, "schema": POLICY_SCHEMA, "model": model.identity().to_dict(), "block_size": block_size, "heads": heads}
    )


def logits_under(model, policy, executor, ids):
    with torch.no_grad(), run_with_policy(model, policy, executor) as ex:
        out = model.hf_model(ids, use_cache=False).logits
    return out, ex


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_executors_agree_with_each_other(request, model_name):
    model = request.getfixturevalue(model_name)
    policy = make_policy(model)
    ids = random_ids(83, seed=4)
    ref, ex = logits_under(model, policy, "reference", ids)
    dens = torch.cat([ex.layouts_[layer].density for layer in range(model.n_layers)])
    assert (dens < 1).any() and (dens == 1).any(), "the mixed policy must really be sparse on some heads"
    for name in ("flex", "triton"):
        got, _ = logits_under(model, policy, name, ids)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        dense = model.hf_model(ids).logits
    assert (dense - ref).abs().max() > 1e-3, "a sparse policy should change the logits"


@pytest.mark.parametrize("executor", EXECUTORS)
def test_all_dense_policy_equals_dense_model(tiny_llama, executor):
    policy = make_policy(tiny_llama, kinds=[("dense", {})])
    ids = random_ids(70, seed=5)
    with torch.no_grad():
        dense = tiny_llama.hf_model(ids).logits
    got, _ = logits_under(tiny_llama, policy, executor, ids)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)


def test_policy_for_another_model_is_refused(tiny_llama, tiny_gpt2):
    policy = make_policy(tiny_llama)
    policy.model = {**policy.model, "n_heads": 8}
    with pytest.raises(AttnlabError, match="(is|was made) for model"):
        with run_with_policy(tiny_gpt2, policy, "flex"):
            pass
    with pytest.raises(AttnlabError, match="unknown executor"):
        with run_with_policy(tiny_llama, make_policy(tiny_llama), "cuda-magic"):
            pass


def test_validation_report_and_restore(tiny_llama, tmp_path):
    from attnlab.prompts import builtin_prompts

    policy = make_policy(tiny_llama)
    ids = random_ids(64, seed=6)
    with torch.no_grad():
        before = tiny_llama.bridge(ids)
    prompts = builtin_prompts(tiny_llama.tokenizer, [96], 2, seed=9)
    report = validate_policy(tiny_llama, policy, executor="flex", prompts=prompts, out=tmp_path / "v", progress=False)
    with torch.no_grad():
        after = tiny_llama.bridge(ids)
    assert torch.equal(before, after), "dense attention must be restored after validation"
    heads = report.heads
    assert len(heads) == tiny_llama.n_layers * tiny_llama.n_heads
    dense_rows = heads[heads["kind"] == "dense"]
    assert (dense_rows["rel_l2"] < 1e-5).all() and (dense_rows["density"] == 1).all()
    sparse_rows = heads[heads["density"] < 1]
    assert (sparse_rows["rel_l2"] > 0).all()
    s = report.summary
    assert s["kl_mean"] > 0 and s["ppl_dense"] > 1 and s["ppl_sparse"] > 1
    assert 0 < s["density_mean"] < 1
    assert (tmp_path / "v" / VALIDATION_HEADS).is_file() and (tmp_path / "v" / VALIDATION_SUMMARY).is_file()
    assert report.run is not None and report.run.read(VALIDATION_HEADS).shape[0] == len(heads)
    assert report.run.read(VALIDATION_SUMMARY)["executor"] == "flex"
    assert "perplexity" in report.format() and "attention mass kept" in report.format()
    assert 0 < s["recall_min"] <= s["recall_mean"] < 1
    assert (dense_rows["recall"] > 1 - 1e-6).all() and heads["expected_recall"].notna().sum() == 0  # hand-made policy


@pytest.mark.slow
def test_executors_agree_on_embedded_model(embedded):
    policy = make_policy(embedded, block_size=64)
    ids = embedded.encode("In the quiet harbour town the fishermen counted their nets. " * 20)[:, :200]
    ref, ex = logits_under(embedded, policy, "reference", ids)
    assert torch.cat([lay.density for lay in ex.layouts_.values()]).min() < 1
    for name in ("flex", "triton"):
        got, _ = logits_under(embedded, policy, name, ids)
        torch.testing.assert_close(got, ref, atol=5e-4, rtol=1e-4)


def test_needle_accuracy_under_an_all_dense_policy_matches_dense(tiny_llama):
    """Sparse prefill with a policy that keeps everything answers exactly as dense does."""
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.validation import needle_accuracy

    ex = PolicyExecutor(make_policy(tiny_llama, kinds=[("dense", {})]), "reference")
    rows = needle_accuracy(tiny_llama, ex, 2, 200, progress=False)
    assert len(rows) == 2
    for r in rows:
        assert r["dense"] == r["sparse"]
        assert isinstance(r["correct_dense"], bool) and r["correct_dense"] == r["correct_sparse"]
        assert r["prefill_density"] == 1.0 and r["prefill_tokens"] > 100
    assert ex.layouts_, "the policy's prefill must have run through the executor"


@pytest.mark.parametrize("executor", ["flex", "reference"])
def test_head_errors_recall_is_the_dense_mass_the_layout_keeps(tiny_llama, executor):
    """``recall`` per head = mean over rows of the dense attention mass on the kept keys, checked
    against the bridge's own attention patterns (flex on a CPU has no LSE: the token-mask path)."""
    from attnlab.sparsity_stats.executors import PolicyExecutor
    from attnlab.sparsity_stats.validation import head_errors

    model = tiny_llama
    policy = make_policy(model, kinds=[("streaming", {"sink": 4, "window": 24}), ("dense", {}), ("block_topk", {"topk": 2})])
    ex = PolicyExecutor(policy, executor)
    ids = random_ids(90, seed=11)
    table = head_errors(model, ex, ids)
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids)
    for layer in range(model.n_layers):
        pattern = cache[attn_hook(layer, "hook_pattern")][0].double()  # [H, n, n]
        kept = ex.layouts_[layer].token_mask().to(pattern.device)
        want = (pattern * kept).sum(-1).mean(-1)
        got = torch.tensor(table[table["layer"] == layer].sort_values("head")["recall"].to_numpy(), dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (table.loc[table["kind"] == "dense", "recall"] > 1 - 1e-6).all()
    assert (table.loc[table["kind"] == "streaming", "recall"] < 0.999).all()


def test_policy_label_names_a_baseline(tiny_llama):
    from attnlab.sparsity_stats.validation import _policy_label

    policy = make_policy(tiny_llama)
    policy.budget = {"kind": "density", "value": 0.3}
    assert _policy_label(policy) == "from a file at budget 0.3"
    policy.budget = {"kind": "density", "value": 0.3, "method": "minference"}
    assert _policy_label(policy) == "minference baseline from a file at budget 0.3"


def test_validate_cli_refuses_bad_values_before_any_work(capsys):
    """`attnlab validate` comes from sparsity_stats.validate_cli; argparse refuses out-of-range
    values and unknown executors (exit 2) instead of replacing them."""
    from attnlab.cli import build_parser
    from attnlab.sparsity_stats import validate_cli

    parser = build_parser()
    args = parser.parse_args(["validate", "p.json", "--out", "r", "--executor", "triton", "--needle", "3"])
    assert args.func is validate_cli._cmd_validate and args.executor == "triton" and args.needle == 3
    assert args.model and args.device == "cpu" and args.prompts == 2 and args.tokens == 1024
    for bad in (["--needle", "-3"], ["--executor", "cuda-magic"], ["--tokens", "0"], ["--prompts", "two"],
                ["--needle-length", "-1"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["validate", "p.json", "--out", "r", *bad])
        assert exc.value.code == 2, bad
    assert "invalid choice: 'cuda-magic'" in capsys.readouterr().err


def test_model_window_is_anded_into_a_compiled_layout():
    """A window layer's layout keeps exactly the policy's pairs that the model's window shows."""
    from attnlab.kernels.layout import BlockSparseLayout
    from attnlab.sparsity_stats.executors import with_model_window

    g = torch.Generator().manual_seed(0)
    kept = torch.rand(3, 5, 5, generator=g) > 0.4
    lay = BlockSparseLayout.from_block_masks(kept, block_size=8, n_q=37, n_k=37, sink=[0, 4, 2], window=[0, 12, 30])
    windowed = with_model_window(lay, 10)
    assert windowed.model_window == 10 and with_model_window(lay, 0) is lay and with_model_window(windowed, 10) is windowed
    i, j = torch.arange(37)[:, None], torch.arange(37)[None, :]
    assert torch.equal(windowed.token_mask(), lay.token_mask() & (i - j < 10))
    assert (windowed.kept_blocks() <= lay.kept_blocks()).all()
