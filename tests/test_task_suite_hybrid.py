"""benchmarks/hybrid_policy.py: the budgeted pick with a published dynamic method on some layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

from attnlab.errors import AttnlabError
from attnlab.sparsity_stats.policy import Policy

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "eval-2k-seed4" / "policies"
hp = load_benchmark("hybrid_policy.py")


def _heads(d):
    return {(h["layer"], h["head"]): h for h in d["heads"]}


def _choices(d):
    return {key: (h["kind"], h["params"]) for key, h in _heads(d).items()}


def test_only_the_given_layers_change_and_they_run_the_method_as_eval_baseline_validates_it():
    pick = Policy.load(DATA / "p68n2k.json")
    hybrid = hp.hybrid_policy(pick, [17, 18, 24], "flexprefill", {"gamma": 0.85})
    before, after = _heads(pick.to_dict()), _heads(hybrid.to_dict())
    assert before.keys() == after.keys()
    for key, h in after.items():
        if key[0] in (17, 18, 24):
            assert (h["kind"], h["params"]) == ("flexprefill", {"gamma": 0.85, "delta": 0.1})  # default delta added
            assert h["expected_recall"] is None and h["expected_density"] is None  # no claim about its cost
        else:
            assert h == before[key]
    summary = hybrid.to_dict()["summary"]
    assert summary["kinds"]["flexprefill"] == 27 and sum(summary["kinds"].values()) == 270
    assert "expected_recall" not in summary and "expected" not in hybrid.to_dict()["budget"]


def test_dense_heads_in_the_layers_stay_dense():
    """Layer 6 is protected (dense) in the pick: asked for layers 5-7, only layer 5 changes."""
    hybrid = _choices(hp.hybrid_policy(Policy.load(DATA / "p68n2k.json"), [5, 6, 7], "xattention", {}).to_dict())
    assert {layer for (layer, _), (kind, _) in hybrid.items() if kind == "xattention"} == {5}
    assert all(hybrid[(layer, h)][0] == "dense" for layer in (6, 7) for h in range(9))


def test_the_committed_hybrid_is_what_the_script_makes(tmp_path):
    """The policy the 2k multi-key run used (p68n2k-fp17-24.json) is the script's output."""
    out = tmp_path / "h.json"
    assert hp.main([str(DATA / "p68n2k.json"), "--layers", "17-24", "--method", "flexprefill:gamma=0.9",
                    "--out", str(out)]) == 0
    made, kept = json.loads(out.read_text()), json.loads((DATA / "p68n2k-fp17-24.json").read_text())
    assert _choices(made) == _choices(kept)
    changed = [k for k, (kind, _) in _choices(made).items() if kind == "flexprefill"]
    assert sorted({layer for layer, _ in changed}) == list(range(17, 25)) and len(changed) == 72


@pytest.mark.parametrize(("layers", "method", "words"), [
    ([6, 7, 8], ("flexprefill", {}), "every head there is dense"),
    ([28, 31], ("flexprefill", {}), "0-29"),
    ([20], ("block_topk", {}), "not a published dynamic method"),
    ([20], ("xattention", {"tau": 1.5}), "params.tau"),
])
def test_bad_requests_are_one_line_naming_the_fix(layers, method, words):
    with pytest.raises(AttnlabError, match=words):
        hp.hybrid_policy(Policy.load(DATA / "p68n2k.json"), layers, *method)


def test_an_existing_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "h.json"
    out.write_text("keep me")
    assert hp.main([str(DATA / "p68n2k.json"), "--layers", "20", "--method", "xattention", "--out", str(out)]) == 2
    assert out.read_text() == "keep me" and "exists" in capsys.readouterr().err


def test_each_swapped_head_says_which_layers_the_method_runs_on(capsys, tmp_path):
    """The reason and the summary line name "layer 21" for one layer, "layers 17-24" for several."""
    pick = Policy.load(DATA / "p68n2k.json")
    one = {h["reason"] for h in hp.hybrid_policy(pick, [21], "xattention", {"tau": 0.94}).to_dict()["heads"]
           if h["kind"] == "xattention"}
    assert one == {"hybrid: xattention (tau 0.94, stride 8) on layer 21"}
    assert hp.main([str(DATA / "p68n2k.json"), "--layers", "17-24", "--method", "xattention",
                    "--out", str(tmp_path / "h.json")]) == 0
    assert capsys.readouterr().out.strip().endswith("heads run xattention on layers 17-24")


def test_the_estimate_mode_changes_only_the_block_topk_heads_rule(tmp_path, capsys):
    """--estimate antidiagonal: the block_topk heads of the layers keep kind and top-k and gain the
    antidiagonal rule; every other head (and every head outside the layers) is unchanged."""
    pick = Policy.load(DATA / "p68n2k.json")
    out = tmp_path / "ad.json"
    assert hp.main([str(DATA / "p68n2k.json"), "--layers", "20-22", "--estimate", "antidiagonal", "--out", str(out)]) == 0
    before, after = _heads(pick.to_dict()), _heads(json.loads(out.read_text()))
    changed = [key for key, h in before.items() if key[0] in (20, 21, 22) and h["kind"] == "block_topk"]
    assert changed and capsys.readouterr().out.strip().endswith(f"{len(changed)} block_topk heads rank blocks by antidiagonal scores on layers 20-22")
    for key, h in after.items():
        if key in changed:
            assert h["params"]["estimate"] == {"rule": "antidiagonal", "stride": 8}
            assert {k: v for k, v in h["params"].items() if k != "estimate"} == {k: v for k, v in before[key]["params"].items() if k != "estimate"}
            assert h["kind"] == "block_topk"
        else:
            assert h == before[key]
    assert Policy.load(out).to_dict()["generator"]["estimate"]["heads"] == len(changed)  # it loads, and says what changed
    assert hp.main([str(DATA / "p68n2k.json"), "--layers", "20", "--estimate", "antidiagonal", "--out", str(out)]) == 2  # no overwrite
