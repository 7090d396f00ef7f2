"""The policy KV cache (issue 15): a transformers Cache holding a different number of tokens per
KV head, equal to Hugging Face's DynamicCache when every head keeps everything, evicting what
the decode policy says (with the positions the tokens had), and accounting its bytes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnlab.attention import route_attention, sdpa
from attnlab.errors import AttnlabError
from attnlab.models import forward_with_cache
from attnlab.sparsity_stats import kvcache as kc
from attnlab.sparsity_stats.policy import DecodeHead, HeadPolicy, Policy


def dense_policy(model) -> Policy:
    """A dense prefill policy for ``model`` (no decode section: every head keeps everything)."""
    heads = [HeadPolicy(la, h, h // model.group_size, "dense", {}) for la in range(model.n_layers) for h in range(model.n_heads)]
    return Policy(model.identity().to_dict(), 16, heads)


def prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(100, 1000, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_scores(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain Hugging Face generate (the model's own attention, a DynamicCache): tokens and per-step logits."""
    out = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, ids.shape[1]:], torch.cat(out.scores)


def test_an_all_full_decode_policy_equals_the_dynamic_cache_at_every_step(tiny_llama):
    ids = prompt(40)
    want_tokens, want = hf_scores(tiny_llama, ids, 12)
    for policy in (dense_policy(tiny_llama), dense_policy(tiny_llama).with_decode(
            [DecodeHead.make(la, kv) for la in range(tiny_llama.n_layers) for kv in range(tiny_llama.n_kv_heads)])):
        got = kc.greedy_decode(tiny_llama, ids, policy, 12)
        assert isinstance(got.cache, kc.PolicyCache)
        assert (got.logits - want).abs().max() <= 1e-5
        assert got.tokens == want_tokens.tolist()
        # the same attention function over a DynamicCache: identical
        dense = kc.greedy_decode(tiny_llama, ids, None, 12)
        assert (got.logits - dense.logits).abs().max() <= 1e-5
        assert got.cache.get_seq_length() == 40 + 11 and got.cache.tokens_held() == [[51, 51], [51, 51]]
    tokens, cache = kc.generate(tiny_llama, ids, dense_policy(tiny_llama), max_new_tokens=12)
    assert tokens[0, 40:].tolist() == want_tokens.tolist()


def _decode_heads(model, table):
    return [DecodeHead.make(la, kv, *table.get((la, kv), ("full", {}))[:1], **table.get((la, kv), ("full", {}))[1])
            for la in range(model.n_layers) for kv in range(model.n_kv_heads)]


def test_streaming_eviction_by_hand_keeps_sink_and_recent_at_their_positions(tiny_llama):
    n, steps, sink, recent = 30, 9, 3, 6
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (0, 1): ("streaming", {"sink": sink, "recent": recent}), (1, 0): ("streaming", {"sink": 0, "recent": 4})}))
    got = kc.greedy_decode(tiny_llama, prompt(n), policy, steps)
    cache = got.cache
    seen = n + steps - 1  # the last token chosen is not fed
    assert cache.get_seq_length() == seen
    assert cache.positions(0, 1) == [0, 1, 2] + list(range(seen - recent, seen))
    assert cache.positions(1, 0) == list(range(seen - 4, seen))
    assert cache.positions(0, 0) == list(range(seen)) and cache.tokens_held() == [[seen, sink + recent], [4, seen]]

    # the same logits as dense attention over a full cache with exactly those keys masked in at
    # every step: evicted tokens are gone, kept ones keep their RoPE positions
    def masked(layer, query, key, value, *, scaling, attention_mask=None):
        n_q, n_k = query.shape[-2], key.shape[-2]
        if n_q == n_k:
            return sdpa(query, key, value, scaling=scaling)
        j = torch.arange(n_k)
        keep = torch.ones(key.shape[1], n_k, dtype=torch.bool)
        if layer == 0:
            keep[1] = (j < sink) | (j >= n_k - recent)
        else:
            keep[0] = j >= n_k - 4
        mask = keep.repeat_interleave(tiny_llama.group_size, dim=0)[None, :, None, :]
        k = key.repeat_interleave(tiny_llama.group_size, dim=1)
        v = value.repeat_interleave(tiny_llama.group_size, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling).transpose(1, 2)

    with torch.no_grad():
        ref = kc.greedy_decode(tiny_llama, prompt(n), None, steps, prefill=None)  # dense, for the token sequence
        from transformers import DynamicCache

        cache_ref = DynamicCache(config=tiny_llama.hf_model.config)
        logits = []
        feed = prompt(n)
        with route_attention(tiny_llama, masked):
            for token in got.tokens:
                out = forward_with_cache(tiny_llama.hf_model, feed, cache_ref, logits_to_keep=1).logits[0, -1]
                logits.append(out)
                feed = torch.tensor([[token]])
    assert (torch.stack(logits) - got.logits).abs().max() <= 1e-5
    assert not torch.equal(ref.logits[1:], got.logits[1:])  # eviction changed something


