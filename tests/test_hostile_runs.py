"""Hostile input against the run store: broken manifests, concurrent writers, permissions.

Concurrency cases run real processes (``multiprocessing`` with fork), not threads."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest

from attnlab.errors import RunError
from attnlab.identity import IdentityError
from attnlab.runs import CIRCUIT, MANIFEST, Run, file_lock, load_json, partial_dir, write_json

LEGACY_RUN = Path(__file__).parent / "fixtures" / "run_v0_1_0"


@pytest.fixture
def run(tmp_path) -> Run:
    shutil.copytree(LEGACY_RUN, tmp_path / "r")
    return Run.open(tmp_path / "r")


@pytest.mark.parametrize(
    "manifest,match",
    [
        ([1, 2], "not an attnlab manifest"),
        ({"schema": 1, "status": "complete", "model": "tiny"}, "no usable model identity"),
        ({"schema": 1, "status": "complete", "model": {"n_layers": -2, "n_heads": 4}}, "no usable model identity"),
        ({"schema": 1, "status": "complete", "model": {"n_layers": 2, "n_heads": 4}, "stages": [1]}, "malformed stages"),
        ({"schema": 7, "status": "complete"}, "schema version 7"),
    ],
    ids=["list", "model-string", "negative-layers", "stages-list", "schema"],
)
def test_malformed_manifests_are_one_clear_error(run, manifest, match):
    (run.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises((RunError, IdentityError), match=match):
        Run.open(run.path)


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RunError, match="nested too deeply"):
        load_json(deep, what="policy", fix="re-create it")


def test_a_deep_manifest_is_refused_cleanly(run):
    (run.path / MANIFEST).write_text('{"schema": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RunError, match="nested too deeply.*re-create the run"):
        Run.open(run.path)


def _add_stages(path: str, prefix: str, n: int) -> None:
    run = Run.open(path)
    for i in range(n):
        run.record_stage(f"{prefix}{i}", summary={"i": i})


def test_concurrent_writers_never_lose_each_others_stages(run):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_add_stages, args=(str(run.path), p, 15)) for p in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stages = Run.open(run.path).manifest["stages"]
    assert {f"{p}{i}" for p in "abc" for i in range(15)} <= set(stages)


def _hold_lock(folder: str, ready, release) -> None:
    with file_lock(folder):
        ready.set()
        release.wait(30)


def test_a_held_lock_names_its_holder_and_a_dead_one_is_free(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(RunError, match=f"pid {holder.pid}.*wait for it to finish"):
        with file_lock(tmp_path, wait=False):
            pass
    holder.kill()  # a killed writer leaves no stale lock behind
    holder.join(30)
    with file_lock(tmp_path, wait=False):
        pass


def test_a_second_profile_on_the_same_out_is_refused(tiny_llama, tmp_path):
    from attnlab.profile import profile
    from attnlab.prompts import builtin_prompts
    from attnlab.stats import StatConfig

    out = tmp_path / "r"
    partial = partial_dir(out)
    partial.mkdir()
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(partial), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        prompts = builtin_prompts(tiny_llama.tokenizer, [32], 1)
        with pytest.raises(RunError, match=f"being written by attnlab \\(pid {holder.pid}\\)"):
            profile(tiny_llama, prompts, out, config=StatConfig(block_size=16, windows=(16,)), progress=False)
        assert partial.is_dir() and not out.exists()
    finally:
        release.set()
        holder.join(30)
    run = profile(tiny_llama, prompts, out, config=StatConfig(block_size=16, windows=(16,)), progress=False)
    assert run.head_stats()["sample"].nunique() == 1


def test_outputs_honour_the_umask(run):
    old = os.umask(0o027)
    try:
        write_json(run.file(CIRCUIT), {"nodes": []})
    finally:
        os.umask(old)
    assert (run.file(CIRCUIT).stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("out", ["", ".", "x/..", "  "])
def test_out_that_names_no_new_folder_is_refused(tmp_path, monkeypatch, out):
    from attnlab.runs import check_writable_target

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match="names no new folder"):
        check_writable_target(out, force=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device,match", [("tpu9", "not a torch device"), ("cuda", "no CUDA device"), ("meta", "not supported")])
def test_bad_devices_fail_before_loading(device, match):
    import torch

    from attnlab.errors import ModelLoadError
    from attnlab.models import check_device

    if device == "cuda" and torch.cuda.is_available():
        match = "cuda"  # on a GPU machine cuda is fine; the index check below still applies
        assert check_device("cuda").type == "cuda"
        with pytest.raises(ModelLoadError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
        return
    with pytest.raises(ModelLoadError, match=match):
        check_device(device)


def test_info_refuses_a_profile_run_without_statistics(run, capsys):
    from attnlab.cli import main
    from attnlab.runs import HEAD_STATS

    stats = run.head_stats()
    run.write(HEAD_STATS, stats.assign(value=float("nan")))
    assert main(["info", str(run.path)]) == 2
    assert "only NaN statistics" in capsys.readouterr().err
    run.file(HEAD_STATS).unlink()
    assert main(["info", str(run.path)]) == 2
    assert "has lost its head_stats.parquet" in capsys.readouterr().err


def test_a_killed_writers_temporary_is_cleaned_a_live_ones_kept(run):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run.path / f".{CIRCUIT.filename}.{dead.pid}.abc123.tmp"
    live = run.path / f".{CIRCUIT.filename}.{os.getpid()}.def456.tmp"
    stale.write_text("half")
    live.write_text("half")
    write_json(run.file(CIRCUIT), {"nodes": []})
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("reader", ["policy", "minference", "circuit", "jsonl-prompts", "manifest"])
def test_every_json_reader_refuses_deep_nesting_with_one_line(tmp_path, reader, tiny_llama):
    """JSON nested 10^5 levels (a RecursionError in the parser) is one clear error everywhere."""
    from attnlab.errors import AttnlabError

    deep = "[" * 100_000 + "]" * 100_000
    if reader == "policy":
        from attnlab.sparsity_stats import Policy

        (tmp_path / "p.json").write_text(deep)
        call = lambda: Policy.load(tmp_path / "p.json")  # noqa: E731
    elif reader == "minference":
        from attnlab.sparsity_stats import import_policy

        (tmp_path / "m.json").write_text(deep)
        call = lambda: import_policy("minference", tmp_path / "m.json", model=tiny_llama.identity().to_dict(), seq_len=256)  # noqa: E731
    elif reader == "circuit":
        from attnlab.circuits import load_circuit

        (tmp_path / "c.json").write_text(deep)
        call = lambda: load_circuit(tmp_path / "c.json")  # noqa: E731
    elif reader == "jsonl-prompts":
        from attnlab.prompts import jsonl_prompts

        (tmp_path / "p.jsonl").write_text(deep + "\n")
        call = lambda: jsonl_prompts(tiny_llama.tokenizer, tmp_path / "p.jsonl")  # noqa: E731
    else:
        shutil.copytree(LEGACY_RUN, tmp_path / "r")
        (tmp_path / "r" / MANIFEST).write_text(deep)
        call = lambda: Run.open(tmp_path / "r")  # noqa: E731
    with pytest.raises(AttnlabError, match="nested too deeply"):
        call()


def test_output_files_share_one_preflight(tmp_path):
    from attnlab.runs import check_output_files

    (tmp_path / "afile").write_text("x")
    (tmp_path / "exists.json").write_text("{}")
    with pytest.raises(RunError, match="afile is not a directory"):
        check_output_files([tmp_path / "afile" / "policy.json"], force=True)
    with pytest.raises(RunError, match="already exists: pass --force"):
        check_output_files([tmp_path / "exists.json"], force=False)
    with pytest.raises(ValueError, match="is a folder"):
        check_output_files([tmp_path], force=True, error=ValueError)
    assert check_output_files([tmp_path / "exists.json", tmp_path / "new" / "p.json"], force=True)[1].name == "p.json"
    assert not (tmp_path / "new").exists()  # nothing created


def _add_detections(path: str, head_type: str, n: int) -> None:
    import pandas as pd

    from attnlab.probes.detections import write_detections

    for i in range(n):
        rows = pd.DataFrame([{"layer": 0, "head": h, "kv_head": 0, "head_type": head_type, "score": 1.0,
                              "probe": f"p{i}", "evidence": "{}"} for h in range(2)])
        write_detections(path, rows)


def test_concurrent_probes_never_lose_each_others_detections(run):
    ctx = mp.get_context("fork")
    kinds = ("previous_token", "duplicate_token", "induction")
    procs = [ctx.Process(target=_add_detections, args=(str(run.path), k, 8)) for k in kinds]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    det = Run.open(run.path).detections()
    for k in kinds:
        assert len(det[det["head_type"] == k]) == 16  # 8 probes x 2 heads each, none lost
    assert set(det["head_type"]) >= {"sink"}  # what the run had before is kept


def test_dashboard_beyond_loopback_warns(monkeypatch, capsys, tmp_path):
    from attnlab.app import cli as app_cli
    from attnlab.cli import main

    class Started(Exception):
        """Stands in for the server taking over the process."""

    started = []

    def start(*args, **kwargs):
        started.append(args)
        raise Started

    monkeypatch.setattr(app_cli.os, "execve", start)
    monkeypatch.setattr(app_cli.subprocess, "call", start)
    (tmp_path / "runs").mkdir()
    with pytest.raises(Started):
        main(["dashboard", str(tmp_path / "runs"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0" in err and "no login" in err and len(started) == 1
    with pytest.raises(Started):
        main(["dashboard", str(tmp_path / "runs")])
    assert "warning" not in capsys.readouterr().err and len(started) == 2


def test_a_small_npz_holding_a_huge_array_is_refused_before_loading(tmp_path):
    import numpy as np

    from attnlab.sparsity_stats import FormatError, load_masks
    from attnlab.sparsity_stats.export import MASKS_FORMAT, MASKS_SCHEMA

    meta = {"format": MASKS_FORMAT, "schema": MASKS_SCHEMA, "seq_len": 64, "block_size": 16, "n_heads": 1}
    path = tmp_path / "masks.npz"
    np.savez_compressed(path, __meta__=np.array(json.dumps(meta)), **{"layer0.kv_index": np.zeros(4 << 20, dtype=np.int8)})
    assert path.stat().st_size < 100_000  # 4 MiB of zeros compress to almost nothing
    with pytest.raises(FormatError, match="larger than any layout of its declared shape"):
        load_masks(path)


# -- messages that mislead (issue 13): each names the real problem --------------------------------
def _one_error_line(capsys, argv, printed: list[str] | None = None) -> str:
    """The one ``error:`` line of a failing command (its stdout appended to ``printed``)."""
    from attnlab.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    if printed is not None:
        printed.append(captured.out)
    return err


def test_a_file_given_as_a_run_is_called_a_file(tmp_path, capsys):
    pol = tmp_path / "pol.json"
    pol.write_text("{}")
    err = _one_error_line(capsys, ["info", str(pol)])
    assert "pol.json is a file, not a run directory" in err and "attnlab profile --out" not in err
    err = _one_error_line(capsys, ["info", str(tmp_path / "missing.json")])
    assert "a run is a folder, not a file" in err and "attnlab profile --out" not in err
    with pytest.raises(RunError, match="no run directory at .*attnlab profile --out"):  # a folder name: create one there
        Run.open(tmp_path / "r1")


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, tiny_llama):
    from attnlab.runs import ensure_run, preflight_run

    f = tmp_path / "f.txt"
    f.write_text("keep")
    # before the model loads: the model path does not even exist
    err = _one_error_line(capsys, ["circuit", "--model", str(tmp_path / "no-model"), "--task", "ioi", "--out", str(f)])
    assert f"--out {f} is a file, not a run directory" in err and "attnlab profile --out" not in err
    policy = Path(__file__).parent / "fixtures" / "policy_v0_1_0.json"
    err = _one_error_line(capsys, ["validate", str(policy), "--model", str(tmp_path / "no-model"), "--out", str(f)])
    assert f"--out {f} is a file, not a run directory" in err
    for call in (lambda: preflight_run(f, tiny_llama), lambda: ensure_run(f, tiny_llama, "circuit", {})):
        with pytest.raises(RunError, match="is a file, not a run directory: give a new folder or an existing run"):
            call()
    assert f.read_text() == "keep"


def test_json_beyond_the_parsers_limits_is_one_error(tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"schema": ' + "9" * 5000 + "}")
    with pytest.raises(RunError, match="big.json is not a usable policy .*re-create it"):
        load_json(big, what="policy", fix="re-create it")


def test_a_port_in_use_is_reported_and_nothing_claims_to_serve(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        printed: list[str] = []
        err = _one_error_line(capsys, ["dashboard", str(tmp_path), "--port", str(port)], printed)
    assert f"port {port} on 127.0.0.1 is already in use" in err and f"--port {port + 1}" in err
    # the URL line is printed only once the port is known to be free; here it never was
    assert "http://" not in printed[0]


def test_validate_needle_errors_name_validates_own_options(tiny_llama):
    from attnlab.probes.base import ProbeError
    from attnlab.sparsity_stats.validation import needle_accuracy

    with pytest.raises(ProbeError, match=r"lower --needle-length to at most") as exc:
        needle_accuracy(tiny_llama, None, 1, 99_999, progress=False)
    assert "--lengths" not in str(exc.value)
    with pytest.raises(ProbeError, match=r"raise --needle-length to at least") as exc:
        needle_accuracy(tiny_llama, None, 1, 10, progress=False)
    assert "--lengths" not in str(exc.value)


def test_a_truncated_or_inconsistent_block_map_file_is_one_error_naming_it(run, capsys):
    from attnlab.runs import BLOCK_MAPS, BlockMaps

    maps = run.block_maps()
    path = run.file(BLOCK_MAPS)
    BlockMaps(maps.block_size, maps.mass_sum, maps.mass_max, maps.count[:-1]).save(path)
    with pytest.raises(RunError, match=r"block_maps.safetensors is not an attnlab block-map file .*count .* do not fit together.*attnlab profile"):
        run.block_maps()
    maps.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _one_error_line(capsys, ["policy", str(run.path), "--out", str(run.path.parent / "p.json"), "--quiet"])
    assert "block_maps.safetensors is not a readable block-map file" in err and "re-create it with `attnlab profile" in err


@pytest.mark.parametrize("command", [["policy"], ["policy", "compare"]])
@pytest.mark.parametrize("out", [".", "x/..", "x/../.", ""])
def test_an_out_that_names_a_folder_is_refused_and_leaves_nothing(run, tmp_path, capsys, monkeypatch, out, command):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in run.path.iterdir())
    err = _one_error_line(capsys, [*command, str(run.path), "--out", out, "--quiet"])
    assert "give a file path for --out" in err
    assert list(work.iterdir()) == [] and not list(tmp_path.glob("*partial*"))
    assert sorted(p.name for p in run.path.iterdir()) == before, "'' is not the run's default output"


def test_the_option_the_causal_check_error_names_exists():
    """The retrieval probe's causal-check error says "lower --causal-ks": that spelling works."""
    from attnlab.cli import build_parser

    args = build_parser().parse_args(["probe", "retrieval", "--out", "r", "--causal-ks", "2,3"])
    assert args.causal_k == [2, 3]
    assert build_parser().parse_args(["probe", "retrieval", "--out", "r", "--causal-k", "4"]).causal_k == [4]
