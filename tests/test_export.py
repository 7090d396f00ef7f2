"""Exporters and importers: round trips through every format, refusals, and bad files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from attnlab.sparsity_stats import (
    FormatError,
    HeadPolicy,
    Policy,
    PolicyError,
    PolicyGenerator,
    compile_policy,
    export_policy,
    get_kind,
    import_policy,
    load_flex_block_masks,
    load_masks,
    make_synthetic_run,
    minference_config,
)
from attnlab.sparsity_stats.cli import add_commands
from attnlab.sparsity_stats.errors import MaskError
from attnlab.sparsity_stats.export import MINFERENCE_DENSE

MODEL = {"name": "toy-llm", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "n_ctx": 4096}


def make_policy(per_layer, model=MODEL, block_size=16) -> Policy:
    group = model["n_heads"] // model["n_kv_heads"]
    heads = []
    for lay, entries in enumerate(per_layer):
        for h, (kind, params) in enumerate(entries):
            heads.append(HeadPolicy(lay, h, h // group, kind, get_kind(kind).validate(params, "test"), 0.875, 0.25, "test"))
    return Policy(dict(model), block_size, heads)  # no profiled lengths: no extrapolation warnings


MIXED = make_policy([
    [("dense", {}), ("streaming", {"sink": 4, "window": 40}), ("a_shape", {"sink": 16, "window": 48}), ("vertical_slash", {"vertical": 32, "slash": 48})],
    [("block_topk", {"topk": 64}), ("block_topk", {"gamma": 0.9}), ("streaming", {"sink": 0, "window": {"alpha": 8, "beta": 0.05}}), ("dense", {})],
])
MINFERENCE_OK = make_policy([
    [("dense", {}), ("streaming", {"sink": 4, "window": 40}), ("vertical_slash", {"vertical": 32, "slash": 48}), ("block_topk", {"topk": 64})],
    [("streaming", {"sink": 64, "window": 256}), ("vertical_slash", {"vertical": 1000, "slash": 600}), ("dense", {}), ("block_topk", {"topk": 32})],
])
DUO_OK = make_policy([
    [("dense", {}), ("dense", {}), ("streaming", {"sink": 64, "window": 256}), ("streaming", {"sink": 64, "window": 256})],
    [("streaming", {"sink": 64, "window": 256}), ("streaming", {"sink": 64, "window": 256}), ("dense", {}), ("dense", {})],
])


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def same_policy(a: Policy, b: Policy) -> bool:
    return a.to_dict()["heads"] == b.to_dict()["heads"] and a.model == b.model and a.block_size == b.block_size


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "flex"])
def test_mask_formats_round_trip(tmp_path, fmt):
    paths = export_policy(MIXED, tmp_path, fmt, seq_len=200, block_size=16)
    assert len(paths) == 1 and paths[0].is_file()
    back = load_masks(paths[0], model=MODEL)
    expected = compile_policy(MIXED, 200, 16)
    assert len(back.layouts) == 2
    for got, want in zip(back.layouts, expected, strict=True):
        assert got.equals(want)
        assert torch.equal(got.token_mask(), want.token_mask())
    assert same_policy(back.policy, MIXED)
    assert back.meta["seq_len"] == 200 and back.meta["block_size"] == 16
    assert same_policy(import_policy(fmt, paths[0]), MIXED)


def test_npz_is_readable_without_attnlab(tmp_path):
    (path,) = export_policy(MIXED, tmp_path, "npz", seq_len=128, dense_blocks=True)
    with np.load(path, allow_pickle=False) as z:
        assert z["layer0.kv_count"].dtype == np.int32 and z["layer0.kv_count"].shape == (4, 8)
        assert z["layer1.block_mask"].shape == (4, 8, 8)
        meta = json.loads(str(z["__meta__"]))
    assert meta["format"] == "attnlab-masks" and meta["policy"]["format"] == "attnlab-policy"


def test_flex_file_rebuilds_block_masks(tmp_path):
    (path,) = export_policy(MIXED, tmp_path, "flex", seq_len=96, block_size=16)
    masks = load_flex_block_masks(path)
    for bm, lay in zip(masks, compile_policy(MIXED, 96, 16), strict=True):
        assert torch.equal(bm.to_dense()[0].bool(), lay.block_mask())


def test_minference_round_trip(tmp_path):
    # block_topk has no faithful MInference form (block_sparse runs 100 blocks of 64 whatever it says): --lossy only
    with pytest.raises(FormatError, match=r"head \(layer 0, head 3\) \(block_topk\).*top 100 blocks of 64.*L1\.H3 block_topk"):
        export_policy(MINFERENCE_OK, tmp_path, "minference", seq_len=2048)
    assert not (tmp_path / "minference_config.json").exists()
    (path,) = export_policy(MINFERENCE_OK, tmp_path, "minference", seq_len=2048, lossy=True)
    config = json.loads(path.read_text())
    assert config[0]["1"] == ["stream_llm", 4, 40, 0.875]
    assert config[0]["0"] == ["vertical_and_slash", MINFERENCE_DENSE, MINFERENCE_DENSE, 0.875]  # dense at any length
    assert config[1]["3"] == ["block_sparse", 2, 16, 0.875]
    # sizes in MInference's units: whole blocks of tokens, raised to its minimums (30 columns, the 100 forced diagonals)
    assert config[0]["2"] == ["vertical_and_slash", 32, 100, 0.875]
    assert config[1]["1"] == ["vertical_and_slash", 63 * 16, 38 * 16, 0.875]
    back = import_policy("minference", path, MODEL, block_size=16)
    for a, b in zip(back.heads, MINFERENCE_OK.heads, strict=True):
        assert a.kind == b.kind
        if a.kind != "vertical_slash" or a.layer == 1:  # sizes at or above MInference's minimums come back exact in blocks
            assert get_kind(a.kind).pattern(a.params, 2048, 16).name == get_kind(b.kind).pattern(b.params, 2048, 16).name
        assert a.expected_recall == pytest.approx(0.875)
        assert a.expected_density is not None and 0 < a.expected_density <= 1
    assert get_kind("vertical_slash").block_counts(back.entry(0, 2).params, 2048, 16) == (2, 7)  # what MInference runs


def test_minference_refuses_kinds_it_cannot_express(tmp_path):
    with pytest.raises(FormatError, match=r"head \(layer 0, head 2\) \(a_shape\) cannot be written in minference.*"
                       r"L0\.H2 a_shape, L1\.H0 block_topk, L1\.H1 block_topk"):
        export_policy(MIXED, tmp_path, "minference", seq_len=512)
    assert not (tmp_path / "minference_config.json").exists()
    (path,) = export_policy(MIXED, tmp_path, "minference", seq_len=512, lossy=True)
    back = import_policy("minference", path, MODEL, block_size=16)
    assert back.entry(0, 2).kind == "streaming" and back.entry(1, 1).kind == "block_topk"


def test_duo_round_trip(tmp_path):
    paths = export_policy(DUO_OK, tmp_path, "duo", seq_len=4096)
    assert [p.name for p in paths] == ["full_attention_heads.tsv", "config.json"]
    gates = [[float(x) for x in line.split("\t")] for line in paths[0].read_text().splitlines()]
    # real-valued gates that rank the KV heads: full ones above 0.5, streaming ones below
    assert [[g > 0.5 for g in row] for row in gates] == [[True, False], [False, True]]
    assert len({g for row in gates for g in row}) == 4
    cfg = json.loads(paths[1].read_text())
    # attnlab's window of 256 counts the query; DuoAttention's recent tokens do not
    assert (cfg["sink_size"], cfg["recent_size"]) == (64, 255)
    assert cfg["sparsity"] == pytest.approx(1.5 / 3) and "single prefill" in cfg["phase"]
    back = import_policy("duo", tmp_path, MODEL, block_size=16)
    assert [e.kind for e in back.heads] == [e.kind for e in DUO_OK.heads]
    assert back.entry(0, 2).params["window"].resolve(4096) == 256
    # with the recorded sparsity, DuoAttention's own rule picks exactly the same heads
    again = import_policy("duo", tmp_path, MODEL, block_size=16, sparsity=cfg["sparsity"])
    assert [e.kind for e in again.heads] == [e.kind for e in DUO_OK.heads]
    # DuoAttention's deployment rule: the lowest-gated share of KV heads streams
    paths[0].write_text("0.9\t0.2\n0.4\t0.7\n")
    half = import_policy("duo", paths[0], MODEL, sparsity=0.5)
    assert [half.entry(lay, 2 * kv).kind for lay in range(2) for kv in range(2)] == ["dense", "streaming", "streaming", "dense"]
    third = import_policy("duo", tmp_path, MODEL, threshold=0.3)
    assert third.entry(1, 0).kind == "dense" and third.entry(0, 2).kind == "streaming"


def test_duo_refuses_policies_it_cannot_express(tmp_path):
    mixed_group = make_policy([[("dense", {}), ("streaming", {"sink": 4, "window": 64}), ("dense", {}), ("dense", {})]] * 2)
    with pytest.raises(FormatError, match=r"head \(layer 0, head 1\).*mixes dense and streaming; generate with --gqa"):
        export_policy(mixed_group, tmp_path, "duo", seq_len=512)
    vs = make_policy([[("dense", {}), ("dense", {}), ("vertical_slash", {"vertical": 64, "slash": 64}), ("dense", {})]] * 2)
    with pytest.raises(FormatError, match=r"head \(layer 0, head 2\) \(vertical_slash\).*either full or streaming"):
        export_policy(vs, tmp_path, "duo", seq_len=512)
    two_sizes = make_policy([[("dense", {}), ("dense", {}), ("streaming", {"sink": 4, "window": 64}), ("streaming", {"sink": 4, "window": 64})],
                             [("streaming", {"sink": 4, "window": 32}), ("streaming", {"sink": 4, "window": 32}), ("dense", {}), ("dense", {})]])
    with pytest.raises(FormatError, match=r"head \(layer 1, head 0\).*one sink_size and recent_size"):
        export_policy(two_sizes, tmp_path, "duo", seq_len=512)
    assert not any(tmp_path.iterdir())


def test_existing_files_need_force(tmp_path):
    (path,) = export_policy(MIXED, tmp_path, "npz", seq_len=64)
    before = path.read_bytes()
    with pytest.raises(FormatError, match="already exists"):
        export_policy(MIXED, tmp_path, "npz", seq_len=128)
    assert path.read_bytes() == before
    export_policy(MIXED, tmp_path, "npz", seq_len=128, force=True)
    assert load_masks(path).meta["seq_len"] == 128


@pytest.mark.parametrize("kwargs,error,match", [
    ({"seq_len": 8192}, MaskError, "beyond the model's context of 4096"),
    ({"seq_len": 256, "block_size": 48}, MaskError, "power of two"),
    ({"seq_len": 0}, MaskError, "positive"),
    ({}, FormatError, "--seq-len is required"),
])
def test_bad_export_arguments_write_nothing(tmp_path, kwargs, error, match):
    out = tmp_path / "masks"
    with pytest.raises(error, match=match):
        export_policy(MIXED, out, "safetensors", **kwargs)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(FormatError, match="unknown format 'onnx'"):
        export_policy(MIXED, out, "onnx", seq_len=64)


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(FormatError, match="not a readable npz mask"):
        load_masks(junk)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(FormatError, match="no __meta__"):
        load_masks(foreign)
    st = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(st))
    with pytest.raises(FormatError, match="no attnlab mask metadata"):
        load_masks(st)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(FormatError, match="not a readable safetensors mask"):
        load_masks(bad)
    (tmp_path / "mi.json").write_text("{oops")
    with pytest.raises(FormatError, match="not a readable MInference config"):
        import_policy("minference", tmp_path / "mi.json", MODEL)
    (tmp_path / "mi2.json").write_text(json.dumps([{"0": ["vertical_and_slash", 30, 800, 0.9]}]))
    with pytest.raises(FormatError, match="the layer list has shape 1"):
        import_policy("minference", tmp_path / "mi2.json", MODEL)
    layer = {str(h): ["vertical_and_slash", 30, 800, 0.9] for h in range(4)}
    layer["2"] = ["diagonal", 1, 1, 0.5]
    (tmp_path / "mi3.json").write_text(json.dumps([layer, layer]))
    with pytest.raises(FormatError, match=r"head \(layer 0, head 2\): unknown MInference kind 'diagonal'"):
        import_policy("minference", tmp_path / "mi3.json", MODEL)
    layer["2"] = ["stream_llm", 4, -5, 0.5]
    (tmp_path / "mi4.json").write_text(json.dumps([layer, layer]))
    with pytest.raises(FormatError, match="slash_size \\(window\\) must be a positive"):
        import_policy("minference", tmp_path / "mi4.json", MODEL)
    duo = tmp_path / "duo"
    duo.mkdir()
    (duo / "full_attention_heads.tsv").write_text("1\t0\t1\n0\t1\t0\n")
    (duo / "config.json").write_text(json.dumps({"sink_size": 64, "recent_size": 256}))
    with pytest.raises(FormatError, match=r"the gate table has shape \[2, 3\]"):
        import_policy("duo", duo, MODEL)
    (duo / "full_attention_heads.tsv").write_text("1\t0\n0\t1\n")
    (duo / "config.json").write_text(json.dumps({"sink_size": 64}))
    with pytest.raises(FormatError, match="needs 'recent_size'"):
        import_policy("duo", duo, MODEL)
    with pytest.raises(FormatError, match="needs the model identity"):
        import_policy("duo", duo, None)


def test_masks_for_another_model_are_refused(tmp_path):
    (path,) = export_policy(MIXED, tmp_path, "safetensors", seq_len=64)
    with pytest.raises(FormatError, match="n_heads is 4 there and 8 here"):
        load_masks(path, model=dict(MODEL, n_heads=8, n_kv_heads=8))


def test_cli_export_and_import_round_trip(tmp_path, capsys):
    run = make_synthetic_run(tmp_path / "run", n_layers=2, n_heads=4, n_kv_heads=2, lengths=(256,), block_size=16)
    pol_path = tmp_path / "policy.json"
    PolicyGenerator(budget=0.5, gqa_consistent=True, kinds=("dense", "streaming", "vertical_slash")).fit(run).emit().save(pol_path)
    assert cli("export", str(pol_path), "--seq-len", "256", "--format", "npz", "--out", str(tmp_path / "m"), "--model", str(run.path), "--quiet") == 0
    assert "masks.npz" in capsys.readouterr().out
    assert cli("export", str(pol_path), "--seq-len", "256", "--format", "minference", "--out", str(tmp_path / "m")) == 0
    out = capsys.readouterr().out  # the policy as MInference will run it, against what was validated
    assert "as minference runs it at 256 tokens: mean density" in out and "(validated " in out
    assert cli("export", str(pol_path), "--seq-len", "256", "--format", "flex", "--out", str(tmp_path / "f0"), "--no-report") == 0
    assert "runs it" not in capsys.readouterr().out
    assert cli("import", "minference", str(tmp_path / "m" / "minference_config.json"), "--model", str(run.path),
               "--block-size", "16", "--seq-len", "256", "--out", str(tmp_path / "back.json")) == 0
    back = Policy.load(tmp_path / "back.json", model=run.model)
    orig = Policy.load(pol_path)
    assert [e.kind for e in back.heads] == [e.kind for e in orig.heads]
    # a run as --model also gives the imported heads expected recall from its statistics
    assert all(e.expected_recall is not None for e in back.heads)
    for a, b in zip(back.heads, orig.heads, strict=True):
        if a.kind == "vertical_slash":  # written with MInference's minimums: it runs at least what was validated
            assert a.expected_recall >= b.expected_recall - 1e-6
        else:
            assert a.expected_recall == pytest.approx(b.expected_recall, abs=1e-6)
    assert cli("import", "npz", str(tmp_path / "m" / "masks.npz"), "--out", str(tmp_path / "fromnpz.json")) == 0
    assert same_policy(Policy.load(tmp_path / "fromnpz.json"), orig)
    with pytest.raises(PolicyError, match="already exists"):
        cli("import", "npz", str(tmp_path / "m" / "masks.npz"), "--out", str(tmp_path / "fromnpz.json"))
    with pytest.raises(MaskError, match="beyond the model's context"):
        cli("export", str(pol_path), "--seq-len", "999999", "--format", "flex", "--out", str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_minference_config_is_per_layer_head_lists():
    cfg = minference_config(MINFERENCE_OK, 1024, lossy=True)
    assert len(cfg) == 2 and sorted(cfg[0]) == ["0", "1", "2", "3"]
    assert all(isinstance(v, list) and len(v) == 4 for layer in cfg for v in layer.values())


def _minference_file(tmp_path, entry):
    layer = {str(h): ["vertical_and_slash", 30, 800, 0.9] for h in range(4)}
    layer["1"] = entry
    path = tmp_path / "mi.json"
    path.write_text(json.dumps([layer, layer]))
    return path


@pytest.mark.parametrize("entry,match", [
    (["vertical_and_slash", 30, 800, float("nan")], r"head \(layer 0, head 1\): score \(4th field\) must be a finite number, got nan"),
    (["block_sparse", 2, 100, 0.9], r"head \(layer 0, head 1\): slash_size \(block size\) of block_sparse must be a power of two >= 16, got 100"),
    (["stream_llm", float("nan"), 10, 0.9], r"vertical_size \(sink\) must be a whole number of tokens >= 0.*got nan"),
    (["stream_llm", 4, float("inf"), 0.9], r"slash_size \(window\) must be a positive whole number of tokens.*got inf"),
    (["vertical_and_slash", 1e300, 30, 0.9], r"vertical_size must be a positive whole number of tokens \(at most 2147483648\)"),
])
def test_minference_import_refuses_non_finite_and_misread_values(tmp_path, entry, match):
    with pytest.raises(FormatError, match=match):
        import_policy("minference", _minference_file(tmp_path, entry), MODEL)


def test_import_refuses_bad_lengths_thresholds_and_empty_files(tmp_path, recwarn):
    path = _minference_file(tmp_path, ["stream_llm", 4, 10, 0.9])
    with pytest.raises(MaskError, match="sequence length 0 must be a positive integer"):
        import_policy("minference", path, MODEL, seq_len=0)
    with pytest.raises(PolicyError, match="invalid 'n_ctx'"):
        import_policy("minference", path, dict(MODEL, n_ctx=-5))
    empty = tmp_path / "masks.npz"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match=r"masks.npz is empty \(0 bytes\): not an attnlab mask file"):
        load_masks(empty)
    duo = tmp_path / "duo"
    duo.mkdir()
    (duo / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 10}))
    for text, match in [("", "full_attention_heads.tsv is empty"), ("1\tnan\n0\t1\n", r"line 1, field 2: gate 'nan' is not finite"),
                        ("1\t0\n0\tx\n", r"line 2, field 2: 'x' is not a number")]:
        (duo / "full_attention_heads.tsv").write_text(text)
        with pytest.raises(FormatError, match=match):
            import_policy("duo", duo, MODEL)
    assert not recwarn.list  # no numpy warning leaks
    (duo / "full_attention_heads.tsv").write_text("1\t0\n0\t1\n")
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(FormatError, match=r"--threshold must be a number in \[0, 1\]"):
            import_policy("duo", duo, MODEL, threshold=bad)
    (duo / "config.json").write_text('{"sink_size": NaN, "recent_size": 10}')
    with pytest.raises(FormatError, match=r"config.json: sink_size must be a whole number of tokens >= 0.*got nan"):
        import_policy("duo", duo, MODEL)


def test_old_export_files_still_import(tmp_path):
    """Files written before the exports were checked against their targets: MInference dense heads
    as (n_ctx, n_ctx), Duo 0/1 gates with recent_size = window."""
    dense_old = {str(h): ["vertical_and_slash", 4096, 4096, 1.0] for h in range(4)}
    (tmp_path / "mi.json").write_text(json.dumps([dense_old, dense_old]))
    assert {e.kind for e in import_policy("minference", tmp_path / "mi.json", MODEL).heads} == {"dense"}
    (tmp_path / "full_attention_heads.tsv").write_text("1.0\t0.0\n0.0\t1.0\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 64, "recent_size": 256, "exported_by": "attnlab"}))
    back = import_policy("duo", tmp_path, MODEL)
    assert [back.entry(lay, h).kind for lay in range(2) for h in (0, 2)] == ["dense", "streaming", "streaming", "dense"]
    assert back.entry(0, 2).params["window"].resolve(4096) == 257  # what DuoAttention runs from it