def test_snapkv_keeps_sink_window_and_the_top_pooled_keys(tiny_llama):
    n, budget, window, kernel, sink = 48, 16, 4, 3, 2
    head = DecodeHead.make(0, 0, "snapkv", budget=budget, window=window, kernel=kernel, sink=sink)
    scores = torch.zeros(n)
    scores[[10, 20, 21, 33]] = torch.tensor([5.0, 4.0, 3.0, 2.0])
    keep = kc.snapkv_keep(head, n, scores).tolist()
    assert keep[:2] == [0, 1] and keep[-4:] == [44, 45, 46, 47] and len(keep) == budget
    assert {10, 20, 21, 33} <= set(keep)

    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (1, 1): ("snapkv", {"budget": budget, "window": window, "kernel": kernel, "sink": sink})}))
    captured = {}

    def grab(layer, query, key, value, *, scaling, attention_mask=None):
        if layer == 1 and query.shape[-2] == key.shape[-2]:
            captured["q"], captured["k"], captured["scale"] = query, key.clone(), scaling  # the cache reuses its buffer
        return sdpa(query, key, value, scaling=scaling)

    got = kc.greedy_decode(tiny_llama, prompt(n), policy, 3, prefill=grab)
    # the selection by hand: softmax of the last `window` queries of the group, summed, max-pooled
    q, k = captured["q"][0, 2:4, -window:].float(), captured["k"][0, 1].float()
    logits = q @ k.T * captured["scale"]
    q_pos = torch.arange(n - window, n)
    logits = logits.masked_fill(torch.arange(n)[None, :] > q_pos[:, None], -math.inf)
    s = logits.softmax(-1).sum((0, 1))
    pooled = torch.stack([s[max(0, i - 1):i + 2].max() for i in range(n)])
    pooled[:sink] = -1
    pooled[n - window:] = -1
    chosen = set(torch.topk(pooled, budget - sink - window).indices.tolist())
    want = sorted(set(range(sink)) | set(range(n - window, n)) | chosen)
    kept = got.cache.positions(1, 1)
    assert kept[:budget] == want and kept[budget:] == [n, n + 1]  # generated tokens are all kept
    assert got.cache.layers[1].prompt_tokens == n


def test_kv_bytes_held_equal_the_policys_prediction(tiny_llama):
    n, steps = 64, 6
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (0, 0): ("streaming", {"sink": 4, "recent": 8}),
        (0, 1): ("snapkv", {"budget": {"alpha": 0, "beta": 0.25}, "window": 4, "kernel": 3, "sink": 2}),
        (1, 1): ("streaming", {"sink": 0, "recent": 100})}))
    cache = kc.greedy_decode(tiny_llama, prompt(n), policy, steps).cache
    seen = n + steps - 1
    per_token = 2 * tiny_llama.head_dim * 4  # keys and values, fp32
    assert cache.dense_bytes() == tiny_llama.n_layers * tiny_llama.n_kv_heads * seen * per_token
    held = (12 + (16 + steps - 1) + seen + seen) * per_token
    report = cache.kv_report()
    assert report["kv_bytes_held"] == held == report["kv_bytes_predicted"]
    assert report["kv_bytes_predicted"] == policy.predicted_kv_tokens(n, steps - 1) * per_token
    assert report["kv_fraction"] == pytest.approx(held / cache.dense_bytes()) and report["kv_vs_predicted"] == 1.0
    full = kc.greedy_decode(tiny_llama, prompt(n), dense_policy(tiny_llama), steps).cache
    assert full.bytes_held() == full.dense_bytes() == full.predicted_bytes()


def test_generate_with_sampling_runs_and_is_seeded(tiny_llama):
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {(0, 0): ("streaming", {"sink": 2, "recent": 8})}))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        tokens, cache = kc.generate(tiny_llama, prompt(24), policy, max_new_tokens=10, do_sample=True, top_k=50, temperature=1.5)
        runs.append(tokens)
        assert tokens.shape == (1, 34) and cache.tokens_held()[0][0] == 10
    assert torch.equal(runs[0], runs[1])


