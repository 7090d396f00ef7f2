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
    _timing_recorded(merged, "eval", 3)

    capsys.readouterr()
    # a missing shard, a duplicated one, another job's shard: one line each, nothing written
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s2"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "shard(s) 1/3 missing" in err and "--partial" in err
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s0"), str(tmp_path / "s1"), str(tmp_path / "s2"),
                 "--out", str(tmp_path / "m3")]) == 2
    assert "shard 0/3 is given twice" in capsys.readouterr().err
    assert main(eval_args(tiny_dir, tmp_path / "other", "--shard", "1/3", "--seed", "9")) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "other"), str(tmp_path / "s2"),
                 "--out", str(tmp_path / "m4")]) == 2
    assert "is a shard of another job" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "single"), "--out", str(tmp_path / "m5")]) == 2
    assert "is not a shard" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--partial", "--out", str(tmp_path / "m6")]) == 2
    assert "shard 0/3 is given twice" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("m2", "m3", "m4", "m5", "m6"))
    assert not list(tmp_path.glob(".m*.partial"))


def test_a_partial_eval_merge_holds_the_shards_done_and_says_so(tiny_dir, tmp_path, capsys):
    """A long eval job reported before it ends: `merge --partial` of shards 2 and 0 of 3 holds
    exactly the single-process run's rows of those shards, in its order, records the shard that
    is missing, and the iso-density report names it."""
    from attnlab.shards import partial_record

    method = ["--baseline", "xattention", "--baseline-block-size", "16", "--executor", "reference"]  # a sparse method
    assert main(eval_args(tiny_dir, tmp_path / "single", *method)) == 0
    for i in (0, 2):
        assert main(eval_args(tiny_dir, tmp_path / f"s{i}", "--shard", f"{i}/3", *method)) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s2"), str(tmp_path / "s0"), "--partial", "--out", str(tmp_path / "m")]) == 0
    assert "partial job: 2 of its 3 shards merged (missing 1)" in capsys.readouterr().out
    merged, single = Run.open(tmp_path / "m"), Run.open(tmp_path / "single")
    done = set(Run.open(tmp_path / "s0").manifest["shard"]["units"]) | set(Run.open(tmp_path / "s2").manifest["shard"]["units"])
    expected = single.read(EVAL_SAMPLES)
    expected = expected[expected["sample"].isin(done)].reset_index(drop=True)
    assert len(expected) == 2 * 4 and len(done) == 4  # dense and the baseline on 4 samples
    pd.testing.assert_frame_equal(merged.read(EVAL_SAMPLES), expected)
    assert partial_record(merged) == {"shards": [0, 2], "count": 3, "missing": [1]}
    assert partial_record(single) is None
    compare = ["--densities", "0.5", "--tolerance", "0.5"]
    assert main(["eval", "--compare", str(tmp_path / "m"), *compare]) == 0
    report = (tmp_path / "m" / "iso_density.md").read_text()
    assert "(partial: 2 of 3 shards)" in report.splitlines()[0]
    assert "partial job: 2 of its 3 shards merged (missing 1)" in report
    # a whole job's report says nothing of the kind
    assert main(["eval", "--compare", str(tmp_path / "single"), *compare]) == 0
    assert "partial" not in (tmp_path / "single" / "iso_density.md").read_text()


