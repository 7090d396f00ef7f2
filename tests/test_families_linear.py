"""Head families (standardise → PCA → KMeans) and linear probes on head outputs.

Families must recover clusters planted in constructed head features, name them by their
dominant feature, and round-trip through a run directory. Linear probes must find a property
planted in one head's output (a tiny model whose head is patched to attend only to itself, so
its output is a function of the current token), give about chance on random labels, and reject
bad label files with a message naming the line and the fix — writing nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.errors import AttnlabError, PromptError
from attnlab.probes.base import ProbeError, ProbeResult
from attnlab.probes.detections import detection_frame, write_detections
from attnlab.probes.families import (
    _family_names,
    compute_families,
    family_word,
    fit_families,
    head_features,
)
from attnlab.probes.linear import (
    fit_linear_probes,
    needle_label_samples,
    read_label_file,
    run_linear_probe,
)
from attnlab.probes.repeated import word_token_pool
from attnlab.runs import FAMILIES, HEAD_STATS, LINEAR_PROBES, Run, ensure_run

# --------------------------------------------------------------------------- families

PROFILES = {  # planted family -> feature means (sink_mass_1, local_mass_64, induction, entropy_norm)
    "sink": (0.9, 0.1, 0.02, 0.2),
    "local": (0.1, 0.9, 0.02, 0.3),
    "induction": (0.1, 0.2, 0.45, 0.5),
}


def planted_features(per_family: int = 10, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for fam, means in PROFILES.items():
        for _ in range(per_family):
            i = len(rows)
            vals = np.asarray(means) + rng.normal(0, 0.03, size=4)
            rows.append({"layer": i // 6, "head": i % 6, "kv_head": (i % 6) // 3,
                         "sink_mass_1": vals[0], "local_mass_64": vals[1], "induction": vals[2], "entropy_norm": vals[3]})
            truth.append(fam)
    return pd.DataFrame(rows), truth


def test_fit_families_recovers_planted_clusters_and_names_them():
    from sklearn.metrics import adjusted_rand_score

    features, truth = planted_features()
    families, info = fit_families(features, k_max=6)
    assert info["k"] == 3
    assert adjusted_rand_score(truth, families["family_id"]) == pytest.approx(1.0)
    assert list(families["family"]) == truth  # each family named by its dominant feature
    assert {"layer", "head", "kv_head", "pc1", "pc2", "family", "sink_mass_1", "induction"} <= set(families.columns)
    assert sum(info["explained_variance"]) > 0.8
    assert max(info["silhouette"].values()) == info["silhouette"]["3"]


def test_family_names_disambiguate_and_words_follow_the_field():
    assert family_word("sink_mass_4") == "sink" and family_word("hidden_sink") == "hidden sink"
    assert family_word("keys_frac_90") == "diffuse" and family_word("razor_induction") == "induction"
    # two clusters dominated by the same word get their second feature appended
    z = np.array([[2.0, 1.0, -1.0], [1.5, -1.0, 1.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    names = _family_names(z, np.array([0, 1, 2, 3]), ["local_mass_64", "slash_mass_16", "sink_mass_1"])
    assert names[0] == "local+slash" and names[1] == "local+sink"
    assert len(set(names.values())) == 4  # identical profiles are numbered


def test_compute_families_round_trips_through_a_run(tmp_path):
    features, truth = planted_features()
    model = {"name": "planted", "n_layers": 5, "n_heads": 6, "n_kv_heads": 2, "head_dim": 8, "n_ctx": 64}
    run = ensure_run(tmp_path / "run", model, "test", {})
    stats = features.melt(id_vars=["layer", "head", "kv_head"], value_vars=["sink_mass_1", "local_mass_64", "entropy_norm"], var_name="statistic")
    stats = stats.assign(probe="builtin", sample=0, n_tokens=64)
    run.write(HEAD_STATS, stats[["layer", "head", "kv_head", "statistic", "probe", "sample", "n_tokens", "value"]])
    det = detection_frame(
        [{"layer": r.layer, "head": r.head, "kv_head": r.kv_head, "head_type": "induction", "score": r.induction, "probe": "x", "evidence": {}} for r in features.itertuples()]
        + [{"layer": 0, "head": -1, "kv_head": 0, "head_type": "echo_kv", "score": 1.0, "probe": "x", "evidence": {}}]
    )
    write_detections(run, det)
    assert set(head_features(run).columns) == {"layer", "head", "kv_head", "sink_mass_1", "local_mass_64", "entropy_norm", "induction"}
    result = compute_families(tmp_path / "run", k_max=5)
    assert isinstance(result, ProbeResult) and result.detections.empty and result.summary["k"] == 3
    families = result.tables["families"]
    stored = pd.read_parquet(tmp_path / "run" / FAMILIES)
    assert len(stored) == 30 and list(stored["family"]) == list(families["family"]) == truth
    manifest = Run.open(tmp_path / "run").manifest
    assert manifest["stages"]["families"]["summary"]["k"] == 3


def test_families_bad_input(tmp_path):
    run = ensure_run(tmp_path / "empty", {"name": "m", "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4}, "test", {})
    with pytest.raises(ProbeError, match="attnlab profile"):
        compute_families(run)
    assert not run.has(FAMILIES)
    features, _ = planted_features()
    with pytest.raises(ProbeError, match="k_max"):
        fit_families(features, k_max=1)
    with pytest.raises(ProbeError, match="2 features"):
        fit_families(features.assign(local_mass_64=0.5, induction=0.1, entropy_norm=0.3))


# --------------------------------------------------------------------------- linear probes


def token_samples(model, n_samples: int, n: int, seed: int, labels: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences of 8 word tokens; label 1 on the first 4 ("planted") or at random."""
    vocab = torch.tensor(word_token_pool(model.tokenizer)[:8])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_samples):
        which = torch.randint(0, 8, (n,), generator=g)
        ids = torch.cat([torch.tensor([1]), vocab[which]])
        lab = (which < 4).long() if labels == "planted" else torch.randint(0, 2, (n,), generator=g)
        out.append((ids, torch.cat([torch.tensor([0]), lab])))
    return out