def test_bad_input_is_one_line(tiny_llama):
    policy = dense_policy(tiny_llama)
    with pytest.raises(AttnlabError, match="batch 1"):
        kc.greedy_decode(tiny_llama, torch.randint(100, 1000, (2, 8)), policy, 2)
    with pytest.raises(AttnlabError, match="loop over samples"):  # batch > 1 needs a policy's cache
        kc.generate(tiny_llama, torch.randint(100, 1000, (2, 8)), None, max_new_tokens=2)
    with pytest.raises(AttnlabError, match="not left-padded"):
        kc.generate(tiny_llama, torch.randint(100, 1000, (2, 8)), policy, max_new_tokens=2,
                    attention_mask=torch.tensor([[1] * 8, [1] * 7 + [0]]))
    with pytest.raises(AttnlabError, match=r"beyond tiny-llama's context of 512"):
        kc.greedy_decode(tiny_llama, prompt(500), policy, 20)
    other = Policy({**tiny_llama.identity().to_dict(), "n_layers": 3, "fingerprint": None}, 16,
                   [HeadPolicy(la, h, h // 2, "dense", {}) for la in range(3) for h in range(4)])
    with pytest.raises(AttnlabError, match="n_layers"):
        kc.generate(tiny_llama, prompt(8), other, max_new_tokens=2)


@pytest.mark.slow
def test_the_embedded_model_with_a_full_decode_policy_equals_the_dynamic_cache(embedded):
    ids = embedded.encode("The quick brown fox jumps over the lazy dog. " * 8)
    want_tokens, want = hf_scores(embedded, ids, 16)
    got = kc.greedy_decode(embedded, ids, dense_policy(embedded), 16)
    # the plain model attends with its eager kernel: the same up to fp32 rounding (logits of ~30)
    assert (got.logits - want).abs().max() <= 1e-4
    dense = kc.greedy_decode(embedded, ids, None, 16)  # a DynamicCache under the same attention function
    assert (got.logits - dense.logits).abs().max() <= 1e-5
    assert got.tokens == want_tokens.tolist() == dense.tokens


# -- validation in generation -----------------------------------------------------------------
def test_validate_decode_pairs_dense_and_compressed_and_writes_the_run(tmp_path, tiny_llama):
    from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, Run
    from attnlab.sparsity_stats.decode_validation import validate_decode

    full = validate_decode(tiny_llama, dense_policy(tiny_llama), n_prompts=1, prompt_tokens=64, new_tokens=8, progress=False)
    s = full.summary
    assert s["token_match"] == 1.0 and s["first_divergence"] == 8 and s["kl_mean"] <= 1e-6 and s["forced_agreement"] == 1.0
    assert s["kv_fraction"] == 1.0 and s["kv_vs_predicted"] == 1.0 and "decode keeps the full KV cache" in s["note"]

    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (la, kv): ("streaming", {"sink": 2, "recent": 8}) for la in range(2) for kv in range(2)}))
    report = validate_decode(tiny_llama, policy, n_prompts=2, prompt_tokens=64, new_tokens=8, needle_samples=2,
                             needle_length=160, out=tmp_path / "run", progress=False)
    s = report.summary
    assert s["n_prompts"] == 2 and s["needle_n"] == 2 and s["note"] is None
    assert s["kv_vs_predicted"] == 1.0 and s["kv_fraction"] < 0.2  # 10 tokens of 71 per head on continuations
    assert 0 <= s["token_match"] <= 1 and s["kl_mean"] > 0
    assert s["needle_both"] + s["needle_dense_only"] + s["needle_compressed_only"] + s["needle_neither"] == 2
    run = Run.open(tmp_path / "run")
    rows = run.read(DECODE_SAMPLES)
    assert list(rows["task"]) == ["continuation", "continuation", "needle", "needle"]
    assert (rows["kv_bytes_held"] == rows["kv_bytes_predicted"]).all()
    assert run.read(DECODE_SUMMARY)["policy_file"]["decode"]["heads"][0]["kind"] == "streaming"
    assert "phase decode" in report.format() or "decode phase" in report.format()


def test_validate_cli_phase_decode(tmp_path, tiny_llama, monkeypatch, capsys):
    from attnlab.cli import main
    from attnlab.runs import DECODE_SUMMARY, VALIDATION_SUMMARY, Run
    from attnlab.sparsity_stats import validate_cli

    monkeypatch.setattr(validate_cli, "load_model_from_args", lambda args: tiny_llama)
    path = dense_policy(tiny_llama).save(tmp_path / "p.json")
    assert main(["validate", str(path), "--phase", "decode", "--prompts", "1", "--tokens", "48", "--new-tokens", "4",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: the policy has no decode phase" in out and "token match 1.000" in out
    run = Run.open(tmp_path / "r")
    assert run.has(DECODE_SUMMARY) and not run.has(VALIDATION_SUMMARY)
    assert main(["validate", str(path), "--phase", "decode", "--tokens", "510", "--new-tokens", "4",
                 "--model", "x", "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "beyond tiny-llama's context of 512" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_generate_cli_prints_both_continuations_with_cache_sizes(tmp_path, tiny_llama, monkeypatch, capsys):
    from attnlab.cli import main
    from attnlab.sparsity_stats import validate_cli

    monkeypatch.setattr(validate_cli, "load_model_from_args", lambda args: tiny_llama)
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (la, kv): ("streaming", {"sink": 2, "recent": 6}) for la in range(2) for kv in range(2)}))
    path = policy.save(tmp_path / "p.json")
    assert main(["generate", str(path), "--prompt", "The quick brown fox jumps over the lazy dog. " * 3,
                 "--max-new-tokens", "6", "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "--- dense (full KV cache:" in out and "--- compressed (" in out
    assert "the policy predicts" in out and "note:" not in out
    assert main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "600"]) == 2
    assert "beyond tiny-llama's context of 512" in capsys.readouterr().err
    assert main(["generate", str(path), "--prompt", "The quick brown fox jumps over the lazy dog. " * 3,
                 "--max-new-tokens", "6", "--no-chat", "--prefill-chunk", "8"]) == 0
    chunked = capsys.readouterr().out
    assert "prefill in chunks of 8 tokens" in chunked and "--- compressed (" in chunked
    assert chunked.split("--- dense")[1].splitlines()[1] == out.split("--- dense")[1].splitlines()[1]  # dense: the same text
    with pytest.raises(SystemExit):
        main(["generate", str(path), "--prompt", "x", "--prefill-chunk", "0"])
    assert "--prefill-chunk" in capsys.readouterr().err


def test_an_all_streaming_cache_allocates_less_than_a_full_one(tiny_llama):
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (la, kv): ("streaming", {"sink": 4, "recent": 12}) for la in range(2) for kv in range(2)}))
    cache = kc.greedy_decode(tiny_llama, prompt(400), policy, 40).cache
    assert cache.tokens_held() == [[16, 16], [16, 16]]
    per_token = 2 * tiny_llama.head_dim * 4
    # the buffers shrank at the end of prefill and never grew: a decode step overwrites in place
    assert cache.bytes_allocated() == 2 * 2 * (16 + 64) * per_token < cache.dense_bytes() / 4
    assert cache.kv_report()["kv_bytes_allocated"] == cache.bytes_allocated()


