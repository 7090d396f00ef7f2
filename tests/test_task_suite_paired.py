"""The paired-report benchmark script on fixed per-sample results: the differences, counts and
mean row it prints are those of the samples every method answered, and bad input is one line."""

import pandas as pd
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("task_suite_paired.py")


def rows(task, method, scores, density):
    return [{"sample": f"{task}-{i}", "task": task, "length": 1024, "method": method, "score": float(s),
             "correct": s == 1, "density": density} for i, s in enumerate(scores)]


@pytest.fixture
def samples():
    r = []
    r += rows("a", "dense", [1, 1, 1, 1], 1.0) + rows("a", "pick", [1, 1, 0, 1], 0.3) + rows("a", "base", [1, 0, 0, 0], 0.31)
    r += rows("b", "dense", [1, 0, 1, 1], 1.0) + rows("b", "pick", [1, 0, 0.5, 1], 0.3) + rows("b", "base", [1, 1, 1, 1], 0.29)
    r += rows("c", "dense", [0, 0, 0, 0], 1.0) + rows("c", "pick", [1, 1, 1, 1], 0.3) + rows("c", "base", [0, 0, 0, 0], 0.3)
    extra = rows("a", "dense", [1, 1, 1, 1, 0], 1.0)[4:] + rows("a", "pick", [1, 1, 1, 1, 0], 0.3)[4:]  # base lacks a-4
    return pd.DataFrame(r + extra)


def test_the_paired_differences_and_counts_are_those_of_the_common_samples(bench, samples):
    t = bench.paired_table(samples, "pick", ["base"], floor=0.2).set_index("task")
    a = t.loc["a"]
    assert a.n == 4  # a-4 is left out: the baseline did not answer it
    assert a["score:pick"] == 0.75 and a["score:base"] == 0.25
    assert a["diff:base"] == pytest.approx(0.5)
    assert (a["only_ref:base"], a["only:base"]) == (2, 0)
    assert a["gap:pick"] == pytest.approx(0.25)
    b = t.loc["b"]
    assert b["diff:base"] == pytest.approx((0 - 1 - 0.5 + 0) / 4)
    assert (b["only_ref:base"], b["only:base"]) == (0, 2)  # 0.5 partial credit is not fully right
    assert not t.loc["c"].in_mean  # dense scores 0: left out of the mean
    mean = t.loc["mean"]
    assert mean.n == 8
    assert mean["diff:base"] == pytest.approx((0.5 - 0.375) / 2)
    assert mean["score:dense"] == pytest.approx((1 + 0.75) / 2)
    assert mean["diff_low:base"] <= mean["diff:base"] <= mean["diff_high:base"]


def test_the_markdown_names_the_left_out_task_and_the_gap_verdict(bench, samples):
    t = bench.paired_table(samples, "pick", ["base"], floor=0.2)
    md = bench.markdown(t, samples, "pick", ["base"], floor=0.2, margin=0.05)
    assert "c (dense < 0.2: left out)" in md
    assert "**mean, 2 tasks**" in md
    assert "| a | 4 |" in md and "| 2 / 0 |" in md
    assert "- base: +" in md and "within 5 not shown" in md


def test_an_unknown_method_or_missing_run_is_one_line(bench, samples, tmp_path):
    with pytest.raises(SystemExit, match="no answers of xattention; it holds base, dense, pick"):
        bench.paired_table(samples, "pick", ["xattention"])
    with pytest.raises(SystemExit, match="answered twice by the same method"):
        bench.paired_table(pd.concat([samples, samples.iloc[:1]]), "pick", ["base"])
    with pytest.raises(SystemExit, match="does not exist"):
        bench.main([str(tmp_path), "--reference", "pick"])