def self_attention_on(model, layer: int, head: int):
    """Patch one head to attend only to its own position: its output is V(current token)."""
    def hook(pattern, hook=None):
        pattern = pattern.clone()
        pattern[:, head] = torch.eye(pattern.shape[-1], dtype=pattern.dtype)
        return pattern

    return model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)])


def test_linear_probe_finds_a_planted_property_and_chance_on_random_labels(tiny_llama):
    with self_attention_on(tiny_llama, 0, 2):
        planted = fit_linear_probes(tiny_llama, token_samples(tiny_llama, 8, 60, 0, "planted"), layers=[0], progress=False)
        shuffled = fit_linear_probes(tiny_llama, token_samples(tiny_llama, 8, 60, 1, "random"), layers=[0], progress=False)
    assert list(planted.columns) == [
        "layer", "head", "kv_head", "train_acc", "test_acc", "baseline_acc", "control_acc", "selectivity", "n_train", "n_test", "split",
    ]
    best = planted.loc[planted["test_acc"].idxmax()]
    assert int(best["head"]) == 2 and best["test_acc"] >= 0.95
    # the planted property is a function of the token, so the control task is as decodable:
    # the head knows the token, not the property (selectivity ≈ 0)
    assert best["control_acc"] >= 0.9 and abs(best["selectivity"]) < 0.1
    assert planted["baseline_acc"].iloc[0] == pytest.approx(0.5)  # balanced held-out set
    assert planted["split"].iloc[0] == "samples" and planted["n_test"].iloc[0] > 40
    # random labels: nothing to find, held-out accuracy near the baseline
    assert abs(shuffled["test_acc"].mean() - shuffled["baseline_acc"].iloc[0]) < 0.1
    assert shuffled["test_acc"].max() < 0.7


@dataclass
class FakeNeedle:
    """The fields of `attnlab.probes.needle.NeedleSample` that the linear probe reads."""

    input_ids: torch.Tensor
    needle_span: tuple[int, int]


