"""Needle suite, retrieval score, causal check and the end-to-end retrieval probe."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from attnlab.errors import AttnlabError
from attnlab.probes.ablation import HeadAblation
from attnlab.probes.base import ProbeError, ProbeResult
from attnlab.probes.causal import causal_check, needle_accuracy, random_heads, summarize_causal
from attnlab.probes.needle import (
    Needle,
    NeedleError,
    contains_answer,
    greedy_answer,
    needle_samples,
    rouge1_recall,
)
from attnlab.probes.retrieval import (
    RetrievalTrace,
    argmax_keys,
    detection_rows,
    probe_retrieval,
    retrieval_sample_score,
    score_traces,
    spearman,
    trace_sample,
)
from attnlab.runs import (
    CAUSAL_CHECK,
    DETECTIONS,
    MANIFEST,
    NEEDLE_RESULTS,
    RETRIEVAL_SUMMARY,
    RETRIEVAL_TRACE,
)


# ---------------------------------------------------------------------------------------
# grading
# ---------------------------------------------------------------------------------------
def test_rouge1_recall_counts_reference_words_with_multiplicity():
    assert rouge1_recall("purple giraffe", "The code word is Purple giraffe.") == 1.0
    assert rouge1_recall("purple giraffe", "purple") == 0.5
    assert rouge1_recall("a b a", "a b") == pytest.approx(2 / 3)  # the second "a" is missing
    assert rouge1_recall("48213", "4 8 2 1 3") == 0.0  # words, not characters
    assert rouge1_recall("", "anything") == 0.0
    assert contains_answer("purple  giraffe", "It is PURPLE giraffe!")
    assert not contains_answer("48213", "48 213")


# ---------------------------------------------------------------------------------------
# needle samples
# ---------------------------------------------------------------------------------------
def test_needle_samples_have_exact_spans_lengths_and_chat_template(tiny_llama):
    samples = needle_samples(tiny_llama, lengths=(160, 300), depths=(0.0, 0.5, 1.0), seed=3)
    assert len(samples) == 2 * 3 * 3 and len({s.name for s in samples}) == len(samples)
    tok = tiny_llama.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for s in samples:
        start, end = s.needle_span
        ids = s.input_ids[0].tolist()
        assert s.n_tokens == s.context_length
        assert ids[start:end] == s.answer_ids
        assert tok.decode(s.answer_ids).strip() == s.answer
        assert s.target_ids[-len(s.answer_ids):] == s.answer_ids
        assert ids[0] == im_start and tok.decode(ids).endswith(s.lead)
        # the same ids as the model's own chat encoding of the user turn, then the lead-in
        user = tok.decode(ids).split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        assert user.endswith(s.question)
        chat = tiny_llama.encode(user, chat=True)[0].tolist()
        assert ids[: len(chat)] == chat and tok.decode(ids[len(chat):]) == s.lead
    # depth moves the needle through the haystack
    for kind in ("passkey", "kv", "phrase"):
        starts = [s.needle_span[0] for s in samples if s.kind == kind and s.context_length == 300]
        assert starts == sorted(starts) and starts[0] < starts[-1]


def test_needle_samples_from_a_text_file(tiny_llama, tmp_path):
    text = " ".join(f"Line {i} says the weather was mild and the river ran slow." for i in range(200))
    path = tmp_path / "hay.txt"
    path.write_text(text)
    samples = needle_samples(tiny_llama, lengths=(200,), depths=(0.5,), kinds=("kv",), n_samples=3, haystack=path)
    assert all(s.haystack == str(path) and "weather was mild" in tiny_llama.tokenizer.decode(s.input_ids[0]) for s in samples)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(NeedleError, match=r"kv-200-d50-000.*give a longer haystack file or lower --lengths"):
        needle_samples(tiny_llama, lengths=(200,), depths=(0.5,), kinds=("kv",), haystack=short)


def test_needle_errors_name_the_sample_and_the_fix(tiny_llama):
    with pytest.raises(NeedleError, match=r"passkey-500-d50-000.*lower --lengths to at most 480"):
        needle_samples(tiny_llama, lengths=(500,), depths=(0.5,), kinds=("passkey",))
    with pytest.raises(NeedleError, match=r"passkey-30-d50-000.*raise --lengths"):
        needle_samples(tiny_llama, lengths=(30,), depths=(0.5,), kinds=("passkey",))
    with pytest.raises(NeedleError, match="unknown needle kind"):
        needle_samples(tiny_llama, kinds=("riddle",))
    with pytest.raises(NeedleError, match="depths"):
        needle_samples(tiny_llama, depths=(1.5,))
    # "pass" followed directly by "word" merges into " password": never verbatim in the haystack
    merged = Needle("custom", "The secret is", "pass", "word.", "What is the secret?")
    with pytest.raises(NeedleError, match=r"custom-200-d50-000.*change the needle"):
        needle_samples(tiny_llama, lengths=(200,), depths=(0.5,), needles=[merged])


def test_n_samples_draws_cells_from_the_grid(tiny_llama):
    samples = needle_samples(tiny_llama, lengths=(120, 160), depths=(0.2, 0.8), n_samples=5, seed=1)
    assert len(samples) == 5
    assert len({(s.context_length, s.depth, s.kind) for s in samples}) == 5  # no cell twice before the grid is used up


# ---------------------------------------------------------------------------------------
# the score's arithmetic, on a hand-made decoding trace
# ---------------------------------------------------------------------------------------
CONTEXT = torch.tensor([12, 40, 12, 13, 14, 50, 13])  # needle value 12 13 14 at positions 2..4
SPAN = (2, 5)


def _trace(name: str, argmax: torch.Tensor, tokens: list[int], text: str) -> RetrievalTrace:
    return RetrievalTrace(name, SPAN, tokens, argmax, text, tokens, argmax, tokens, text, 0.0)


def _hand_trace() -> tuple[torch.Tensor, list[int]]:
    # 4 steps, 2 layers, 2 heads; the model generates 12, 13, 99, 14
    tokens = [12, 13, 99, 14]
    argmax = torch.zeros(4, 2, 2, dtype=torch.long)
    argmax[:, 0, 0] = torch.tensor([2, 3, 3, 4])  # copies 12, 13, (99 is not there), 14: 3 hits
    argmax[:, 0, 1] = torch.tensor([0, 6, 5, 1])  # right tokens at positions 0 and 6, outside the span: 0
    argmax[:, 1, 0] = torch.tensor([3, 2, 2, 4])  # wrong needle token twice, then 14: 1 hit
    argmax[:, 1, 1] = torch.tensor([2, 2, 2, 2])  # 12 only at step 0: 1 hit
    return argmax, tokens


def test_retrieval_score_on_a_hand_made_trace():
    argmax, tokens = _hand_trace()
    score = retrieval_sample_score(argmax, tokens, CONTEXT, SPAN)
    torch.testing.assert_close(score, torch.tensor([[1.0, 0.0], [1 / 3, 1 / 3]]))


def test_only_correct_answers_count_and_kv_scores_take_the_group_max(tiny_llama):
    argmax, tokens = _hand_trace()
    empty = torch.full_like(argmax, 5)  # attends to position 5 only: no hits
    samples = needle_samples(tiny_llama, lengths=(120,), depths=(0.5,), kinds=("kv",), n_samples=3)
    for s in samples:  # the suite's samples, re-pointed at the hand-made context
        s.input_ids, s.needle_span, s.answer = CONTEXT[None], SPAN, "twelve thirteen fourteen"
    traces = [
        _trace("a", argmax, tokens, "twelve thirteen fourteen"),  # recall 1: counts
        _trace("b", empty, tokens, "twelve thirteen"),  # recall 2/3: counts, adds zeros
        _trace("c", argmax, tokens, "twelve"),  # recall 1/3: ignored although it has hits
    ]
    scores = score_traces(traces, samples, "greedy")
    assert scores.counted == [True, True, False] and scores.n_counted == 2
    expected = torch.tensor([[1.0, 0.0], [1 / 3, 1 / 3]]) / 2
    torch.testing.assert_close(scores.score, expected)
    torch.testing.assert_close(scores.kv_score(2), torch.tensor([[0.5], [1 / 6]]))
    assert scores.ranking()[:2] == [(0, 0), (1, 0)]
    assert int(scores.hits[0].sum()) == 5

    class TwoByTwo:  # the detections need only the model's shapes
        n_layers, n_heads, n_kv_heads, group_size = 2, 2, 1, 2

        @staticmethod
        def kv_head(h):
            return 0

    frame = detection_rows(scores, TwoByTwo)
    assert len(frame) == 2 * 2 + 2 * 1
    q = frame[frame["head_type"] == "retrieval"].set_index(["layer", "head"])
    assert q.loc[(0, 0), "score"] == pytest.approx(0.5) and q.loc[(0, 0), "probe"] == "needle:greedy"
    evidence = json.loads(q.loc[(0, 0), "evidence"])
    assert evidence["counted"] == 2 and evidence["hits"] == 3 and evidence["hit_samples"] == [samples[0].name]
    kv = frame[frame["head_type"] == "retrieval_kv"]
    assert (kv["head"] == -1).all() and kv["score"].tolist() == pytest.approx([0.5, 1 / 6])


def test_spearman_and_split_half():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    rank = pd.Series([1.0, 2.0, 2.0, 4.0]).rank()  # ties take the average rank
    assert spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(float(pd.Series([1, 2, 3, 4]).corr(rank)))


# ---------------------------------------------------------------------------------------
# reading argmax rows from q/k during SDPA decoding equals the eager pattern's argmax
# ---------------------------------------------------------------------------------------
def _eager_rows(model, ids: torch.Tensor, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Pattern rows ``[rows, layers, heads, n]`` and logits from the bridge's eager attention."""
    patterns = {}

    def hook(pattern, hook):
        patterns[hook.layer()] = pattern[0, :, list(rows), :].transpose(0, 1)

    names = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(model.n_layers)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=names)
    return torch.stack([patterns[layer] for layer in range(model.n_layers)], dim=1), logits[0]


