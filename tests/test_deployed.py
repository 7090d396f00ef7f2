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
