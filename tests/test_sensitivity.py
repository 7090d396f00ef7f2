"""Layer sensitivity (`attnlab policy sensitivity`) and the weighted objective it feeds
(`policy make/compare --head-weights`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.attention import route_attention
from attnlab.cli import main
from attnlab.models import tiny_model
from attnlab.sparsity_stats import PolicyGenerator, compute_curves, make_synthetic_run
from attnlab.sparsity_stats.compare import compare_policies
from attnlab.sparsity_stats.errors import PolicyError
from attnlab.sparsity_stats.executors import PolicyExecutor
from attnlab.sparsity_stats.policy import Policy, uniform_policy
from attnlab.sparsity_stats.sensitivity import CLIP, Sensitivity, head_weights, layer_sensitivity
from tests.conftest import random_ids

LENGTHS = [256, 512]


@pytest.fixture(scope="module")
def tiny3():
    return tiny_model("llama", n_layers=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("sens") / "r1", n_layers=3, n_heads=4, n_kv_heads=2,
                              lengths=LENGTHS, block_size=32)


def _policy(model, recall_by_layer):
    """Streaming (sink 4, window 16) on layers with a recall, dense on layers with None."""
    d = uniform_policy(model, "streaming", {"sink": 4, "window": 16}, block_size=16).to_dict()
    for h in d["heads"]:
        r = recall_by_layer[h["layer"]]
        if r is None:
            h.update(kind="dense", params={}, expected_recall=1.0)
        else:
            h["expected_recall"] = r
    return Policy.from_dict(d)


@torch.no_grad()
def _kl(model, ids, policy, last=None):
    """KL(dense || policy) of the next-token distributions, mean over positions (the ``last``
    ones only, if given): the whole model under ``policy`` through the executor, independently
    of `layer_sensitivity`."""
    with route_attention(model):
        dense = torch.log_softmax(model.hf_model(ids, use_cache=False).logits[0].float(), -1)
    with route_attention(model, PolicyExecutor(policy, "flex").attention):
        sparse = torch.log_softmax(model.hf_model(ids, use_cache=False).logits[0].float(), -1)
    kl = (dense.exp() * (dense - sparse)).sum(-1)
    return float(kl[-last:].mean() if last else kl.mean())


def test_each_layer_kl_is_that_of_the_model_with_only_that_layer_sparse(tiny3):
    policy = _policy(tiny3, [0.6, None, 0.8])
    prompts = [type("P", (), {"input_ids": random_ids(96, seed=s)})() for s in (0, 1)]
    sens = layer_sensitivity(tiny3, policy, prompts, progress=False)
    for lay, others in ((0, [None, None, None]), (2, [None, None, None])):
        only = list(others)
        only[lay] = [0.6, None, 0.8][lay]
        want = np.mean([_kl(tiny3, p.input_ids, _policy(tiny3, only)) for p in prompts])
        assert sens.kl[lay] == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert sens.kl[lay] > 1e-6  # a 16-token window on 96 tokens changes a random model's output
    assert sens.kl[1] == 0.0  # a dense layer drops nothing: not measured
    # dropped mass: the policy's own estimates, summed over the layer's heads
    np.testing.assert_allclose(sens.dropped, [4 * 0.4, 0.0, 4 * 0.2])
    # the unmeasured layer takes the median weight of the measured ones
    per = sens.weights.mean(1)
    assert per[1] == pytest.approx(np.median(per[[0, 2]]))
    # --focus-last: the KL of the last positions only
    focused = layer_sensitivity(tiny3, policy, prompts, focus_last=8, progress=False)
    want = np.mean([_kl(tiny3, p.input_ids, _policy(tiny3, [0.6, None, None]), last=8) for p in prompts])
    assert focused.kl[0] == pytest.approx(want, rel=1e-4, abs=1e-7) and focused.kl[0] != pytest.approx(sens.kl[0], rel=1e-3)
    assert focused.source["focus_last"] == 8 and "last 8 positions" in focused.source["measure"]
    with pytest.raises(PolicyError, match="shorter than --focus-last 200"):
        layer_sensitivity(tiny3, policy, prompts, focus_last=200, progress=False)


def test_window_kl_is_that_of_the_model_with_the_window_sparse_together(tiny3, tmp_path, capsys):
    policy = _policy(tiny3, [0.6, None, 0.8])
    prompts = [type("P", (), {"input_ids": random_ids(96, seed=s)})() for s in (0, 1)]
    sens = layer_sensitivity(tiny3, policy, prompts, window=2, focus_last=16, progress=False)
    assert sens.window == 2 and sens.window_kl.shape == (2,)
    for first, recalls in ((0, [0.6, None, None]), (1, [None, None, 0.8])):  # windows 0-1 and 1-2
        want = np.mean([_kl(tiny3, p.input_ids, _policy(tiny3, recalls), last=16) for p in prompts])
        assert sens.window_kl[first] == pytest.approx(want, rel=1e-4, abs=1e-7)
    # the window of all three layers is the whole policy, whose KL is not the sum of the layers'
    whole = layer_sensitivity(tiny3, policy, prompts, window=3, focus_last=16, progress=False)
    want = np.mean([_kl(tiny3, p.input_ids, policy, last=16) for p in prompts])
    assert whole.window_kl[0] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert whole.window_kl[0] != pytest.approx(whole.kl.sum(), rel=1e-3)
    assert whole.layer_windows(3) == [(0, 2, pytest.approx(want, rel=1e-4))] and whole.measured_windows(3)
    # ranked by the measured KL; another width falls back to the summed single-layer KLs
    assert sens.layer_windows(2)[0][2] == pytest.approx(sens.window_kl.max())
    assert not sens.measured_windows(1) and sens.layer_windows(1)[0][2] == pytest.approx(sens.kl.max())
    one = layer_sensitivity(tiny3, policy, prompts[:1], window=1, progress=False)
    np.testing.assert_array_equal(one.window_kl, one.kl)
    # the file keeps the windows; a bad list is named
    path = sens.save(tmp_path / "w.json")
    back = Sensitivity.load(path, model=tiny3.identity())
    assert back.window == 2 and back.window_kl == pytest.approx(sens.window_kl)
    d = json.loads(path.read_text())
    for change, match in ((lambda d: d["windows"].pop(), "must list the 2 windows of 2 layers"),
                          (lambda d: d.update(window=9), "whole number of layers in")):
        bad = json.loads(json.dumps(d))
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PolicyError, match=match):
            Sensitivity.load(tmp_path / "bad.json")
    with pytest.raises(PolicyError, match=r"window must be a whole number of layers in \[1, 3\]"):
        layer_sensitivity(tiny3, policy, prompts, window=4, progress=False)


def test_weights_make_the_weighted_loss_of_each_layer_proportional_to_its_damage():
    kl, dropped = np.array([0.2, 0.0, 0.05, 0.3]), np.array([1.0, 0.0, 0.5, 3.0])
    w = head_weights(kl, dropped, n_heads=3)
    assert w.shape == (4, 3) and w.mean() == pytest.approx(1.0)
    assert (w == w[:, :1]).all()  # every head of a layer alike
    loss = w[:, 0] * dropped  # sum over the layer's heads of w_h (1 - recall_h)
    measured = [0, 2, 3]
    np.testing.assert_allclose(loss[measured] / loss[0], kl[measured] / kl[0])
    assert w[1, 0] == pytest.approx(np.median(w[measured, 0]))
    # one near-harmless layer is held at 1/CLIP of the mean, not stripped bare
    w = head_weights(np.array([1.0, 1e-9, 1.0]), np.ones(3), n_heads=1)
    assert w.min() == pytest.approx(w.mean() / CLIP, rel=0.05) and w.min() > 0
    # one dominant layer is held at CLIP times the mean after rescaling, not above it
    w = head_weights(np.array([100.0] + [1.0] * 19), np.ones(20), n_heads=2)
    assert w.max() == pytest.approx(CLIP * w.mean()) and w.mean() == pytest.approx(1.0)
    # nothing dropped anywhere, or no damage anywhere: every head alike
    assert (head_weights(np.zeros(2), np.zeros(2), 2) == 1).all()
    assert (head_weights(np.zeros(2), np.ones(2), 2) == 1).all()


def test_a_sensitivity_file_round_trips_and_bad_ones_are_named(run, tmp_path):
    sens = Sensitivity.from_measure(run.model, [0.3, 0.1, 0.2], [1.0, 1.0, 2.0], n_heads=4, source={"prompts": 2})
    path = sens.save(tmp_path / "s.json")
    back = Sensitivity.load(path, model=run.identity)
    np.testing.assert_allclose(back.weights, sens.weights, atol=1e-6)
    np.testing.assert_allclose(back.kl, sens.kl)
    other = dict(run.model, n_layers=4)
    with pytest.raises(PolicyError, match="n_layers"):
        Sensitivity.load(Sensitivity.from_measure(other, [0.1] * 4, [1.0] * 4, 4).save(tmp_path / "o.json"), model=run.identity)
    d = json.loads(path.read_text())
    for change, match in (
        (lambda d: d.update(format="x"), "not an attnlab sensitivity file"),
        (lambda d: d.update(head_weights=[[1.0] * 4] * 2), r"head_weights is \[2, 4\], not \[3, 4\]"),
        (lambda d: d["head_weights"][0].__setitem__(0, -1.0), "non-negative"),
        (lambda d: d["layers"][1].pop("kl"), "lacks a numeric kl"),
    ):
        bad = json.loads(json.dumps(d))
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(PolicyError, match=match):
            Sensitivity.load(tmp_path / "bad.json")


def test_weights_move_budget_to_the_heavy_layer_and_the_generator_maximises_the_weighted_objective(run):
    curves = compute_curves(run)
    kw = {"budget": 0.3, "protect_retrieval": "none"}
    plain = PolicyGenerator(**kw).fit(curves)
    w = np.ones((3, 4))
    w[0] = 20.0
    heavy = PolicyGenerator(**kw, head_weights=w).fit(curves)
    assert heavy.expected_density_[0].mean() > plain.expected_density_[0].mean()
    assert heavy.expected_recall_[0].mean() > plain.expected_recall_[0].mean()

    def objective(g):
        return float((w * g.expected_recall_).sum())

    assert objective(heavy) >= objective(plain) - 1e-9
    assert heavy.emit().generator["weighted"] is True and plain.emit().generator["weighted"] is False


def test_compare_tunes_the_baselines_on_the_weights_and_reports_the_weighted_objective(run):
    w = np.ones((3, 4))
    w[2] = 10.0
    table = compare_policies(run, [0.3], protect_retrieval="none", head_weights=w)
    plain = compare_policies(run, [0.3], protect_retrieval="none")
    assert plain["weighted_recall"].isna().all()
    got = table.set_index("method")
    fitting = got[got.within_budget]
    assert (fitting.loc["budgeted", "weighted_recall"] >= fitting["weighted_recall"] - 1e-9).all()
    for method in ("uniform_streaming", "duo_attention", "minference"):
        assert np.isfinite(got.loc[method, "weighted_recall"]), method
    # each baseline's weighted recall is at least what its unweighted tuning reaches under the same weights
    from attnlab.sparsity_stats.compare import tuned_baselines

    curves = compute_curves(run)
    for weighted, unweighted in zip(tuned_baselines(curves, 0.3, head_weights=w), tuned_baselines(curves, 0.3), strict=True):
        assert np.average(weighted.recall, weights=w) >= np.average(unweighted.recall, weights=w) - 1e-9, weighted.name


def test_layer_windows_rank_adjacent_layers_by_summed_kl(run):
    sens = Sensitivity.from_measure(run.model, [0.1, 0.5, 0.4, 0.0, 0.9], [1.0] * 5, n_heads=4)
    assert sens.layer_windows(2) == [(1, 2, pytest.approx(0.9)), (3, 4, pytest.approx(0.9)),  # ties: the earlier first
                                     (0, 1, pytest.approx(0.6)), (2, 3, pytest.approx(0.4))]
    assert sens.layer_windows(1)[0] == (4, 4, pytest.approx(0.9))
    assert sens.layer_windows(3)[0] == (2, 4, pytest.approx(1.3)) and len(sens.layer_windows(5)) == 1
    for bad in (0, 6, 2.0):
        with pytest.raises(ValueError, match="whole number of layers in"):
            sens.layer_windows(bad)


def test_cli_make_and_compare_read_head_weights(run, tmp_path, capsys):
    w = tmp_path / "w.json"
    Sensitivity.from_measure(run.model, [1.0, 0.01, 0.01], [1.0, 1.0, 1.0], n_heads=4).save(w)
    out = tmp_path / "p.json"
    assert main(["policy", "make", str(run.path), "--budget", "0.3", "--protect", "none", "--head-weights", str(w),
                 "--out", str(out), "--quiet"]) == 0
    assert f"weighted by {w}" in capsys.readouterr().out
    policy = Policy.load(out)
    assert policy.generator["weighted"] is True and policy.summary["objective"] == "weighted expected recall"
    assert main(["policy", "compare", str(run.path), "--budgets", "0.3", "--head-weights", str(w),
                 "--out", str(tmp_path / "c.csv"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "weighted_recall" in printed and "highest weighted expected recall" in printed
    # a file measured on another model: one line, nothing written
    other = tmp_path / "other.json"
    Sensitivity.from_measure(dict(run.model, n_heads=8, n_kv_heads=2), [1.0] * 3, [1.0] * 3, n_heads=8).save(other)
    assert main(["policy", "make", str(run.path), "--head-weights", str(other), "--out", str(tmp_path / "q.json")]) != 0
    assert "n_heads" in capsys.readouterr().err and not (tmp_path / "q.json").exists()


@pytest.mark.slow
def test_cli_sensitivity_on_the_embedded_model(embedded, tmp_path, capsys):
    ident = embedded.identity()
    d = uniform_policy(ident, "a_shape", {"sink": 16, "window": 32}, block_size=16).to_dict()
    for h in d["heads"]:
        h["expected_recall"] = 0.7 if h["layer"] in (0, 29) else 1.0
    Policy.from_dict(d).save(tmp_path / "p.json")
    out = tmp_path / "s.json"
    assert main(["policy", "sensitivity", str(tmp_path / "p.json"), "--lengths", "128", "--samples", "1",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    sens = Sensitivity.load(out, model=ident)
    assert sens.kl[0] > 0 and sens.kl[29] > 0 and (sens.kl[1:29] == 0).all()  # only layers that drop mass run
    assert sens.source["prompts"] == 1 and sens.source["lengths"] == [128]
    assert "most sensitive   L" in printed and f"wrote {out}" in printed
    first, last, _ = sens.layer_windows(3)[0]
    worst = 0 if sens.kl[0] > sens.kl[29] else 29
    assert first <= worst <= last and f"--protect-layers {first}-{last}" in printed
    # a policy without expected recall: the dropped mass is unknown, said in one line
    uniform_policy(ident, "a_shape", {"sink": 16, "window": 32}, block_size=16).save(tmp_path / "bare.json")
    assert main(["policy", "sensitivity", str(tmp_path / "bare.json"), "--lengths", "128", "--samples", "1",
                 "--out", str(tmp_path / "t.json"), "--quiet"]) != 0
    assert "has no expected recall" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
    # --windows: the windows run sparse together, and the printed suggestion is their best
    assert main(["policy", "sensitivity", str(tmp_path / "p.json"), "--lengths", "128", "--samples", "1", "--windows", "2",
                 "--out", str(tmp_path / "w.json"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    sens = Sensitivity.load(tmp_path / "w.json", model=ident)
    assert sens.window == 2 and (sens.window_kl[1:28] == 0).all() and sens.window_kl[0] > 0 and sens.window_kl[28] > 0
    first, last, _ = sens.layer_windows(2)[0]
    assert "2 adjacent layers sparse together" in printed and f"--protect-layers {first}-{last}" in printed
    assert main(["policy", "sensitivity", str(tmp_path / "p.json"), "--windows", "31", "--out", str(tmp_path / "x.json")]) != 0
    assert "--windows 31: the policy has only 30 layers" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