def test_validate_cli_phase_both_writes_both_reports(tmp_path, tiny_llama, monkeypatch, capsys):
    from attnlab.cli import main
    from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, VALIDATION_SUMMARY, Run
    from attnlab.sparsity_stats import decode_validation, validate_cli, validation

    monkeypatch.setattr(validate_cli, "load_model_from_args", lambda args: tiny_llama)
    seen = {"prefill": [], "decode": []}  # the prompt ids each phase measured
    head_errors, continuation_row = validation.head_errors, decode_validation.continuation_row
    monkeypatch.setattr(validation, "head_errors", lambda m, ex, ids: seen["prefill"].append(ids.tolist()) or head_errors(m, ex, ids))
    monkeypatch.setattr(decode_validation, "continuation_row",
                        lambda m, p, ids, *a, **k: seen["decode"].append(ids.tolist()) or continuation_row(m, p, ids, *a, **k))
    d = dense_policy(tiny_llama).to_dict()
    d["heads"][0].update(kind="streaming", params={"sink": 4, "window": 16})
    d["schema"] = 2
    d["decode"] = {"heads": [{"layer": la, "kv_head": kv, "kind": "streaming", "params": {"sink": 4, "recent": 16}}
                             for la in range(2) for kv in range(2)]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    assert main(["validate", str(path), "--phase", "both", "--executor", "reference", "--prompts", "1", "--tokens", "64",
                 "--new-tokens", "4", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "achieved density" in out and "prefill under the policy, reference executor" in out and "note:" not in out
    run = Run.open(tmp_path / "r")
    assert run.has(VALIDATION_SUMMARY) and run.has(DECODE_SUMMARY)
    assert run.read(DECODE_SUMMARY)["phase"] == "both" and len(run.read(DECODE_SAMPLES)) == 1
    # both phases measured the same 64-token prompt: the one whose next 4 tokens decode scores
    assert len(seen["prefill"][0][0]) == 64 and seen["prefill"] == seen["decode"]


# -- HeadKV- and RazorAttention-style baselines -------------------------------------------------
@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    from attnlab.sparsity_stats import compute_curves, make_synthetic_run

    run = make_synthetic_run(tmp_path_factory.mktemp("runs") / "r1", n_layers=2, n_heads=4, n_kv_heads=2,
                             lengths=(512, 384), block_size=16, retrieval_heads=((1, 3),))
    return compute_curves(run)


def test_headkv_budgets_by_hand():
    from attnlab.sparsity_stats.baselines import headkv_budgets

    # 24 tokens beyond the minimum, shared 3:1 by the two scored heads
    assert headkv_budgets(np.array([3.0, 1.0, 0.0, 0.0]), 40, 4, 100).tolist() == [22, 10, 4, 4]
    # a head at its cap passes the rest on, first to the scored heads, then equally
    assert headkv_budgets(np.array([3.0, 1.0, 0.0, 0.0]), 40, 4, 12).tolist() == [12, 12, 8, 8]
    assert headkv_budgets(np.array([1.0, 1.0, 1.0]), 22, 4, 100).tolist() == [8, 7, 7]  # whole tokens, largest remainders
    assert headkv_budgets(np.zeros(2), 10, 4, 100).tolist() == [5, 5]  # no scores: equal
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.random(12) * (rng.random(12) > 0.3)
        total, minimum = int(rng.integers(12 * 6, 12 * 60)), 6
        b = headkv_budgets(s, total, minimum, 10_000)
        assert b.sum() == total and (b >= minimum).all()
        if s.sum() > 0:
            assert np.abs((b - minimum) - (total - 12 * minimum) * s / s.sum()).max() < 1  # in proportion, within rounding
    with pytest.raises(ValueError, match="below the minimum"):
        headkv_budgets(np.ones(4), 15, 4, 100)


def test_headkv_and_razor_baselines_at_the_same_kv_budget(curves):
    from attnlab.sparsity_stats.baselines import kv_baselines

    n = max(curves.estimator.eval_lengths)
    for budget in (0.3, 0.5):
        base = kv_baselines(curves, budget, retrieval_scores=curves.retrieval_scores)
        assert {"headkv", "razor"} <= set(base)
        for name in ("headkv", "razor"):
            policy = base[name]
            assert policy.has_decode and policy.budget["method"] == name and policy.budget["kind"] == "kv"
            assert {h.kind for h in policy.heads} == {"dense"}  # dense prefill
            assert policy.predicted_kv_fraction(n) <= budget + 1e-9
        head = base["headkv"]
        tokens = {(e.layer, e.kv_head): e.prompt_tokens_kept(n) for e in head.decode_heads()}
        assert {e.kind for e in head.decode_heads()} == {"snapkv"}
        assert sum(tokens.values()) == int(budget * n * 4)  # the whole budget, in whole tokens
        minimum = {e.params["sink"] + e.params["window"] for e in head.decode_heads()}
        assert minimum == {36} and min(tokens.values()) >= 36
        # beyond the minimum, in proportion to the KV head's largest retrieval score (within rounding)
        # heads; at 0.5 the retrieval KV head reaches the whole prompt and the rest is shared by the others
        score = {(la, kv): x for (la, kv), x in np.ndenumerate(curves.retrieval_scores.reshape(2, 2, 2).max(-1))}
        shared = dict(score) if budget == 0.3 else {k: x for k, x in score.items() if k != (1, 1)}
        free = int(budget * n * 4) - 36 * len(shared) - (n if budget == 0.5 else 0)
        assert budget == 0.3 or tokens[(1, 1)] == n
        for key, x in shared.items():
            assert abs(tokens[key] - 36 - free * x / sum(shared.values())) < 1
        assert max(tokens, key=tokens.get) == (1, 1) and head.budget["ranked_by"] == "retrieval score"  # retrieval head (1, 3)
        assert head.predicted_kv_fraction(n) >= budget - 1 / n
        razor = base["razor"]
        duo = base["duo_attention"]
        kinds = {(e.layer, e.kv_head): e.kind for e in razor.decode_heads()}
        assert kinds == {(e.layer, e.kv_head): e.kind for e in duo.decode_heads()}
        assert list(kinds.values()).count("full") == (budget == 0.5) and (budget == 0.3 or kinds[(1, 1)] == "full")
        for e in razor.decode_heads():
            if e.kind == "streaming":
                d = duo.decode_head(e.layer, e.kv_head)
                assert e.compensation and e.params["sink"] + e.params["recent"] + 1 == d.params["sink"] + d.params["recent"]
        assert razor.predicted_kv_fraction(n) == pytest.approx(duo.predicted_kv_fraction(n))


def test_headkv_without_scores_ranks_by_attention_lost(curves):
    from attnlab.sparsity_stats.baselines import headkv_style

    policy = headkv_style(curves, 0.3)
    assert policy.budget["ranked_by"] == "attention lost to streaming"
    assert sum(e.prompt_tokens_kept(512) for e in policy.decode_heads()) == int(0.3 * 512 * 4)


# -- RazorAttention's compensation token -----------------------------------------------------------
def test_the_compensation_entry_is_the_mean_of_what_was_dropped_by_hand():
    heads = [DecodeHead.make(0, 0, "streaming", sink=2, recent=3, compensation=True), DecodeHead.make(0, 1)]
    layer = kc.PolicyCacheLayer(heads)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g)
    layer.update(k, v)
    layer.compress()
    assert layer.tokens_held() == [6, 8] and layer.comp_count == [3, 0]  # sink 0 1, recent 5 6 7, positions 2 3 4 dropped
    s = layer.comp_slot[0]
    assert torch.allclose(layer.keys[0, 0, s], k[0, 0, 2:5].mean(0)) and torch.allclose(layer.values[0, 0, s], v[0, 0, 2:5].mean(0))
    assert layer.slot_positions[0, :6].tolist() == [0, 1, 5, 6, 7, kc.COMPENSATION]
    # a decode step: position 8 comes in, the oldest recent (5) goes into the entry
    k8, v8 = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    keys, values = layer.update(k8, v8)
    assert layer.comp_count[0] == 4 and layer.tokens_held() == [6, 9]
    assert torch.allclose(layer.keys[0, 0, s], k[0, 0, 2:6].mean(0)) and torch.allclose(layer.values[0, 0, s], v[0, 0, 2:6].mean(0))
    assert sorted(p for p in layer.slot_positions[0, :6].tolist() if p >= 0) == [0, 1, 6, 7, 8]
    # a query attends to the kept tokens and to the entry as the 4 tokens it stands for
    q = torch.randn(1, 2, 1, 4, generator=g)
    out = kc.decode_attention(q, keys, values, layer.valid, 0.5, layer.bias)
    kept_k = torch.cat([k[0, 0, [0, 1, 6, 7]], k8[0, 0]])
    kept_v = torch.cat([v[0, 0, [0, 1, 6, 7]], v8[0, 0]])
    ck, cv = k[0, 0, 2:6].mean(0), v[0, 0, 2:6].mean(0)
    logits = torch.cat([kept_k @ q[0, 0, 0] * 0.5, (ck @ q[0, 0, 0] * 0.5 + math.log(4))[None]])
    want = logits.softmax(-1) @ torch.cat([kept_v, cv[None]])
    assert torch.allclose(out[0, 0, 0], want, atol=1e-6)
    full = torch.cat([k[0, 1], k8[0, 1]]) @ q[0, 1, 0] * 0.5
    assert torch.allclose(out[0, 0, 1], full.softmax(-1) @ torch.cat([v[0, 1], v8[0, 1]]), atol=1e-6)
    # bytes: the entry is held, and the policy predicts it
    assert layer.bytes_held() == (6 + 9) * layer.token_bytes()
    assert heads[0].tokens_kept(8, 1) == 6 and heads[0].tokens_kept(5, 0) == 5 and heads[1].tokens_kept(8, 1) == 9


def test_compensation_in_generation_matches_the_dense_keys_and_the_prediction(tiny_llama):
    n, steps, sink, recent = 30, 6, 3, 6
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (0, 1): ("streaming", {"sink": sink, "recent": recent, "compensation": True}),
        (1, 0): ("snapkv", {"budget": 12, "window": 4, "kernel": 3, "sink": 2, "compensation": True})}))
    got = kc.greedy_decode(tiny_llama, prompt(n), policy, steps)
    seen = n + steps - 1
    dense = kc.greedy_decode(tiny_llama, prompt(n), None, steps, force=got.tokens)
    keys, values = dense.cache.layers[0].keys[0, 1], dense.cache.layers[0].values[0, 1]  # layer 0's keys depend on the tokens only
    ck, cv, count = got.cache.compensation(0, 1)
    dropped = list(range(sink, seen - recent))
    assert count == len(dropped) and got.cache.positions(0, 1) == [0, 1, 2] + list(range(seen - recent, seen))
    assert torch.allclose(ck, keys[dropped].mean(0), atol=1e-6) and torch.allclose(cv, values[dropped].mean(0), atol=1e-6)
    _, _, snap_count = got.cache.compensation(1, 0)
    assert snap_count == n - 12 and len(got.cache.positions(1, 0)) == 12 + steps - 1
    assert got.cache.compensation(0, 0) is None
    report = got.cache.kv_report()
    assert report["kv_bytes_held"] == report["kv_bytes_predicted"] and report["kv_vs_predicted"] == 1.0
    assert got.cache.tokens_held() == [[seen, sink + recent + 1], [12 + 1 + steps - 1, seen]]
    # compensation that drops nothing changes nothing: the full cache's logits
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (0, 1): ("streaming", {"sink": 4, "recent": 100, "compensation": True})}))
    same = kc.greedy_decode(tiny_llama, prompt(n), policy, steps)
    full = kc.greedy_decode(tiny_llama, prompt(n), dense_policy(tiny_llama), steps)
    assert (same.logits - full.logits).abs().max() <= 1e-5 and same.cache.compensation(0, 1) is None


