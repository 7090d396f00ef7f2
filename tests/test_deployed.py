"""`attnlab validate --as FORMAT`: a policy validated as the target tool runs its exported file."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

from attnlab.errors import AttnlabError
from attnlab.sparsity_stats.deployed import DeployedExecutor
from attnlab.sparsity_stats.policy import uniform_policy
from attnlab.sparsity_stats.validation import head_errors


def policy_of(model, kind, params, block_size=16):
    return uniform_policy(model, kind, params, block_size=block_size)


def per_head(model, executor, ids):
    return head_errors(model, executor, ids).set_index(["layer", "head"]).sort_index()


@pytest.mark.parametrize("fmt", ["npz", "duo", "minference"])
def test_a_streaming_policy_runs_exactly_as_validated_in_every_format(tiny_llama, fmt):
    """Streaming heads are exact in these formats (Duo in its decode phase): the same recall."""
    from attnlab.sparsity_stats.executors import PolicyExecutor

    policy = policy_of(tiny_llama, "streaming", {"sink": 16, "window": 48})
    ids = random_ids(160, seed=2)
    validated = per_head(tiny_llama, PolicyExecutor(policy, "reference"), ids)
    deployed = per_head(tiny_llama, DeployedExecutor(policy, fmt), ids)
    torch.testing.assert_close(torch.tensor(deployed.recall.to_numpy()), torch.tensor(validated.recall.to_numpy()),
                               atol=1e-4, rtol=0)
    assert (deployed.recall < 0.999).any(), "the policy does drop attention"


def test_minference_runs_a_vertical_slash_head_as_a_superset(tiny_llama):
    """MInference raises sizes to its minimums (30 columns, 100 diagonals): more is kept than
    attnlab validated, and validating as deployed says so."""
    from attnlab.sparsity_stats.executors import PolicyExecutor

    policy = policy_of(tiny_llama, "vertical_slash", {"vertical": 16, "slash": 16})
    ids = random_ids(257, seed=5)
    validated = per_head(tiny_llama, PolicyExecutor(policy, "reference"), ids)
    ex = DeployedExecutor(policy, "minference")
    deployed = per_head(tiny_llama, ex, ids)
    assert (deployed.recall >= validated.recall - 1e-6).all()
    assert deployed.recall.mean() > validated.recall.mean() + 0.01
    assert ex.executor == "reference as minference"


def test_validate_as_writes_the_deployed_numbers(tiny_llama, tmp_path):
    from attnlab.sparsity_stats.validation import validate_policy

    policy = policy_of(tiny_llama, "streaming", {"sink": 16, "window": 32})
    report = validate_policy(tiny_llama, policy, deployed_as="duo", n_prompts=1, prompt_tokens=128,
                             out=tmp_path / "v", progress=False)
    assert report.summary["executor"] == "reference as duo"
    i, j = torch.arange(128)[:, None], torch.arange(128)[None, :]
    streaming = (j <= i) & ((j < 16) | (i - j < 32))  # sink 16 + a window of 32 counting the query
    want = streaming.sum().item() / (128 * 129 / 2)
    assert report.heads.density.to_numpy() == pytest.approx([want] * len(report.heads)), "token-level density"


def test_unknown_format_is_refused(tiny_llama, capsys):
    from attnlab.cli import main

    with pytest.raises(AttnlabError, match="unknown deployment format 'tensorrt'"):
        DeployedExecutor(policy_of(tiny_llama, "dense", {}), "tensorrt")
    with pytest.raises(SystemExit):
        main(["validate", "p.json", "--as", "tensorrt", "--out", "x"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_the_duo_export_is_validated_in_its_own_phase_decode(tiny_llama, tmp_path, monkeypatch, capsys):
    """`--as duo --phase decode`: the cache keeps what the DuoAttention file says, read back as
    Duo reads it — full KV heads, the others the file's sink + recent tokens."""
    import dataclasses

    from attnlab.cli import main
    from attnlab.runs import DECODE_SUMMARY, Run
    from attnlab.sparsity_stats import validate_cli
    from attnlab.sparsity_stats.deployed import duo_decode_policy
    from attnlab.sparsity_stats.emulators import read_duo
    from attnlab.sparsity_stats.export import export_policy
    from attnlab.sparsity_stats.policy import Policy

    streaming = policy_of(tiny_llama, "streaming", {"sink": 16, "window": 32})
    policy = Policy(streaming.model, streaming.block_size,
                    [dataclasses.replace(h, kind="dense", params={}) if (h.layer, h.kv_head) == (1, 0) else h
                     for h in streaming.heads])
    export_policy(policy, tmp_path / "duo", "duo")
    gates, cfg = read_duo(tmp_path / "duo")
    decoded = duo_decode_policy(policy)
    kinds = {(e.layer, e.kv_head): (e.kind, dict(e.params)) for e in decoded.decode_heads()}
    assert kinds[1, 0] == ("full", {})
    stream = {k: v for k, v in kinds.items() if k != (1, 0)}
    assert {v[0] for v in stream.values()} == {"streaming"} and len(stream) == 3
    assert all(p["sink"] == int(cfg["sink_size"]) and p["recent"] == int(cfg["recent_size"]) for _, p in stream.values())
    assert [h.kind for h in decoded.heads] == [h.kind for h in policy.heads]  # prefill heads untouched

    monkeypatch.setattr(validate_cli, "load_model_from_args", lambda args: tiny_llama)
    path = policy.save(tmp_path / "p.json")
    assert main(["validate", str(path), "--as", "duo", "--phase", "decode", "--prompts", "1", "--tokens", "64",
                 "--new-tokens", "4", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "decode keeps what the DuoAttention export says" in capsys.readouterr().out
    s = Run.open(tmp_path / "r").read(DECODE_SUMMARY)
    assert [e["kind"] for e in s["policy_file"]["decode"]["heads"]].count("full") == 1
    assert s["kv_fraction"] < 1.0 and s["kv_vs_predicted"] == 1.0
    assert main(["validate", str(path), "--as", "minference", "--phase", "decode", "--out", str(tmp_path / "r2"),
                 "--quiet"]) == 2
    assert "validate it with --phase prefill" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