def test_a_policy_added_to_every_eval_shard_merges_like_one_run(tiny_dir, tmp_path, capsys, monkeypatch):
    """The README's way to add a method to a sharded eval: the same command with the new
    --policy into every shard folder (dense is kept), then merge again."""
    from attnlab.models import load_model
    from attnlab.sparsity_stats import evaluate as ev
    from attnlab.sparsity_stats.policy import uniform_policy

    policy = tmp_path / "stream.json"
    uniform_policy(load_model(str(tiny_dir), verbose=False), "streaming", {"sink": 16, "window": 32},
                   block_size=16).save(policy)
    assert main(eval_args(tiny_dir, tmp_path / "single", "--policy", str(policy), "--executor", "reference")) == 0
    for i in range(2):
        assert main(eval_args(tiny_dir, tmp_path / f"s{i}", "--shard", f"{i}/2")) == 0
    calls, real = [], ev.answer
    monkeypatch.setattr(ev, "answer", lambda model, sample, ex=None: calls.append(ex is None) or real(model, sample, ex))
    for i in range(2):
        assert main(eval_args(tiny_dir, tmp_path / f"s{i}", "--shard", f"{i}/2", "--policy", str(policy),
                              "--executor", "reference")) == 0
    assert calls == [False] * 6, "only the policy's answers, dense kept"
    # a shard left without the policy is another job's shard
    assert main(eval_args(tiny_dir, tmp_path / "plain1", "--shard", "1/2")) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "plain1"), "--out", str(tmp_path / "bad")]) == 2
    assert "is a shard of another job" in capsys.readouterr().err
    # a shard from before eval recorded digests: named as such, not as another job
    import json

    from attnlab.runs import MANIFEST

    old = tmp_path / "old1"
    assert main(eval_args(tiny_dir, old, "--shard", "1/2", "--policy", str(policy), "--executor", "reference")) == 0
    manifest = json.loads((old / MANIFEST.filename).read_text())
    del manifest["shard"]["parameters"]["digests"]
    (old / MANIFEST.filename).write_text(json.dumps(manifest))
    assert main(["merge", str(tmp_path / "s0"), str(old), "--out", str(tmp_path / "bad")]) == 2
    assert f"{old} was answered by an attnlab that recorded no method digests" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "merged")]) == 0
    single, merged = Run.open(tmp_path / "single"), Run.open(tmp_path / "merged")
    pd.testing.assert_frame_equal(merged.read(EVAL_SAMPLES), single.read(EVAL_SAMPLES))
    pd.testing.assert_frame_equal(merged.read(EVAL_SUMMARY), single.read(EVAL_SUMMARY))


def test_eval_on_a_local_ray_cluster_equals_the_single_process_run(tiny_dir, tmp_path, capsys, monkeypatch):
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
    # a worker killed in the middle of shard 0 (its process dies): Ray retries it, the job completes
    from attnlab.ray_engine import CRASH_ONCE_ENV

    marker = tmp_path / "killed-once"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # the local cluster's workers inherit the environment
    assert main(eval_args(tiny_dir, tmp_path / "retried", "--ray", "--workers", "2")) == 0
    assert marker.read_text() == "killed once\n"  # the first attempt did die
    pd.testing.assert_frame_equal(Run.open(tmp_path / "retried").read(EVAL_SAMPLES), single.read(EVAL_SAMPLES))


