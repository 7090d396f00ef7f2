"""The iso-density report (``attnlab eval --compare RUN``) on a fixed, hand-made eval run:
every method at the same achieved densities per task and length, the nearest measured setting
within the tolerance (never an interpolated point), with the intervals of `bootstrap_ci`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.runs import EVAL_SAMPLES, ISO_DENSITY, Run, ensure_run
from attnlab.sparsity_stats.evaluate import (
    bootstrap_ci,
    format_iso_density,
    iso_density,
    method_family,
    stratified_bootstrap_ci,
)

MODEL = {"name": "hand-made", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "n_ctx": 4096, "source": "synthetic"}
# per method: achieved density per sample, and scores on task "recall" / task "hard" (dense fails "hard")
METHODS = {
    "dense": (1.0, [1, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0]),
    "budgeted-0.3": (0.30, [1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]),
    "budgeted-0.5": (0.52, [1, 1, 1, 0, 1, 1], [0, 0, 1, 0, 0, 0]),
    "xattention:tau=0.9": (0.12, [1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]),
    "xattention:tau=0.95": (0.28, [1, 0.5, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]),
}


def samples_table() -> pd.DataFrame:
    rows = []
    for task, col in (("recall", 1), ("hard", 2)):
        for method, spec in METHODS.items():
            for i, score in enumerate(spec[col]):
                density = spec[0] + (0.01 * (i % 3 - 1) if method != "dense" else 0.0)  # per-input density varies
                rows.append({"sample": f"{task}-{i}", "task": task, "length": 256, "n_tokens": 250, "method": method,
                             "score": float(score), "correct": score == 1, "density": density, "reply": ""})
    return pd.DataFrame(rows)


@pytest.fixture()
def eval_run(tmp_path) -> Run:
    run = ensure_run(tmp_path / "eval", MODEL, "eval", {"tasks": ["recall", "hard"]})
    run.write(EVAL_SAMPLES, samples_table())
    return run


def _scores(table: pd.DataFrame, task: str, method: str) -> np.ndarray:
    return table[(table.task == task) & (table.method == method)].score.to_numpy(float)


def test_method_families_strip_the_setting():
    assert method_family("xattention:tau=0.95") == "xattention"
    assert method_family("budgeted-0.3") == "budgeted" and method_family("duo_attention-0.25") == "duo_attention"
    assert method_family("minference-1e-05") == "minference"
    assert method_family("dense") == "dense" and method_family("stream") == "stream" and method_family("my-policy") == "my-policy"


def test_the_report_picks_the_nearest_measured_setting_within_the_tolerance():
    samples = samples_table()
    table = iso_density(samples, [0.1, 0.3, 0.5])
    at = {(r.task, r.target, r.method): r for r in table.itertuples()}
    assert at[("recall", 0.3, "budgeted")].setting == "budgeted-0.3"
    assert at[("recall", 0.3, "xattention")].setting == "xattention:tau=0.95"  # 0.28: within 0.05
    assert at[("recall", 0.5, "budgeted")].setting == "budgeted-0.5"
    assert at[("recall", 0.1, "xattention")].setting == "xattention:tau=0.9"
    assert ("recall", 0.5, "xattention") not in at  # nearest is 0.28: no point is invented at 0.5
    assert ("recall", 0.1, "budgeted") not in at
    # achieved densities are the measured means, shown as they are
    assert at[("recall", 0.3, "budgeted")].density == pytest.approx(0.30)
    assert at[("recall", 0.3, "xattention")].density == pytest.approx(0.28)
    # dense is the reference at every target
    assert all(at[("recall", t, "dense")].reference for t in (0.1, 0.3, 0.5))
    assert not at[("recall", 0.3, "budgeted")].reference
    # a tighter tolerance drops the 0.28 point; a looser one lets 0.52 stand for 0.5 and 0.3 (nearest wins)
    tight = iso_density(samples, [0.3], tolerance=0.01)
    assert set(tight[tight.task == "recall"].method) == {"dense", "budgeted"}
    loose = iso_density(samples, [0.4], tolerance=0.15)
    assert loose[(loose.task == "recall") & (loose.method == "budgeted")].setting.item() == "budgeted-0.3"  # 0.10 < 0.12


def test_intervals_are_the_bootstrap_of_the_picked_samples_and_the_mean_leaves_out_failed_tasks():
    samples = samples_table()
    table = iso_density(samples, [0.3])
    for task in ("recall", "hard"):
        for method, setting in (("budgeted", "budgeted-0.3"), ("xattention", "xattention:tau=0.95"), ("dense", "dense")):
            row = table[(table.task == task) & (table.method == method)].iloc[0]
            scores = _scores(samples, task, setting)
            assert (row.ci_low, row.ci_high) == bootstrap_ci(scores)
            assert row.score == pytest.approx(scores.mean()) and row.n == len(scores)
    # dense scores 1/6 on "hard": shown, but left out of the mean
    assert not table[table.task == "hard"].in_mean.any() and table[table.task == "recall"].in_mean.all()
    mean = table[(table.task == "mean") & (table.method == "xattention")].iloc[0]
    assert mean.score == pytest.approx(_scores(samples, "recall", "xattention:tau=0.95").mean())
    assert (mean.ci_low, mean.ci_high) == stratified_bootstrap_ci([_scores(samples, "recall", "xattention:tau=0.95")])
    # with the floor at 0, both tasks count: the interval resamples each task's samples
    both = iso_density(samples, [0.3], floor=0.0)
    mean = both[(both.task == "mean") & (both.method == "budgeted")].iloc[0]
    groups = [_scores(samples, t, "budgeted-0.3") for t in ("recall", "hard")]
    assert mean.score == pytest.approx(np.mean([g.mean() for g in groups]))
    assert (mean.ci_low, mean.ci_high) == stratified_bootstrap_ci(groups)
    assert stratified_bootstrap_ci([[1, 1], [0, 0]]) == (0.5, 0.5)
    text = format_iso_density(table)
    assert "## 256 tokens, density 0.3" in text and "hard (dense < 0.2)" in text and "left out: hard" in text
    assert "| task | dense | budgeted | xattention |" in text
    assert "(xattention:tau=0.95 @ 0.280)" in text


def test_the_gap_to_dense_is_paired_by_sample_and_judged_by_its_interval():
    samples = samples_table()
    shuffled = samples.sample(frac=1.0, random_state=7)  # pairing is by sample name, not by row order
    for table in (iso_density(samples, [0.3]), iso_density(shuffled, [0.3])):
        at = {(r.task, r.method): r for r in table.itertuples()}
        diffs = _scores(samples, "recall", "dense") - _scores(samples, "recall", "budgeted-0.3")
        assert list(diffs) == [0, 0, 1, 0, 0, 0]
        row = at[("recall", "budgeted")]
        assert row.gap == pytest.approx(1 / 6) and (row.gap_low, row.gap_high) == bootstrap_ci(diffs)
        assert at[("recall", "xattention")].gap == pytest.approx(0.5 / 6)  # a partial score pairs too
        hard = _scores(samples, "hard", "dense") - _scores(samples, "hard", "budgeted-0.3")
        assert list(hard) == [0, 0, 1, 0, 0, -1]  # one sample each way: no gap
        assert at[("hard", "budgeted")].gap == pytest.approx(0.0)
        assert (at[("hard", "budgeted")].gap_low, at[("hard", "budgeted")].gap_high) == bootstrap_ci(hard)
        assert np.isnan(at[("recall", "dense")].gap) and at[("recall", "dense")].n_paired == 0
        assert at[("recall", "budgeted")].n_paired == 6
        mean = at[("mean", "budgeted")]  # the mean's tasks only ("hard" is below the floor)
        assert mean.gap == pytest.approx(1 / 6)
        assert (mean.gap_low, mean.gap_high) == stratified_bootstrap_ci([diffs])
    both = iso_density(samples, [0.3], floor=0.0)
    mean = both[(both.task == "mean") & (both.method == "budgeted")].iloc[0]
    assert mean.gap == pytest.approx(1 / 12)  # the mean of +1/6 (recall) and 0 (hard)
    text = format_iso_density(iso_density(samples, [0.3]))
    assert "| budgeted | budgeted-0.3 | 0.300 | 6 of 6 | +0.167 [" in text and "| within 0.05 |" in text
    # a method with samples dense did not answer: the gap pairs only the shared ones, and says so
    partial = samples[~((samples.method == "dense") & (samples["sample"] == "recall-2"))]
    row = iso_density(partial, [0.3]).query("task == 'mean' and method == 'budgeted'").iloc[0]
    assert row.n_paired == 5 and row.n == 6 and row.gap == pytest.approx(0.0)
    assert "| not shown |" in text and "| yes |" not in text
    assert "| yes |" in format_iso_density(both, margin=0.6)


def test_a_density_no_method_reaches_is_one_clear_error():
    with pytest.raises(AttnlabError, match=r"density 0\.9: no method's achieved density is within 0\.05 of it "
                                           r"\(measured per task and length: 0\.120 to 0\.520\)"):
        iso_density(samples_table(), [0.3, 0.9])
    dense_only = samples_table().query("method == 'dense'")
    with pytest.raises(AttnlabError, match="the run holds dense results only"):
        iso_density(dense_only, [0.3])


def test_cli_compare_prints_markdown_and_writes_table_and_plot(eval_run, capsys):
    assert main(["eval", "--compare", str(eval_run.path), "--densities", "0.1,0.3,0.5"]) == 0
    out = capsys.readouterr().out
    assert "# Iso-density report" in out and "## 256 tokens, density 0.5" in out
    table = eval_run.read(ISO_DENSITY)
    assert set(table.target) == {0.1, 0.3, 0.5} and {"budgeted", "xattention", "dense"} <= set(table.method)
    csv = eval_run.path / ISO_DENSITY
    md = csv.with_suffix(".md").read_text()
    assert md.strip() in out
    html = csv.with_suffix(".html").read_text()
    assert "plotly" in html.lower() and len(html) > 1_000_000, "plotly.js inlined: the plot opens offline"
    for name in ('"name":"budgeted"', '"name":"xattention"', '"name":"dense"', "xattention:tau=0.95"):
        assert name in html.replace(": ", ":")
    assert {"gap", "gap_low", "gap_high"} <= set(table.columns) and "| within 0.05 |" in out
    assert main(["eval", "--compare", str(eval_run.path), "--densities", "0.3", "--margin", "0.6"]) == 0
    assert "| within 0.6 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--densities", "0.9"], r"^error: density 0\.9: no method's achieved density"),
    (["--policy", "p.json"], r"^error: --policy does not apply to eval --compare"),
    (["--baseline", "xattention"], r"^error: --baseline does not apply to eval --compare"),
])
def test_cli_compare_bad_input_is_one_line(eval_run, capsys, argv, match):
    before = sorted(p.name for p in eval_run.path.iterdir())
    assert main(["eval", "--compare", str(eval_run.path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(match, err), err
    assert sorted(p.name for p in eval_run.path.iterdir()) == before


def test_cli_compare_refuses_a_run_without_eval_results_and_misplaced_options(tmp_path, capsys):
    run = ensure_run(tmp_path / "profile", MODEL, "profile", {})
    assert main(["eval", "--compare", str(run.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval_samples.parquet" in err and "attnlab eval" in err
    assert main(["eval", "--out", str(tmp_path / "x"), "--densities", "0.3"]) == 2
    assert "--densities applies only to eval --compare" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "x"), "--margin", "0.05"]) == 2
    assert "--margin applies only to eval --compare" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--tasks", "niah_noise"])
    assert exc.value.code == 2 and "one of the arguments --out --compare is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--compare", str(run.path), "--densities", "0,0.3"])
    assert exc.value.code == 2 and "expected a number in (0, 1]" in capsys.readouterr().err


def test_the_report_reads_a_tiny_model_eval(tiny_llama, tmp_path):
    """End to end on real answers: two settings of one method, each picked at its own density."""
    from attnlab.sparsity_stats.evaluate import evaluate, write_iso_density
    from attnlab.sparsity_stats.policy import uniform_policy
    from attnlab.tasks import task_suite

    samples = task_suite(tiny_llama.tokenizer, "niah_noise", [300], 2, seed=3)
    policies = {f"stream-{w}": uniform_policy(tiny_llama, "streaming", {"sink": 16, "window": w}, block_size=16)
                for w in (16, 96)}
    table = evaluate(tiny_llama, samples, policies, executor="flex", progress=False)
    run = ensure_run(tmp_path / "e", tiny_llama, "eval", {"tasks": ["niah_noise"]})
    run.write(EVAL_SAMPLES, table)
    achieved = table.groupby("method").density.mean()
    assert achieved["stream-16"] + 0.1 < achieved["stream-96"] < 1.0
    targets = [round(float(achieved["stream-16"]), 2), round(float(achieved["stream-96"]), 2)]
    report, markdown, paths = write_iso_density(run, targets)
    picked = report[(report.task == "niah_noise") & (report.method == "stream")].set_index("target").setting
    assert picked.to_dict() == {targets[0]: "stream-16", targets[1]: "stream-96"}
    assert paths["html"].is_file() and paths["markdown"].read_text().strip() == markdown.strip()
