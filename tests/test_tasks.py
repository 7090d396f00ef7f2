"""The offline task suite (`attnlab.tasks`) with the embedded model's real tokenizer, and the
paired statistics of `attnlab eval` on fixed inputs; one end-to-end `attnlab eval` run (slow)."""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import pytest
from transformers import AutoTokenizer

from attnlab.errors import AttnlabError
from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache
from attnlab.sparsity_stats.evaluate import bootstrap_ci, paired_counts, summarize
from attnlab.tasks import (
    TASKS,
    TaskError,
    build_task_sample,
    resolve_tasks,
    string_match_all,
    task_suite,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))


def prompt_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.input_ids[0], skip_special_tokens=True)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [700, 1531])
def test_every_task_fits_its_length_and_holds_its_answers(tokenizer, task, length):
    sample = build_task_sample(tokenizer, task, length, index=3, seed=5)
    assert sample.n_tokens <= length
    assert sample.n_tokens >= 0.8 * length, "the haystack should fill the requested length"
    text = prompt_text(tokenizer, sample)
    for answer in sample.answers:
        assert answer in text
    assert text.rstrip().endswith(sample.lead), "the prompt ends where the answer starts"
    assert sample.question in text
    # graded by hand: the references themselves score 1, nothing scores 0
    assert sample.score(" ".join(sample.answers)) == 1.0
    assert sample.score("I don't know.") == 0.0


def test_samples_are_deterministic_and_differ_by_seed_and_index(tokenizer):
    a = build_task_sample(tokenizer, "niah_multikey", 800, index=0, seed=1)
    b = build_task_sample(tokenizer, "niah_multikey", 800, index=0, seed=1)
    c = build_task_sample(tokenizer, "niah_multikey", 800, index=1, seed=1)
    d = build_task_sample(tokenizer, "niah_multikey", 800, index=0, seed=2)
    assert a.input_ids.equal(b.input_ids) and a.answers == b.answers
    assert a.answers != c.answers and a.answers != d.answers


def test_multikey_distractors_are_in_the_prompt_and_not_the_answer(tokenizer):
    sample = build_task_sample(tokenizer, "niah_multikey", 1000, seed=0)
    text = prompt_text(tokenizer, sample)
    key, (value,) = sample.details["key"], sample.answers
    assert f"The secret number for {key} is {value}." in text
    distractors = sample.details["distractors"]
    assert len(distractors) == 3 and value not in distractors
    for other in distractors:
        assert other in text
    assert sample.score(" ".join(distractors)) == 0.0


def test_multivalue_and_multiquery_grade_partial_recall(tokenizer):
    sample = build_task_sample(tokenizer, "niah_multivalue", 1000, seed=0)
    assert len(sample.answers) == 4
    assert sample.score(f"{sample.answers[0]} and {sample.answers[2]}") == 0.5
    query = build_task_sample(tokenizer, "niah_multiquery", 1000, seed=0)
    text = prompt_text(tokenizer, query)
    for key, value in zip(query.details["keys"], query.answers, strict=True):
        assert f"The secret number for {key} is {value}." in text and key in query.question


def test_variable_tracking_chain_resolves_to_the_value(tokenizer):
    sample = build_task_sample(tokenizer, "variable_tracking", 900, seed=4)
    text = prompt_text(tokenizer, sample)
    bindings = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text))
    assert set(bindings) == set(sample.answers)

    def resolve(name: str) -> str:
        value = bindings[name]
        return resolve(value[4:]) if value.startswith("VAR ") else value

    assert {resolve(name) for name in sample.answers} == {sample.details["value"]}


def test_common_words_are_the_most_common(tokenizer):
    sample = build_task_sample(tokenizer, "common_words", 1200, seed=2)
    words = re.findall(r"^\d+\. ([a-z]+)$", prompt_text(tokenizer, sample), flags=re.M)
    counts = Counter(words)
    common = set(sample.answers)
    assert len(common) == 10
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_frequent_words_are_the_three_most_frequent(tokenizer):
    sample = build_task_sample(tokenizer, "frequent_words", 1200, seed=2)
    body = prompt_text(tokenizer, sample).split("\n\n")[0] if "\n\n" in prompt_text(tokenizer, sample) else ""
    counts = Counter(re.findall(r"\b[a-z]{6}\b", body))
    top3 = [w for w, _ in counts.most_common(3)]
    assert set(top3) == set(sample.answers)
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1], "no tie at the cut"