def _assert_argmax_matches(argmax: torch.Tensor, pattern: torch.Tensor) -> None:
    """Equal up to exact ties: where they differ, the two keys carry the same probability."""
    eager = pattern.argmax(-1)
    chosen = pattern.gather(-1, argmax[..., None])[..., 0]
    torch.testing.assert_close(chosen, pattern.amax(-1), atol=1e-6, rtol=0)
    assert (eager == argmax).float().mean() > 0.99


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_trace_reads_the_same_rows_as_eager_attention(fixture, request):
    model = request.getfixturevalue(fixture)
    sample = needle_samples(model, lengths=(100,), depths=(0.5,), kinds=("phrase",))[0]
    trace = trace_sample(model, sample, max_new_tokens=7)
    n = sample.n_tokens
    # greedy decoding (random weights: no agreement with the value, so every step is decoded
    # from the KV cache) reproduces the eager model's argmax tokens and attention rows
    ids = torch.cat([sample.input_ids, torch.tensor([trace.greedy_ids[:-1]])], dim=1)
    pattern, logits = _eager_rows(model, ids, range(n - 1, ids.shape[1]))
    assert logits[n - 1 :].argmax(-1).tolist() == trace.greedy_ids
    assert trace.greedy_argmax.shape == (len(trace.greedy_ids), model.n_layers, model.n_heads)
    _assert_argmax_matches(trace.greedy_argmax, pattern)
    # teacher forcing reads the rows that predict each target token
    ids = torch.cat([sample.input_ids, torch.tensor([sample.target_ids])], dim=1)
    pattern, logits = _eager_rows(model, ids, range(n - 1, ids.shape[1] - 1))
    _assert_argmax_matches(trace.teacher_argmax, pattern)
    assert trace.teacher_pred == logits[n - 1 : -1].argmax(-1).tolist()
    # when the target is the model's own answer, greedy steps come from the teacher rows
    # (the cache is cropped after them) and must still equal real decoding
    sample.target_ids = trace.greedy_ids[:3]
    again = trace_sample(model, sample, max_new_tokens=7)
    assert again.greedy_ids == trace.greedy_ids
    torch.testing.assert_close(again.greedy_argmax, trace.greedy_argmax)
    assert greedy_answer(model, sample, max_new_tokens=7, stop_on_answer=False).generated_ids == trace.greedy_ids