def test_the_compensation_field_is_checked_on_load_and_written_only_when_true(tmp_path, tiny_llama):
    from attnlab.sparsity_stats.policy import PolicyError

    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (0, 1): ("streaming", {"sink": 2, "recent": 8, "compensation": True}), (1, 0): ("streaming", {"sink": 2, "recent": 8})}))
    d = policy.to_dict()
    entries = {(e["layer"], e["kv_head"]): e for e in d["decode"]["heads"]}
    assert entries[(0, 1)]["params"] == {"sink": 2, "recent": 8, "compensation": True}
    assert entries[(1, 0)]["params"] == {"sink": 2, "recent": 8}  # false is the default: files stay as they were
    back = Policy.load(policy.save(tmp_path / "p.json"))
    assert back.decode_heads() == policy.decode_heads() and back.decode_head(0, 1).compensation
    assert "compensation token" in back.decode_head(0, 1).describe()
    for where, value, match in (((0, 1), "yes", r"params.compensation.*must be true or false"),
                                ((0, 0), True, r"params.compensation.*is not a parameter of decode kind 'full'")):
        bad = json.loads(json.dumps(d))
        for e in bad["decode"]["heads"]:
            if (e["layer"], e["kv_head"]) == where:
                e["params"]["compensation"] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PolicyError, match=match):
            Policy.load(tmp_path / "bad.json")


