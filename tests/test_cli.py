"""The CLI: a real profile through the console script, and one-line errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_models import save_tiny_llama

from attnlab.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny_llama(d)
    return d


def test_profile_and_info_through_the_console_script(tiny_dir, tmp_path):
    out = tmp_path / "runs" / "r1"
    cmd = [sys.executable, "-m", "attnlab.cli", "profile", "--model", str(tiny_dir), "--samples", "3",
           "--lengths", "40,70", "--block-size", "16", "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top sink heads" in done.stdout and "most local heads" in done.stdout and "most diffuse heads" in done.stdout
    assert (out / "head_stats.parquet").is_file() and (out / "block_maps.safetensors").is_file()
    info = subprocess.run([sys.executable, "-m", "attnlab.cli", "info", str(out)], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0
    assert "model.n_kv_heads: 1" in info.stdout and "lengths: [40, 70, 40]" in info.stdout


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_existing_out_without_force(capsys, tmp_path, tiny_dir):
    (tmp_path / "r").mkdir()
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--out", str(tmp_path / "r")])
    assert "--force" in err


def test_prompt_longer_than_context(capsys, tmp_path, tiny_dir):
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--lengths", "300", "--samples", "1", "--out", str(tmp_path / "r")])
    assert "300 tokens" in err and "at most 256" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "is empty"), (b"\xff\xfe\x00bad bytes", "not UTF-8"), (b"too short", "fewer than")],
)
def test_bad_text_files(capsys, tmp_path, tiny_dir, content, expected):
    f = tmp_path / "prompts.txt"
    f.write_bytes(content)
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--prompts", str(f), "--lengths", "64", "--out", str(tmp_path / "r")])
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_out_below_a_file(capsys, tmp_path, tiny_dir):
    (tmp_path / "f").write_text("x")
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--out", str(tmp_path / "f" / "r")])
    assert "not a directory" in err


def test_missing_model_path(capsys, tmp_path):
    err = _error(capsys, ["profile", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "r")])
    assert "smollm2-135m" in err
    assert not (tmp_path / "r").exists()


def test_unknown_hub_model_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "attnlab.cli", "profile", "--model", "nobody/nothing", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: could not load model 'nobody/nothing'")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_models_lists_the_embedded_model(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
