"""Run directories: atomic writes, resume after interruption, --force, and readers' checks."""

from __future__ import annotations

import importlib
import json
import os

import pandas as pd
import pytest
import torch

from attnlab.errors import RunError
from attnlab.profile import head_means, profile, summarize
from attnlab.prompts import builtin_prompts
from attnlab.runs import HEAD_STATS, Run, atomic_path, partial_dir, write_json
from attnlab.stats import StatConfig

# attnlab.capture / attnlab.profile are the functions; the modules are reached by name
capture_module = importlib.import_module("attnlab.capture")
profile_module = importlib.import_module("attnlab.profile")

CFG = StatConfig(block_size=16, query_chunk=32, windows=(4, 16), budgets=(4, 16))


def _prompts(model, n=4):
    return builtin_prompts(model.tokenizer, [40, 72], n, seed=3)


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "table.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_profile_writes_a_complete_run(tiny_llama, tmp_path):
    prompts = _prompts(tiny_llama)
    run = profile(tiny_llama, prompts, tmp_path / "r", config=CFG, progress=False)
    assert run.manifest["status"] == "complete"
    assert run.manifest["model"]["n_kv_heads"] == 2
    table = run.head_stats()
    assert list(table.columns) == ["layer", "head", "kv_head", "statistic", "probe", "sample", "n_tokens", "value"]
    assert len(table) == 4 * tiny_llama.n_layers * tiny_llama.n_heads * len(CFG.names)
    assert (table["kv_head"] == table["head"] // 2).all()
    maps = run.block_maps()
    assert maps.block_size == 16
    assert maps.mass_sum.shape == (2, 4, 5, 5)  # longest prompt 72 tokens -> 5 blocks of 16
    # q-blocks measured by every sample (the first 3 of 40-token prompts) have rows summing to 1
    assert maps.count[0, 0] == 4 and maps.count[4, 0] == 2
    torch.testing.assert_close(maps.mass_sum[:, :, :3].sum(-1), torch.ones(2, 4, 3), atol=1e-5, rtol=0)
    # the per-sample values equal a direct capture of the same prompt
    direct = capture_module.capture(tiny_llama, prompts[1].input_ids, CFG).values()
    s1 = table[table["sample"] == 1]
    got = torch.tensor(s1.pivot_table(index=["layer", "head"], columns="statistic", values="value", observed=True)[CFG.names].to_numpy())
    torch.testing.assert_close(got.float(), direct.reshape(-1, len(CFG.names)), atol=1e-6, rtol=0)
    assert "top sink heads" in summarize(run)
    assert len(head_means(run)) == tiny_llama.n_layers * tiny_llama.n_heads
    assert not partial_dir(tmp_path / "r").exists()


def test_interrupted_profile_resumes(tiny_llama, tmp_path, monkeypatch):
    prompts = _prompts(tiny_llama, n=5)
    out = tmp_path / "r"
    real_capture = profile_module.capture
    calls = []

    def flaky(model, ids, config, **kw):
        calls.append(kw["name"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_capture(model, ids, config, **kw)

    monkeypatch.setattr(profile_module, "capture", flaky)
    with pytest.raises(KeyboardInterrupt):
        profile(tiny_llama, prompts, out, config=CFG, progress=False)
    assert not out.exists(), "an interrupted run must not look complete"
    assert partial_dir(out).is_dir()
    with pytest.raises(RunError, match="incomplete"):
        Run.open(out)

    calls.clear()
    monkeypatch.setattr(profile_module, "capture", lambda *a, **kw: (calls.append(kw["name"]), real_capture(*a, **kw))[1])
    resumed = profile(tiny_llama, prompts, out, config=CFG, progress=False)
    assert calls == [p.name for p in prompts[2:]], "only the unfinished samples are recomputed"
    fresh = profile(tiny_llama, prompts, tmp_path / "fresh", config=CFG, progress=False)
    pd.testing.assert_frame_equal(resumed.head_stats(), fresh.head_stats())
    torch.testing.assert_close(resumed.block_maps().mass_sum, fresh.block_maps().mass_sum)


def test_other_parameters_do_not_resume_a_partial_run(tiny_llama, tmp_path, monkeypatch):
    prompts = _prompts(tiny_llama)
    out = tmp_path / "r"

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_module, "capture", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile(tiny_llama, prompts, out, config=CFG, progress=False)
    monkeypatch.undo()
    with pytest.raises(RunError, match="different parameters"):
        profile(tiny_llama, prompts[:2], out, config=CFG, progress=False)
    run = profile(tiny_llama, prompts[:2], out, config=CFG, progress=False, force=True)
    assert run.manifest["parameters"]["lengths"] == [40, 72]


def test_existing_run_needs_force(tiny_llama, tmp_path):
    prompts = _prompts(tiny_llama, n=1)
    out = tmp_path / "r"
    profile(tiny_llama, prompts, out, config=CFG, progress=False)
    before = (out / HEAD_STATS).read_bytes()
    with pytest.raises(RunError, match="--force"):
        profile(tiny_llama, _prompts(tiny_llama, n=2), out, config=CFG, progress=False)
    assert (out / HEAD_STATS).read_bytes() == before
    run = profile(tiny_llama, _prompts(tiny_llama, n=2), out, config=CFG, progress=False, force=True)
    assert run.head_stats()["sample"].nunique() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_unwritable_parent(tiny_llama, tmp_path, monkeypatch):
    # root may write anywhere, so stand in for a read-only folder by denying access checks
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(locked))
    with pytest.raises(RunError, match="cannot write to .*locked is not writable"):
        profile(tiny_llama, _prompts(tiny_llama, n=1), locked / "r", config=CFG, progress=False)
    assert list(locked.iterdir()) == []


def test_out_under_a_file_is_refused(tiny_llama, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunError, match="not a directory"):
        profile(tiny_llama, _prompts(tiny_llama, n=1), tmp_path / "afile" / "r", config=CFG, progress=False)


def test_readers_refuse_bad_runs(tmp_path, tiny_llama):
    with pytest.raises(RunError, match="no run directory"):
        Run.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="no manifest.json"):
        Run.open(tmp_path / "plain")
    run = profile(tiny_llama, _prompts(tiny_llama, n=1), tmp_path / "r", config=CFG, progress=False)
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["schema"] = 0
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="schema version 0"):
        Run.open(run.path)
    manifest["schema"] = 1
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    (run.path / HEAD_STATS).write_bytes(b"not parquet at all")
    with pytest.raises(RunError, match="not a readable Parquet file"):
        Run.open(run.path).head_stats()
    with pytest.raises(RunError, match="attnlab probe"):
        Run.open(run.path).detections()