def test_bad_requests_are_one_clear_error(tokenizer):
    with pytest.raises(TaskError, match=r"unknown task 'ruler'.*choose from niah_noise"):
        resolve_tasks("niah_noise,ruler")
    assert resolve_tasks("all") == list(TASKS)
    with pytest.raises(TaskError, match=r"task 'common_words' cannot be built in 100 tokens.*at least"):
        build_task_sample(tokenizer, "common_words", 100)
    with pytest.raises(TaskError, match="must be positive"):
        task_suite(tokenizer, "all", [512], 0)
    with pytest.raises(TaskError, match="positive token counts"):
        task_suite(tokenizer, "all", [0], 1)
    assert isinstance(TaskError("x"), AttnlabError)


def test_string_match_all_by_hand():
    assert string_match_all(["Paris"], "It is paris.") == 1.0
    assert string_match_all(["a1", "b2", "c3", "d4"], "A1 ... c3") == 0.5
    assert string_match_all([], "anything") == 0.0


def test_paired_statistics_on_fixed_inputs():
    assert paired_counts([True, True, False, False, True], [True, False, True, False, True]) == {
        "both": 2, "only_dense": 1, "only_sparse": 1, "neither": 1}
    lo, hi = bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    assert 0.3 < lo < 0.7 < hi <= 1.0
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert bootstrap_ci([0, 1] * 5) == bootstrap_ci([0, 1] * 5), "seeded"
    rows = []
    for i, (d, s) in enumerate([(1, 1), (1, 0), (0, 0), (1, 1)]):
        rows.append({"sample": f"t-{i}", "task": "t", "length": 64, "method": "dense", "score": float(d),
                     "correct": bool(d), "density": 1.0})
        rows.append({"sample": f"t-{i}", "task": "t", "length": 64, "method": "p", "score": float(s),
                     "correct": bool(s), "density": 0.25})
    summary = summarize(pd.DataFrame(rows)).set_index("method")
    assert summary.loc["dense", "score"] == 0.75 and summary.loc["p", "score"] == 0.5
    assert summary.loc["p", "density"] == 0.25
    assert (summary.loc["p", "both"], summary.loc["p", "only_dense"], summary.loc["p", "only_sparse"],
            summary.loc["p", "neither"]) == (2, 1, 0, 1)


# ---------------------------------------------------------------------------------------
# evaluate and `attnlab eval`
# ---------------------------------------------------------------------------------------
def streaming_policy(model, block_size=16):
    from attnlab.sparsity_stats.policy import uniform_policy

    return uniform_policy(model, "streaming", {"sink": 16, "window": 32}, block_size=block_size)


def test_evaluate_pairs_dense_and_policies_on_the_same_samples(tiny_llama):
    from attnlab.sparsity_stats.evaluate import DENSE, evaluate

    samples = task_suite(tiny_llama.tokenizer, "niah_noise,variable_tracking", [300], 2, seed=3)
    # flex: Flex on a CPU has no backward, so this also proves answers run without autograd
    table = evaluate(tiny_llama, samples, {"stream": streaming_policy(tiny_llama)}, executor="flex", progress=False)
    assert len(table) == 2 * len(samples)
    assert list(table.method.unique()) == [DENSE, "stream"]
    for _, pair in table.groupby("sample"):
        assert set(pair.method) == {DENSE, "stream"}
    dense, sparse = table[table.method == DENSE], table[table.method == "stream"]
    assert (dense.density == 1.0).all()
    assert (sparse.density < 0.6).all() and (sparse.density > 0).all(), "the streaming prefill's achieved density"
    assert table.score.between(0, 1).all()
    assert (table.correct == (table.score == 1.0)).all()
    # greedy and seeded: the same samples give the same table
    again = evaluate(tiny_llama, samples[:1], {"stream": streaming_policy(tiny_llama)}, executor="flex", progress=False)
    assert again.reply.tolist() == table.reply.tolist()[:2] and again.density.tolist() == table.density.tolist()[:2]
    summary = summarize(table)
    row = summary[summary.method == "stream"].iloc[0]
    assert row.both + row.only_dense + row.only_sparse + row.neither == row.n == 2