# -- chunked prefill -------------------------------------------------------------------------------
def test_chunked_prefill_under_a_full_policy_equals_the_unchunked_one(tiny_llama):
    ids = prompt(70)
    whole = kc.greedy_decode(tiny_llama, ids, dense_policy(tiny_llama), 8)
    for chunk in (16, 23, 69, 70, 500):
        got = kc.greedy_decode(tiny_llama, ids, dense_policy(tiny_llama), 8, prefill_chunk=chunk)
        assert (got.logits - whole.logits).abs().max() <= 1e-5 and got.tokens == whole.tokens
        assert got.cache.tokens_held() == whole.cache.tokens_held() and got.cache.prompt_tokens == 70
    dense = kc.greedy_decode(tiny_llama, ids, None, 8, prefill_chunk=16)  # a DynamicCache fed in chunks too
    assert (dense.logits - whole.logits).abs().max() <= 1e-5
    tokens, cache = kc.generate(tiny_llama, ids, dense_policy(tiny_llama), max_new_tokens=8, prefill_chunk=16)
    assert tokens[0, 70:].tolist() == whole.tokens and cache.get_seq_length() == 77
    with pytest.raises(AttnlabError, match="prefill_chunk must be"):
        kc.greedy_decode(tiny_llama, ids, None, 2, prefill_chunk=0)


