"""Shards and merge (`attnlab.shards`): a job split with --shard I/N and joined with
`attnlab merge` gives the run one process writes; shards that don't belong together are named."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from attnlab.cli import main
from attnlab.runs import EVAL_SAMPLES, EVAL_SUMMARY, Run
from attnlab.shards import Shard, ShardError, shard_type


def test_shard_specs_and_round_robin():
    assert Shard.parse("2/5") == Shard(2, 5)
    assert Shard(1, 3).take(list(range(10))) == [1, 4, 7]
    assert sorted(sum((Shard(i, 3).take(list(range(10))) for i in range(3)), [])) == list(range(10))
    for bad in ("3/3", "-1/2", "1/0", "a/b", "1", "1/2/3"):
        with pytest.raises(ShardError, match="--shard takes I/N"):
            Shard.parse(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            shard_type(bad)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_llama):
    """A tiny Llama saved as a plain Hugging Face folder (the CLI loads it in each stage)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tiny_llama.tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("models") / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def eval_args(model, out, *extra):
    return ["eval", "--model", str(model), "--tasks", "niah_noise,variable_tracking", "--lengths", "160",
            "--samples", "3", "--out", str(out), "--quiet", *extra]


def test_merged_eval_shards_equal_the_single_process_run(tiny_dir, tmp_path, capsys):
    assert main(eval_args(tiny_dir, tmp_path / "single")) == 0
    for i in range(3):
        assert main(eval_args(tiny_dir, tmp_path / f"s{i}", "--shard", f"{i}/3")) == 0
    shard = Run.open(tmp_path / "s1")
    assert shard.manifest["shard"]["units"] == ["niah_noise-160-1", "variable_tracking-160-1"]
    assert len(shard.read(EVAL_SAMPLES)) == 2 * 1  # dense only, 2 samples

    assert main(["merge", *(str(tmp_path / f"s{i}") for i in (2, 0, 1)), "--out", str(tmp_path / "merged")]) == 0
    single, merged = Run.open(tmp_path / "single"), Run.open(tmp_path / "merged")
    pd.testing.assert_frame_equal(merged.read(EVAL_SAMPLES), single.read(EVAL_SAMPLES))
    pd.testing.assert_frame_equal(merged.read(EVAL_SUMMARY), single.read(EVAL_SUMMARY))
    assert merged.identity.mismatch(single.identity) is None
    assert merged.manifest["stages"]["eval"]["parameters"] == single.manifest["stages"]["eval"]["parameters"]

    capsys.readouterr()
    # a missing shard, a duplicated one, another job's shard: one line each, nothing written
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s2"), "--out", str(tmp_path / "m2")]) == 2
    assert "shard(s) 1/3 missing" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s0"), str(tmp_path / "s1"), str(tmp_path / "s2"),
                 "--out", str(tmp_path / "m3")]) == 2
    assert "shard 0/3 is given twice" in capsys.readouterr().err
    assert main(eval_args(tiny_dir, tmp_path / "other", "--shard", "1/3", "--seed", "9")) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "other"), str(tmp_path / "s2"),
                 "--out", str(tmp_path / "m4")]) == 2
    assert "is a shard of another job" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "single"), "--out", str(tmp_path / "m5")]) == 2
    assert "is not a shard" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("m2", "m3", "m4", "m5"))
    assert not list(tmp_path.glob(".m*.partial"))


def test_eval_on_a_local_ray_cluster_equals_the_single_process_run(tiny_dir, tmp_path, capsys):
    """Real Ray, locally, 2 workers: the merged run equals one process's; the shards are cleaned."""
    assert main(eval_args(tiny_dir, tmp_path / "single")) == 0
    assert main(eval_args(tiny_dir, tmp_path / "ray", "--ray", "--workers", "2")) == 0
    assert "2 shards on Ray, merged" in capsys.readouterr().out
    single, merged = Run.open(tmp_path / "single"), Run.open(tmp_path / "ray")
    pd.testing.assert_frame_equal(merged.read(EVAL_SAMPLES), single.read(EVAL_SAMPLES))
    pd.testing.assert_frame_equal(merged.read(EVAL_SUMMARY), single.read(EVAL_SUMMARY))
    assert not (tmp_path / ".ray.shards").exists()
    # a shard that fails on every try stops the job with its error line; nothing is merged
    assert main([*eval_args(tmp_path / "no-such-model", tmp_path / "bad"), "--ray", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "failed after 2 retries" in err and "could not load model" in err
    assert not (tmp_path / "bad").exists()