def test_evaluate_refuses_a_policy_for_another_model(tiny_llama, tiny_gpt2):
    from attnlab.sparsity_stats.evaluate import evaluate

    samples = task_suite(tiny_llama.tokenizer, "niah_noise", [300], 1)
    with pytest.raises(AttnlabError, match="gpt2|n_kv_heads|n_heads|fingerprint|name"):
        evaluate(tiny_llama, samples, {"other": streaming_policy(tiny_gpt2)}, executor="reference", progress=False)


def test_eval_adds_to_a_run_without_answering_again(monkeypatch, tiny_llama, tmp_path, capsys):
    """A second eval into the same run keeps the answers it holds (dense once for any number of
    methods, a longer --samples answers only the new samples) and refuses what it cannot pair."""
    from attnlab.cli import main
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, Run
    from attnlab.sparsity_stats import eval_cli
    from attnlab.sparsity_stats import evaluate as ev
    from attnlab.sparsity_stats.policy import uniform_policy

    monkeypatch.setattr(eval_cli, "load_model_from_args", lambda args: tiny_llama)
    calls, real = [], ev.answer
    monkeypatch.setattr(ev, "answer", lambda model, sample, ex=None: calls.append((sample.name, ex is None))
                        or real(model, sample, ex))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    streaming_policy(tiny_llama).save(a)
    uniform_policy(tiny_llama, "streaming", {"sink": 16, "window": 64}, block_size=16).save(b)
    out = tmp_path / "run"
    base = ["eval", "--tasks", "niah_noise", "--lengths", "300", "--executor", "reference", "--out", str(out), "--quiet"]
    assert main([*base, "--samples", "2", "--policy", str(a)]) == 0
    assert len(calls) == 4
    first = Run.open(out).read(EVAL_SAMPLES)

    calls.clear()  # another policy: only its answers are computed
    assert main([*base, "--samples", "2", "--policy", str(b)]) == 0
    assert calls == [("niah_noise-300-0", False), ("niah_noise-300-1", False)]
    assert "kept 2 answers" in capsys.readouterr().out
    run = Run.open(out)
    table = run.read(EVAL_SAMPLES)
    assert table.method.tolist() == ["dense", "a", "b"] * 2
    pd.testing.assert_frame_equal(table[table.method != "b"].reset_index(drop=True), first)
    assert set(run.read(EVAL_SUMMARY).method) == {"dense", "a", "b"}
    params = run.manifest["stages"]["eval"]["parameters"]
    assert set(params["policies"]) == set(params["digests"]) == {"a", "b"}

    calls.clear()  # a third sample: answered by all three methods, the first two kept
    both = [*base, "--samples", "3", "--policy", str(a), "--policy", str(b)]
    assert main(both) == 0
    assert calls == [("niah_noise-300-2", True), ("niah_noise-300-2", False), ("niah_noise-300-2", False)]
    assert Run.open(out).manifest["stages"]["eval"]["parameters"]["samples"] == 3
    calls.clear()  # the same command again answers nothing
    assert main(both) == 0 and calls == []
    assert len(Run.open(out).read(EVAL_SAMPLES)) == 9

    # another seed, or another policy under a name the run holds: one line each, nothing answered or changed
    capsys.readouterr()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main([*base, "--samples", "2", "--seed", "1"]) == 2
    assert "holds eval answers of --seed 0, and this eval is of --seed 1" in capsys.readouterr().err
    uniform_policy(tiny_llama, "streaming", {"sink": 16, "window": 48}, block_size=16).save(a)
    assert main([*base, "--samples", "2", "--policy", str(a)]) == 2
    assert "already holds answers named 'a' from another policy or executor" in capsys.readouterr().err
    streaming_policy(tiny_llama).save(a)  # the same policy under another executor is another method too
    assert main([*base[:-5], "--executor", "flex", *base[-3:], "--samples", "2", "--policy", str(a)]) == 2
    assert calls == []
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_two_evals_adding_to_one_run_at_once_lose_nothing(monkeypatch, tiny_llama, tmp_path):
    """While one eval answers method c, another (as a second process would) adds b and c to the
    same run and finishes first: the slower one's write merges with what is there, so b's answers
    and its recorded policy stay, and c is stored once."""
    from attnlab.cli import main
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, Run
    from attnlab.sparsity_stats import eval_cli
    from attnlab.sparsity_stats import evaluate as ev
    from attnlab.sparsity_stats.policy import uniform_policy

    monkeypatch.setattr(eval_cli, "load_model_from_args", lambda args: tiny_llama)
    paths = {name: tmp_path / f"{name}.json" for name in "abc"}
    for window, path in zip((32, 48, 64), paths.values(), strict=True):
        uniform_policy(tiny_llama, "streaming", {"sink": 16, "window": window}, block_size=16).save(path)
    out = tmp_path / "run"
    base = ["eval", "--tasks", "niah_noise", "--lengths", "300", "--samples", "2", "--executor", "reference",
            "--out", str(out), "--quiet"]
    assert main([*base, "--policy", str(paths["a"])]) == 0
    real = ev.evaluate

    def racing(model, samples, policies, **kw):
        rows = real(model, samples, policies, **kw)
        monkeypatch.setattr(ev, "evaluate", real)  # the other eval, finishing while this one answers
        assert main([*base, "--policy", str(paths["b"]), "--policy", str(paths["c"])]) == 0
        return rows

    monkeypatch.setattr(ev, "evaluate", racing)
    assert main([*base, "--policy", str(paths["c"])]) == 0
    run = Run.open(out)
    assert run.read(EVAL_SAMPLES).method.tolist() == ["dense", "a", "b", "c"] * 2
    assert set(run.read(EVAL_SUMMARY).method) == {"dense", "a", "b", "c"}
    assert set(run.manifest["stages"]["eval"]["parameters"]["digests"]) == {"a", "b", "c"}