def test_a_ray_address_that_does_not_answer_is_one_line(tiny_dir, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = time.perf_counter()
    assert main(eval_args(tiny_dir, tmp_path / "r", "--ray", f"127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - t < 30
    assert len(err.splitlines()) == 1 and f"the Ray cluster at 127.0.0.1:{port} does not answer" in err
    assert main(eval_args(tiny_dir, tmp_path / "r", "--ray", "headnode")) == 2
    assert "is not a Ray address" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r*"))


def test_merged_profile_shards_equal_the_single_process_run(tiny_dir, tmp_path, capsys):
    from attnlab.runs import BLOCK_MAPS, HEAD_STATS, PROFILE_ACCUM

    args = ["profile", "--model", str(tiny_dir), "--lengths", "96,160", "--samples", "5", "--block-size", "16",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2", "--out", str(tmp_path / f"p{i}")]) == 0
    shard = Run.open(tmp_path / "p1")
    assert sorted(shard.read(HEAD_STATS)["sample"].unique()) == [1, 3], "global sample numbers kept"
    assert shard.has(PROFILE_ACCUM), "a shard keeps its exact block-map sums for the merge"
    assert main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "merged")]) == 0
    single, merged = Run.open(tmp_path / "single"), Run.open(tmp_path / "merged")
    pd.testing.assert_frame_equal(merged.read(HEAD_STATS), single.read(HEAD_STATS))
    a, b = single.block_maps(), merged.block_maps()
    assert a.block_size == b.block_size
    for name in ("mass_sum", "mass_max", "count"):
        assert (getattr(a, name) - getattr(b, name)).abs().max().item() <= 1e-6, name
    assert not merged.has(PROFILE_ACCUM) and merged.has(BLOCK_MAPS)
    assert merged.manifest["parameters"] == single.manifest["parameters"]
    _timing_recorded(merged, "profile", 2)
    # a profile merged from some of its shards would under-count: --partial is refused, nothing written
    assert main(["merge", str(tmp_path / "p0"), "--partial", "--out", str(tmp_path / "half")]) == 2
    assert "--partial merges the shards of eval only, not of profile" in capsys.readouterr().err
    assert not (tmp_path / "half").exists()
    # the same job on a local Ray cluster (2 workers): the same run
    assert main([*args, "--ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    on_ray = Run.open(tmp_path / "ray")
    pd.testing.assert_frame_equal(on_ray.read(HEAD_STATS), single.read(HEAD_STATS))
    assert (on_ray.block_maps().mass_sum - a.mass_sum).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------
# timing and the wall-time model
# ---------------------------------------------------------------------------------------
def test_predict_wall_is_round_robin_max_plus_startup():
    from attnlab.shards import predict_wall

    times = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert predict_wall(times, 1) == 15.0
    assert predict_wall(times, 2) == 9.0  # worker 0: 1+3+5, worker 1: 2+4
    assert predict_wall(times, 2, startup=1.5) == 10.5
    assert predict_wall(times, 8) == 5.0  # more workers than units: the longest unit
    assert predict_wall([], 4, startup=2.0) == 2.0
    with pytest.raises(ValueError):
        predict_wall(times, 0)
    with pytest.raises(ValueError):
        predict_wall([-1.0], 1)
    rec = Shard(1, 2).record("x", {}, ["a", "b"], 4, seconds=3.0, unit_seconds=[1.0, 2.0])
    assert rec["seconds"] == 3.0 and rec["n_units"] == 2 and rec["unit_seconds"] == [1.0, 2.0]
    with pytest.raises(ValueError):
        Shard(0, 2).record("x", {}, ["a"], 2, unit_seconds=[1.0, 2.0])


# ---------------------------------------------------------------------------------------
# probe retrieval, circuit, validate: in-process on the tiny Llama
# ---------------------------------------------------------------------------------------
@pytest.fixture
def on_tiny(monkeypatch, tiny_llama):
    """Every stage's CLI gets the session's tiny Llama instead of loading --model."""
    from attnlab.circuits import cli as circuit_cli
    from attnlab.probes import cli as probe_cli
    from attnlab.sparsity_stats import validate_cli

    for module in (probe_cli, circuit_cli, validate_cli):
        monkeypatch.setattr(module, "load_model_from_args", lambda args: tiny_llama)
    return tiny_llama


def _shards_and_merge(args, tmp_path, n, prefix="s"):
    for i in range(n):
        assert main([*args, "--shard", f"{i}/{n}", "--out", str(tmp_path / f"{prefix}{i}")]) == 0
    assert main(["merge", *(str(tmp_path / f"{prefix}{i}") for i in reversed(range(n))),
                 "--out", str(tmp_path / f"{prefix}merged")]) == 0
    return Run.open(tmp_path / f"{prefix}merged")


def _timing_recorded(merged, stage, n):
    entry = merged.manifest["stages"][stage]
    assert len(entry["shard_seconds"]) == n and all(s > 0 for s in entry["shard_seconds"])
    assert [s["index"] for s in entry["shards"]] == list(range(n)) and all(s["units"] >= 1 for s in entry["shards"])


def test_merged_retrieval_shards_equal_the_single_process_run(on_tiny, tmp_path, capsys):
    from attnlab.probes.retrieval import STAGE
    from attnlab.runs import DETECTIONS, NEEDLE_RESULTS, RETRIEVAL_SUMMARY, RETRIEVAL_TRACE
    from attnlab.shards import unit_seconds

    args = ["probe", "retrieval", "--model", "tiny", "--lengths", "160", "--depths", "0.2,0.8", "--samples", "5",
            "--causal-k", "", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    merged = _shards_and_merge(args, tmp_path, 2)
    single = Run.open(tmp_path / "single")
    pd.testing.assert_frame_equal(merged.read(DETECTIONS), single.read(DETECTIONS))
    pd.testing.assert_frame_equal(merged.read(RETRIEVAL_TRACE), single.read(RETRIEVAL_TRACE))
    pd.testing.assert_frame_equal(merged.read(NEEDLE_RESULTS).drop(columns="seconds"),
                                  single.read(NEEDLE_RESULTS).drop(columns="seconds"))
    a, b = single.read(RETRIEVAL_SUMMARY), merged.read(RETRIEVAL_SUMMARY)
    assert {k: v for k, v in a.items() if k != "seconds_per_sample"} == {k: v for k, v in b.items() if k != "seconds_per_sample"}
    assert merged.manifest["parameters"] == single.manifest["parameters"] and merged.manifest["kind"] == STAGE
    _timing_recorded(merged, STAGE, 2)
    shards = [Run.open(tmp_path / f"s{i}") for i in range(2)]
    assert len(shards[1].manifest["shard"]["unit_seconds"]) == 2
    assert len(unit_seconds(shards)) == 5

    capsys.readouterr()
    # another job's shard (another seed), a missing one, a duplicated one: named, nothing written
    assert main([*args, "--seed", "3", "--shard", "1/2", "--out", str(tmp_path / "other")]) == 0
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "other"), "--out", str(tmp_path / "m1")]) == 2
    assert "is a shard of another job" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m2")]) == 2
    assert "shard(s) 1/2 missing" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "m3")]) == 2
    assert "shard 0/2 is given twice" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3"))
    # what can't be sharded says which option to change
    assert main([*args[:-3], "--shard", "0/2", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "--causal-k ''" in capsys.readouterr().err
    assert main(["probe", "sinks", "--model", "tiny", "--shard", "0/2", "--out", str(tmp_path / "k")]) == 2
    assert "shards `attnlab probe retrieval` only" in capsys.readouterr().err
    assert main([*args, "--shard", "5/6", "--out", str(tmp_path / "e")]) == 2
    assert "gets no sample of 5" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("c", "k", "e"))


def test_merged_circuit_shards_equal_the_single_process_run(on_tiny, tmp_path, capsys):
    from attnlab.runs import CIRCUIT

    args = ["circuit", "--model", "tiny", "--task", "induction", "--examples", "4", "--method", "activation",
            "--no-faithfulness", "--threshold", "0.3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    merged = _shards_and_merge(args, tmp_path, 3)
    single = Run.open(tmp_path / "single")
    assert merged.read(CIRCUIT) == single.read(CIRCUIT)
    assert len(single.read(CIRCUIT)["nodes"]) >= 1
    assert merged.manifest["parameters"] == single.manifest["parameters"]
    _timing_recorded(merged, "circuit", 3)
    assert Run.open(tmp_path / "s1").manifest["shard"]["units"] == ["L0.H1", "L1.H0", "L1.H3"]  # heads 1, 4, 7 of 8

    capsys.readouterr()
    assert main([*args[:7], "--no-faithfulness", "--shard", "0/2", "--out", str(tmp_path / "a")]) == 2
    assert "add --method activation" in capsys.readouterr().err
    assert main([*args[:9], "--shard", "0/2", "--out", str(tmp_path / "b")]) == 2
    assert "add --no-faithfulness" in capsys.readouterr().err
    assert main([*args, "--refine", "grow", "--shard", "0/2", "--out", str(tmp_path / "c")]) == 2
    assert "drop --refine" in capsys.readouterr().err
    assert not any((tmp_path / m).exists() for m in ("a", "b", "c"))


def _policy(model, tmp_path):
    from attnlab.sparsity_stats.policy import POLICY_FORMAT, POLICY_SCHEMA, DecodeHead, Policy

    mixed = [("dense", {}), ("streaming", {"sink": 4, "window": 24}), ("block_topk", {"topk": 2})]
    heads = [{"layer": la, "head": h, "kv_head": model.kv_head(h), "kind": mixed[(la + h) % 3][0],
              "params": mixed[(la + h) % 3][1]} for la in range(model.n_layers) for h in range(model.n_heads)]
    policy = Policy.from_dict({"format": POLICY_FORMAT, "schema": POLICY_SCHEMA, "model": model.identity().to_dict(),
                               "block_size": 16, "heads": heads})
    policy = policy.with_decode([DecodeHead.make(la, kv, "streaming", sink=2, recent=8)
                                 for la in range(model.n_layers) for kv in range(model.n_kv_heads)])
    return policy.save(tmp_path / "p.json")


_TIMES = {"time_dense_s", "time_sparse_s", "tokens_per_s_dense", "tokens_per_s_compressed"}


def _same_summary(a, b):
    assert {k: v for k, v in a.items() if k not in _TIMES} == {k: v for k, v in b.items() if k not in _TIMES}


@pytest.mark.parametrize("phase", ["prefill", pytest.param("both", marks=pytest.mark.slow), "decode"])
def test_merged_validate_shards_equal_the_single_process_run(on_tiny, tmp_path, capsys, phase):
    from attnlab.runs import DECODE_SAMPLES, DECODE_SUMMARY, VALIDATION_HEADS, VALIDATION_SUMMARY

    path = _policy(on_tiny, tmp_path)
    args = ["validate", str(path), "--model", "tiny", "--phase", phase, "--prompts", "3", "--tokens", "64",
            "--needle", "2", "--needle-length", "160", "--new-tokens", "4", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    merged = _shards_and_merge(args, tmp_path, 2)
    single = Run.open(tmp_path / "single")
    if phase != "decode":
        pd.testing.assert_frame_equal(merged.read(VALIDATION_HEADS), single.read(VALIDATION_HEADS))
        _same_summary(merged.read(VALIDATION_SUMMARY), single.read(VALIDATION_SUMMARY))
        assert merged.read(VALIDATION_SUMMARY)["n_prompts"] == 3 and merged.read(VALIDATION_SUMMARY)["needle_n"] == 2
    else:
        assert not merged.has(VALIDATION_SUMMARY)
    if phase != "prefill":
        drop = ["tokens_per_s_dense", "tokens_per_s_compressed"]
        pd.testing.assert_frame_equal(merged.read(DECODE_SAMPLES).drop(columns=drop),
                                      single.read(DECODE_SAMPLES).drop(columns=drop))
        _same_summary(merged.read(DECODE_SUMMARY), single.read(DECODE_SUMMARY))
    assert merged.manifest["kind"] == single.manifest["kind"]
    assert merged.manifest["parameters"] == single.manifest["parameters"]
    assert {k: v["parameters"] for k, v in merged.manifest["stages"].items()} == \
        {k: v["parameters"] for k, v in single.manifest["stages"].items()}
    units = Run.open(tmp_path / "s1").manifest["shard"]["units"]
    assert units[0] == "prompt1" and len(units) == 2  # prompt0..2 then two needles, round-robin
    _timing_recorded(merged, single.manifest["kind"], 2)
    if phase == "prefill":
        capsys.readouterr()
        assert main([*args, "--shard", "3/4", "--out", str(tmp_path / "e")]) == 2
        assert "gets no prompt of 3" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_merge_names_a_validate_shard_whose_decode_phase_did_not_finish(on_tiny, tmp_path, capsys):
    """A shard whose record was written but whose decode results are missing (``--phase both``
    stopped between its phases) is named by the merge, which writes nothing."""
    from attnlab.runs import DECODE_SUMMARY

    path = _policy(on_tiny, tmp_path)
    args = ["validate", str(path), "--model", "tiny", "--phase", "decode", "--prompts", "2", "--tokens", "48",
            "--new-tokens", "2", "--quiet"]
    for i in range(2):
        assert main([*args, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    Run.open(tmp_path / "s1").file(DECODE_SUMMARY).unlink()
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "shard 1/2" in err and "has no decode results" in err and "--shard 1/2" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_retrieval_on_a_local_ray_cluster_records_ray_startup_apart(tiny_dir, tmp_path, capsys):
    """probe retrieval on real local Ray (2 workers) equals its shards merged by hand; Ray's start-up
    seconds are recorded apart from the shards' own."""
    from attnlab.probes.retrieval import STAGE
    from attnlab.runs import DETECTIONS, RETRIEVAL_TRACE

    args = ["probe", "retrieval", "--model", str(tiny_dir), "--lengths", "160", "--depths", "0.5", "--samples", "2",
            "--causal-k", "", "--quiet"]
    by_hand = _shards_and_merge(args, tmp_path, 2)
    assert main([*args, "--ray", "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    assert "2 shards on Ray, merged" in capsys.readouterr().out
    on_ray = Run.open(tmp_path / "ray")
    pd.testing.assert_frame_equal(on_ray.read(DETECTIONS), by_hand.read(DETECTIONS))
    pd.testing.assert_frame_equal(on_ray.read(RETRIEVAL_TRACE), by_hand.read(RETRIEVAL_TRACE))
    entry = on_ray.manifest["stages"][STAGE]
    assert entry["ray_startup_s"] > 0 and entry["workers"] == 2 and len(entry["shard_seconds"]) == 2
    assert not (tmp_path / ".ray.shards").exists()
    # the causal check can't be split: refused before Ray starts
    assert main([*args[:-3], "--ray", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "--causal-k ''" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_retrieval_shards_equal_the_single_process_run(monkeypatch, embedded, tmp_path):
    """SmolLM2-135M, short settings: the sharded retrieval probe merges into the single-process run."""
    from attnlab.probes import cli as probe_cli
    from attnlab.runs import DETECTIONS, RETRIEVAL_TRACE

    monkeypatch.setattr(probe_cli, "load_model_from_args", lambda args: embedded)
    args = ["probe", "retrieval", "--model", "smollm2-135m", "--lengths", "256", "--depths", "0.3,0.7",
            "--samples", "3", "--causal-k", "", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    merged, single = _shards_and_merge(args, tmp_path, 2), Run.open(tmp_path / "single")
    pd.testing.assert_frame_equal(merged.read(DETECTIONS), single.read(DETECTIONS))
    pd.testing.assert_frame_equal(merged.read(RETRIEVAL_TRACE), single.read(RETRIEVAL_TRACE))


def test_a_retried_shard_starts_from_a_clean_folder(tiny_dir, tmp_path):
    """A worker that died mid-shard may leave its shard folder half-written (a run without the
    shard record): the retry removes it instead of failing on "--out exists"; a finished shard
    is recognised by its record."""
    import json

    from attnlab.ray_engine import _finished_shard, _shard_task
    from attnlab.runs import MANIFEST

    out = tmp_path / "shard-0"
    out.mkdir()
    (out / MANIFEST.filename).write_text(json.dumps({"schema": 1, "kind": "eval"}))  # no shard record
    assert not _finished_shard(str(out))
    argv = ["eval", "--model", str(tiny_dir), "--tasks", "niah_noise", "--lengths", "160", "--samples", "2"]
    assert _shard_task(argv, 0, 2, str(out), 1) == str(out)
    assert _finished_shard(str(out)) and Run.open(out).manifest["shard"]["index"] == 0


def test_ray_refuses_a_device_map_over_several_gpus():
    import argparse

    from attnlab.cliargs import model_argv
    from attnlab.errors import AttnlabError

    two = argparse.Namespace(model="m", device="cpu", device_map={"model.layers.0": "cuda:0", "model.layers.1": 1},
                             trust_remote_code=False)
    with pytest.raises(AttnlabError, match="spreads the model over 2 GPUs"):
        model_argv(two)
    one = argparse.Namespace(model="m", device="cpu", device_map={"": "cuda:0"}, trust_remote_code=False)
    assert model_argv(one)[-2:] == ["--device-map", '{"":"cuda:0"}']
