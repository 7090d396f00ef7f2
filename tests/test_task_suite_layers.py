"""The layer-diagnosis benchmark's arithmetic: window parsing, candidate parsing, and the pooled
vs per-task shares of the lost log-probability (hand-computed on fixed rows)."""

import math

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("task_suite_layers.py")


def test_windows_parse_and_bad_ones_are_named(bench):
    assert bench.parse_windows("L5-7, L6-8,9", 30) == [[5, 6, 7], [6, 7, 8], [9]]
    assert bench.parse_windows("", 30) == []
    with pytest.raises(SystemExit, match="outside layers 0-29"):
        bench.parse_windows("L28-30", 30)
    with pytest.raises(SystemExit, match="'Lx-2' is not a layer range"):
        bench.parse_windows("Lx-2", 30)


def test_candidates_need_a_name_and_an_existing_file(bench, tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{}")
    assert bench.parse_candidates([f"L6-8={f}"]) == {"L6-8": f}
    with pytest.raises(SystemExit, match="write NAME=POLICY_FILE"):
        bench.parse_candidates([str(f)])
    with pytest.raises(SystemExit, match="no file"):
        bench.parse_candidates([f"x={tmp_path / 'missing.json'}"])


ROWS = [
    # task a: two samples, gap 6 + 2 = 8 nats; the candidate wins back 3 + 1 = 4 (half)
    {"task": "a", "dense": -1.0, "policy": -7.0, "cand": -4.0, "only": -1.5},
    {"task": "a", "dense": -1.0, "policy": -3.0, "cand": -2.0, "only": -1.5},
    # task b: gap 1 nat; the candidate wins back all of it
    {"task": "b", "dense": -2.0, "policy": -3.0, "cand": -2.0, "only": -3.0},
    # task c: the policy loses nothing, so c has no share
    {"task": "c", "dense": -1.0, "policy": -1.0, "cand": -1.0, "only": -1.0},
]


def test_pooled_share_weighs_nats_per_task_share_weighs_tasks(bench):
    pooled, per_task, mean = bench.shares(ROWS, "cand", "restore")
    assert pooled == pytest.approx(5 / 9)  # (3 + 1 + 1 + 0) / (6 + 2 + 1 + 0)
    assert per_task["a"] == pytest.approx(0.5) and per_task["b"] == pytest.approx(1.0)
    assert math.isnan(per_task["c"])
    assert mean == pytest.approx(0.75)  # task b counts as much as task a


def test_only_mode_counts_the_nats_the_window_loses_alone(bench):
    pooled, per_task, mean = bench.shares(ROWS, "only", "only")
    assert pooled == pytest.approx((0.5 + 0.5 + 1.0) / 9)
    assert per_task["a"] == pytest.approx(1 / 8) and per_task["b"] == pytest.approx(1.0)
    assert mean == pytest.approx((1 / 8 + 1.0) / 2)