@pytest.mark.slow
def test_eval_cli_writes_paired_results_to_the_run(embedded, tmp_path, capsys):
    from attnlab.cli import main
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, Run

    policy_path = tmp_path / "stream.json"
    streaming_policy(embedded, block_size=64).save(policy_path)
    out = tmp_path / "run"
    code = main(["eval", "--policy", str(policy_path), "--tasks", "niah_noise,niah_multikey", "--lengths", "600",
                 "--samples", "2", "--executor", "reference", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "niah_multikey" in printed and "paired vs dense" in printed
    run = Run.open(out)
    table = run.read(EVAL_SAMPLES)
    assert len(table) == 2 * 2 * 2 and set(table.method) == {"dense", "stream"}
    dense = table[table.method == "dense"]
    assert dense.correct.mean() >= 0.5, "SmolLM2 finds single needles at 600 tokens"
    summary = run.read(EVAL_SUMMARY)
    assert set(summary.task) == {"niah_noise", "niah_multikey"}
    assert (summary.ci_low <= summary.score).all() and (summary.score <= summary.ci_high).all()
    assert run.manifest["stages"]["eval"]["parameters"]["samples"] == 2
    # an unknown task is one error line before the model loads, and the run is left as it was
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    assert main(["eval", "--tasks", "niah_noise,nope", "--out", str(out)]) == 2
    assert "error: unknown task 'nope'" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_samples_are_the_same_in_every_process():
    """Shards and Ray workers rebuild samples in other processes: nothing may depend on the
    interpreter's string-hash seed (a set's order did)."""
    import os
    import subprocess
    import sys

    code = ("from attnlab.models import EMBEDDED_MODELS, EMBEDDED_NAME, _embedded_cache\n"
            "from transformers import AutoTokenizer\n"
            "from attnlab.tasks import task_suite\n"
            "tok = AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[EMBEDDED_NAME], verbose=False))\n"
            "for s in task_suite(tok, 'all', [700], 2, seed=7): print(s.name, s.input_ids.sum().item(), s.answers)\n")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and outs[0].count("\n") == 18