def test_argmax_keys_handles_gqa_and_a_cache():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(4, 3, 8, generator=g)  # 4 query heads, the last 3 of 10 positions
    key = torch.randn(2, 10, 8, generator=g)  # 2 KV heads
    got = argmax_keys(query, key, rows=2)
    for r, qi in enumerate((1, 2)):
        pos = 10 - 3 + qi
        for h in range(4):
            logits = key[h // 2, : pos + 1] @ query[h, qi]
            assert got[r, h] == int(logits.argmax())


# ---------------------------------------------------------------------------------------
# causal check and the probe end to end
# ---------------------------------------------------------------------------------------
def test_random_heads_avoid_the_top_k_and_are_reproducible():
    ranking = [(layer, h) for layer in range(3) for h in range(4)]
    random.Random(0).shuffle(ranking)
    draws = [random_heads(ranking, 3, seed=7, draw=d) for d in range(3)]
    for heads in draws:
        assert len(heads) == 3 and not set(heads) & set(ranking[:3])
    assert draws[0] == random_heads(ranking, 3, seed=7, draw=0) and draws[0] != draws[1]
    with pytest.raises(AttnlabError, match="lower K"):
        random_heads(ranking[:5], 3, seed=0, draw=0)


def test_causal_check_rows_and_summary(tiny_llama):
    samples = needle_samples(tiny_llama, lengths=(100,), depths=(0.5,), kinds=("kv",), n_samples=2)
    ranking = [(layer, h) for layer in range(2) for h in range(4)]
    frame = causal_check(tiny_llama, samples, ranking, ks=(1, 2), draws=2, progress=False)
    assert frame["condition"].tolist() == ["dense", "top", "random", "random", "top", "random", "random"]
    assert json.loads(frame.iloc[1]["heads"]) == [[0, 0]]
    assert (frame["n_samples"] == 2).all()
    summary = summarize_causal(frame)
    assert set(summary["per_k"]) == {"1", "2"} and len(summary["per_k"]["2"]["random"]) == 2


def test_probe_retrieval_writes_the_run(tiny_llama, tmp_path):
    out = tmp_path / "r1"
    result = probe_retrieval(
        tiny_llama, out, lengths=(100,), depths=(0.3, 0.7), kinds=("passkey", "kv"), causal_ks=(1,), draws=2,
        progress=False,
    )
    m = tiny_llama
    det = pd.read_parquet(out / DETECTIONS)
    assert len(det[det["head_type"] == "retrieval"]) == m.n_layers * m.n_heads
    assert len(det[det["head_type"] == "retrieval_kv"]) == m.n_layers * m.n_kv_heads
    assert set(det["probe"]) == {"needle:greedy"}
    results = pd.read_parquet(out / NEEDLE_RESULTS)
    assert len(results) == 4
    assert {"sample", "length", "depth", "kind", "answer", "correct", "rouge1"} <= set(results.columns)
    causal = pd.read_parquet(out / CAUSAL_CHECK)
    assert causal["condition"].tolist() == ["dense", "top", "random", "random"]
    summary = json.loads((out / RETRIEVAL_SUMMARY).read_text())
    assert summary["samples"] == 4 and "split_half_spearman" in summary and "mode_spearman" in summary
    trace = pd.read_parquet(out / RETRIEVAL_TRACE)
    assert set(trace["mode"]) == {"greedy", "teacher"} and trace["hit"].dtype == bool
    manifest = json.loads((out / MANIFEST).read_text())
    assert "probe:retrieval" in manifest["stages"]
    assert result["summary"]["counted"]["greedy"] == int(results["counted"].sum())
    # one result type: the tables it wrote, the in-memory scores, and the summary in the manifest
    assert isinstance(result, ProbeResult) and result.run.path == out
    assert result.summary is result["summary"] and result.detections.equals(det)
    assert result.tables["needle_results"].equals(results) and result.tables["causal_check"].equals(causal)
    assert set(result.extras) == {"scores", "traces", "samples"} and result["scores"]["greedy"].n_counted == summary["counted"]["greedy"]
    assert manifest["stages"]["probe:retrieval"]["summary"]["samples"] == 4
    with pytest.raises(KeyError, match="extras"):
        result["nonsense"]


def test_probe_retrieval_validates_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "r2"
    with pytest.raises(NeedleError, match="at most 480"):
        probe_retrieval(tiny_llama, out, lengths=(100, 1000), causal_ks=(1,), progress=False)
    with pytest.raises(ProbeError, match="lower --causal-ks"):
        probe_retrieval(tiny_llama, out, lengths=(100,), causal_ks=(5,), progress=False)
    with pytest.raises(ProbeError, match="mode must be one of"):
        probe_retrieval(tiny_llama, out, lengths=(100,), mode="sampled", progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# the embedded model: it answers, the score finds heads, ablating them hurts
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_retrieval_heads_matter(embedded):
    samples = needle_samples(embedded, lengths=(400,), depths=(0.2, 0.4, 0.6, 0.8), kinds=("passkey",), seed=5)
    traces = [trace_sample(embedded, s) for s in samples]
    scores = score_traces(traces, samples, "greedy")
    assert scores.n_counted >= 3  # the model answers
    score = scores.score
    assert float(score.max()) >= 0.5 and int((score >= 0.1).sum()) >= 3  # a few heads copy the passkey
    assert int((score >= 0.1).sum()) < 0.1 * score.numel()  # and only a few
    dense = sum(contains_answer(s.answer, t.greedy_text) for s, t in zip(samples, traces, strict=True)) / len(samples)
    top5 = HeadAblation(tuple(scores.ranking()[:5]), "zero")
    ablated = needle_accuracy(embedded, samples, top5)
    assert top5.calls > 0  # the ablation ran inside the routed decoding
    assert dense >= 0.75 and ablated["accuracy"] < dense