def test_chunked_prefill_keeps_the_same_positions_and_bounds_the_cache(tiny_llama):
    n, chunk, steps = 400, 64, 4
    table = {(0, 0): ("streaming", {"sink": 4, "recent": 12}), (0, 1): ("streaming", {"sink": 2, "recent": 30, "compensation": True}),
             (1, 0): ("streaming", {"sink": 0, "recent": 20}), (1, 1): ("streaming", {"sink": 4, "recent": 12})}
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, table))
    whole = kc.greedy_decode(tiny_llama, prompt(n), policy, steps)
    got = kc.greedy_decode(tiny_llama, prompt(n), policy, steps, prefill_chunk=chunk)
    for la, kv in table:
        assert got.cache.positions(la, kv) == whole.cache.positions(la, kv)
    assert got.cache.tokens_held() == whole.cache.tokens_held() == [[16, 33], [20, 16]]
    assert got.cache.compensation(0, 1)[2] == whole.cache.compensation(0, 1)[2] == n + steps - 1 - 32
    assert got.cache.kv_report()["kv_vs_predicted"] == 1.0
    # the buffers never held more than the policy's largest head plus one chunk, per KV head
    per_token = 2 * tiny_llama.head_dim * 4
    bound = tiny_llama.n_layers * tiny_llama.n_kv_heads * (max(e.tokens_kept(n) for e in policy.decode_heads()) + chunk) * per_token
    assert got.cache.peak_bytes_allocated() <= bound < whole.cache.peak_bytes_allocated()
    assert whole.cache.peak_bytes_allocated() >= tiny_llama.n_layers * tiny_llama.n_kv_heads * n * per_token


def test_chunked_prefill_snapkv_selects_from_the_last_chunk(tiny_llama):
    n = 90
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (1, 1): ("snapkv", {"budget": 20, "window": 8, "kernel": 3, "sink": 2})}))
    whole = kc.greedy_decode(tiny_llama, prompt(n), policy, 3)
    # every other head keeps everything, so the keys are the unchunked ones: with chunks at least
    # as long as the window the selection is SnapKV's
    for chunk in (8, 32):
        got = kc.greedy_decode(tiny_llama, prompt(n), policy, 3, prefill_chunk=chunk)
        assert got.cache.positions(1, 1) == whole.cache.positions(1, 1)
        assert (got.logits - whole.logits).abs().max() <= 1e-5


# -- batch > 1 ---------------------------------------------------------------------------------
def test_a_left_padded_batch_equals_its_rows_run_one_by_one(tiny_llama):
    table = {(0, 0): ("streaming", {"sink": 2, "recent": 8}), (0, 1): ("streaming", {"sink": 2, "recent": 6, "compensation": True}),
             (1, 0): ("snapkv", {"budget": 14, "window": 4, "kernel": 3, "sink": 2})}
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, table))
    rows = [prompt(40, seed=1)[0], prompt(27, seed=2)[0], prompt(33, seed=3)[0]]
    n = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(n - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(n - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)]) for r in rows])
    batch, cache = kc.generate(tiny_llama, ids, policy, max_new_tokens=10, attention_mask=mask, pad_token_id=0)
    assert cache.batch == 3 and batch.shape == (3, n + 10)
    held = 0
    for b, r in enumerate(rows):
        alone, one = kc.generate(tiny_llama, r[None], policy, max_new_tokens=10)
        assert batch[b, n:].tolist() == alone[0, len(r):].tolist()
        assert cache.tokens_held(row=b) == one.tokens_held()
        for la, kv in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            assert cache.positions(la, kv, row=b) == one.positions(la, kv)
        assert torch.allclose(cache.compensation(0, 1, row=b)[0], one.compensation(0, 1)[0], atol=1e-5)
        held += one.bytes_held()
    report = cache.kv_report()
    assert report["kv_bytes_held"] == held == report["kv_bytes_predicted"]
    with pytest.raises(AttnlabError, match="outside the cache's batch of 3"):
        cache.positions(0, 0, row=3)


# -- perplexity and per-head recall of decode attention ------------------------------------------
def test_scored_continuation_full_cache_is_dense_and_recall_is_one(tiny_llama):
    from attnlab.sparsity_stats.decode_validation import scored_continuation

    ids, ref = prompt(40), prompt(12, seed=2)[0].tolist()
    got = scored_continuation(tiny_llama, dense_policy(tiny_llama), ids, ref)
    assert abs(got["nll_compressed"] - got["nll_dense"]) <= 1e-5
    assert np.allclose(got["decode_recall"], 1.0, atol=1e-6) and len(got["decode_recall"]) == tiny_llama.n_layers * tiny_llama.n_heads
    # the NLL is the teacher-forced one: recomputed from the plain model's logits over prompt + reference
    full = torch.cat([ids, torch.tensor([ref[:-1]])], -1)
    with torch.no_grad():
        logits = tiny_llama.hf_model(full).logits[0, ids.shape[-1] - 1:].float()
    want = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(ref)[:, None]).mean()
    assert abs(got["nll_dense"] - float(want)) <= 1e-4