def test_needle_labels_and_run_linear_probe_merges_properties(tiny_llama, tmp_path):
    needles = [FakeNeedle(torch.randint(100, 900, (1, 40), generator=torch.Generator().manual_seed(i)), (10 + i, 16 + i)) for i in range(6)]
    labelled = needle_label_samples(needles)
    assert labelled[2][1][12:18].tolist() == [1] * 6 and int(labelled[2][1].sum()) == 6
    result = run_linear_probe(tiny_llama, tmp_path / "run", samples=needles, layers=[1], progress=False)
    assert isinstance(result, ProbeResult)
    assert result.summary["property"] == "inside_needle" and len(result.tables["linear_probes"]) == tiny_llama.n_heads
    label_file = tmp_path / "digits.jsonl"
    label_file.write_text("\n".join(json.dumps({"text": f"The code is {k}{k + 1}{k + 2} and then some words follow.", "labels": [[12, 15]]}) for k in range(1, 7)))
    run_linear_probe(tiny_llama, tmp_path / "run", label_file=label_file, layers=[0], progress=False)
    table = pd.read_parquet(tmp_path / "run" / LINEAR_PROBES)
    assert set(table["property"]) == {"inside_needle", "digits"}
    assert len(table) == 2 * tiny_llama.n_heads
    with pytest.raises(ProbeError, match="outside its 40 tokens"):
        needle_label_samples([FakeNeedle(torch.zeros(1, 40, dtype=torch.long), (38, 45))])


def test_label_file_marks_the_tokens_of_each_span(tiny_llama, tmp_path):
    tok = tiny_llama.tokenizer
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"text": "Alice met Bob in Paris.", "labels": [[10, 13], [17, 22]]}) + "\n\n")
    ((ids, labels),) = read_label_file(path, tok)
    assert int(ids[0]) == tok.bos_token_id and int(labels[0]) == 0
    marked = tok.decode(ids[labels.bool()]).split()
    assert marked == ["Bob", "Paris"]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "fine", "labels": [[0, 4]]}', "{not json"], r"labels\.jsonl:2: not valid JSON"),
        (['{"labels": [[0, 4]]}'], r':1: needs a non-empty "text"'),
        (['{"text": "abc", "labels": [0, 2]}'], r":1: \"labels\" must be a list of \[start_char, end_char\] pairs"),
        (['{"text": "abc", "labels": [[1, 9]]}'], r":1: label span \[1, 9\] does not fit the text \(3 characters\)"),
        (['{"text": "ab   cd", "labels": [[3, 4]]}'], r":1: label span \[3, 4\] \(' '\) covers no token"),
    ],
)
def test_bad_label_files_name_the_line_and_write_nothing(tiny_llama, tmp_path, lines, match):
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.raises(PromptError, match=match) as info:
        run_linear_probe(tiny_llama, out, label_file=path, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_linear_probe_bad_input(tiny_llama, tmp_path):
    ids = torch.randint(100, 900, (20,))
    with pytest.raises(ProbeError, match="mark no position"):
        fit_linear_probes(tiny_llama, [(ids, torch.zeros(20, dtype=torch.long))] * 2, progress=False)
    with pytest.raises(ProbeError, match="19 labels for 20 tokens"):
        fit_linear_probes(tiny_llama, [(ids, torch.zeros(19, dtype=torch.long))], progress=False)
    with pytest.raises(ProbeError, match="0 or 1"):
        fit_linear_probes(tiny_llama, [(ids, torch.full((20,), 2))], progress=False)
    with pytest.raises(ProbeError, match=r"layers must lie in 0\.\.1"):
        fit_linear_probes(tiny_llama, token_samples(tiny_llama, 2, 10, 0, "planted"), layers=[5], progress=False)
    with pytest.raises(AttnlabError, match="not both"):
        run_linear_probe(tiny_llama, tmp_path / "run", label_file=tmp_path / "x.jsonl", samples=[], progress=False)
    assert not (tmp_path / "run").exists()