def test_decode_recall_by_hand_for_a_streaming_head(tiny_llama):
    """Layer 1, KV head 0 keeps 2 sink + 4 recent tokens: each of its query heads' recall is the
    dense attention mass on exactly those positions, averaged over the decode steps."""
    from attnlab.attention import layer_variants, scores_to_probs
    from attnlab.sparsity_stats.decode_validation import _forced, scored_continuation

    sink, recent = 2, 4
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {(1, 0): ("streaming", {"sink": sink, "recent": recent})}))
    ids, ref = prompt(30), prompt(6, seed=3)[0].tolist()
    got = np.array(scored_continuation(tiny_llama, policy, ids, ref)["decode_recall"]).reshape(tiny_llama.n_layers, tiny_llama.n_heads)
    # by hand: dense queries of layer 1 at each decode step, dense keys
    seen = {}
    _forced(tiny_llama, ids, None, ref, None, lambda layer, step, q, k, scaling, cache: seen.update(
        {(layer, step): (q[0, :, 0].float(), k[0].float(), scaling)}))
    n, group = ids.shape[-1], tiny_llama.group_size
    want = []
    for step in range(1, len(ref)):
        q, k, scaling = seen[1, step]
        pos = n + step - 1
        scores = (q.reshape(k.shape[0], group, -1) @ k[:, : pos + 1].transpose(-1, -2)).reshape(-1, 1, pos + 1) * scaling
        probs = scores_to_probs(scores, torch.tensor([pos]), layer_variants(tiny_llama)[1])[:, 0]
        kept = [p for p in range(pos + 1) if p < sink or p > pos - recent]  # the streaming head's positions at this step
        want.append(probs[:group, kept].sum(-1) / probs[:group].sum(-1))
    np.testing.assert_allclose(got[1, :group], torch.stack(want).mean(0).numpy(), atol=1e-5)
    assert (got[1, :group] < 1).all() and np.allclose(got[0], 1.0) and np.allclose(got[1, group:], 1.0)


def test_validate_decode_reports_perplexity_and_decode_recall(tmp_path, tiny_llama):
    from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, Run
    from attnlab.sparsity_stats.decode_validation import NEW_TOKENS, validate_decode

    assert NEW_TOKENS == 256
    policy = dense_policy(tiny_llama).with_decode(_decode_heads(tiny_llama, {
        (la, kv): ("streaming", {"sink": 2, "recent": 6}) for la in range(2) for kv in range(2)}))
    report = validate_decode(tiny_llama, policy, n_prompts=2, prompt_tokens=48, new_tokens=10, needle_samples=1,
                             needle_length=160, out=tmp_path / "run", progress=False)
    s = report.summary
    rows = Run.open(tmp_path / "run").read(DECODE_SAMPLES)
    cont = rows[rows["task"] == "continuation"]
    assert s["ppl_dense"] == pytest.approx(float(np.exp(cont["nll_dense"].mean())))
    assert s["ppl_compressed"] == pytest.approx(float(np.exp(cont["nll_compressed"].mean())))
    heads = np.mean([np.asarray(r) for r in cont["decode_recall"]], axis=0)
    assert s["decode_recall_mean"] == pytest.approx(float(heads.mean())) and 0 < s["decode_recall_mean"] < 1
    assert s["decode_recall_worst"] == pytest.approx(float(heads.min()))
    assert np.asarray(s["decode_recall_heads"]).shape == (tiny_llama.n_layers, tiny_llama.n_heads)
    assert rows.loc[rows["task"] == "needle", "decode_recall"].isna().all()
    assert "perplexity of the text's own continuation" in report.format()
    assert Run.open(tmp_path / "run").read(DECODE_SUMMARY)["decode_recall_worst_head"].startswith("L")


def test_decode_phase_on_a_sliding_window_model_is_refused_up_front():
    """The policy cache attends plainly (no window, soft-cap or sinks): a model that needs a
    variant is refused before any work, naming the window, never run with the wrong attention."""
    from attnlab.attention import RoutingError
    from attnlab.models import TINY_WINDOW, tiny_model
    from attnlab.sparsity_stats.decode_validation import scored_continuation

    model = tiny_model("mistral-window")
    with pytest.raises(RoutingError, match=f"sliding window {TINY_WINDOW}"):
        scored_continuation(model, dense_policy(model), prompt(TINY_WINDOW + 24), prompt(8, seed=4)[0].tolist())
    with pytest.raises(RoutingError, match=f"sliding window {TINY_WINDOW}"):
        kc.greedy_decode(model, prompt(TINY_WINDOW + 24), dense_policy(model), 2)
