"""The core seams: model identity, the run store's artifact registry, head labels and hook names,
the shared CLI argument types — and runs written before the change still open."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from attnlab.cliargs import (
    add_subcommands,
    fraction,
    int_list,
    name_list,
    positive_int,
    unit_float,
    unit_float_list,
)
from attnlab.errors import AttnlabError, RunError
from attnlab.identity import IdentityError, ModelIdentity
from attnlab.models import tiny_model
from attnlab.names import attn_hook, head_label, parse_head_label
from attnlab.runs import (
    ARTIFACTS,
    BLOCK_MAPS,
    CIRCUIT,
    DETECTIONS,
    FAMILIES,
    HEAD_STATS,
    MANIFEST,
    Run,
    check_writable_target,
    ensure_run,
    preflight_run,
)

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_RUN = FIXTURES / "run_v0_1_0"


# -- model identity ---------------------------------------------------------------------------
def test_identity_is_a_frozen_mapping_that_round_trips(tiny_llama):
    ident = tiny_llama.identity()
    assert ident["n_layers"] == tiny_llama.n_layers and dict(ident)["n_kv_heads"] == tiny_llama.n_kv_heads
    assert ident.fingerprint and len(ident.fingerprint) == 16
    again = ModelIdentity.from_dict(json.loads(json.dumps(ident.to_dict())))
    assert again == ident
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.n_layers = 3


def test_fingerprint_tells_weights_apart_not_names(tiny_llama):
    same = tiny_model("llama")  # same seed: same weights, another object
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    assert same.identity().fingerprint == tiny_llama.identity().fingerprint
    assert other.identity().fingerprint != tiny_llama.identity().fingerprint
    renamed = ModelIdentity.from_dict({**tiny_llama.identity().to_dict(), "name": "./somewhere/tiny"})
    assert tiny_llama.identity().mismatch(renamed) is None  # the same model under another spelling
    field, _, _ = tiny_llama.identity().mismatch(other.identity())
    assert field == "fingerprint"


def test_the_one_check_names_the_first_differing_field(tiny_llama, tiny_gpt2):
    with pytest.raises(IdentityError, match=r"n_heads is 4 there and 4 here|n_kv_heads is 4 there and 2 here"):
        tiny_llama.identity().check(tiny_gpt2.identity(), subject="run r1")
    with pytest.raises(IdentityError) as err:
        tiny_llama.identity().check({**tiny_llama.identity().to_dict(), "n_layers": 7}, subject="policy p.json")
    assert "policy p.json" in str(err.value) and "n_layers is 7 there and 2 here" in str(err.value)
    assert isinstance(err.value, AttnlabError)


def test_legacy_identities_without_fingerprint_compare_by_name(tiny_llama):
    legacy = {k: v for k, v in tiny_llama.identity().to_dict().items() if k != "fingerprint"}
    assert tiny_llama.identity().mismatch(legacy) is None
    assert tiny_llama.identity().mismatch({**legacy, "name": "another"})[0] == "name"


@pytest.mark.parametrize("bad", [{"n_layers": 0, "n_heads": 4}, {"n_layers": "x", "n_heads": 4}, {"n_heads": 4}, {"n_layers": True, "n_heads": 4}, []])
def test_unusable_identities_are_refused(bad):
    with pytest.raises(IdentityError, match="no usable model identity"):
        ModelIdentity.from_dict(bad, where="policy p.json")


# -- names ------------------------------------------------------------------------------------
def test_head_labels_and_hook_names():
    assert head_label(18, 6) == "L18.H6" and parse_head_label(" l18.h6 ") == (18, 6)
    assert parse_head_label(head_label(3, 11)) == (3, 11)
    with pytest.raises(AttnlabError, match="L<layer>.H<head>"):
        parse_head_label("18.6")
    assert attn_hook(2) == "blocks.2.attn.hook_pattern" and attn_hook(0, "hook_z") == "blocks.0.attn.hook_z"
    with pytest.raises(AttnlabError, match="unknown attention hook"):
        attn_hook(0, "hook_nope")


# -- the artifact registry --------------------------------------------------------------------
def test_registry_declares_every_artifact_once():
    names = [a.filename for a in ARTIFACTS.values()]
    assert len(names) == len(set(names))
    for art in ARTIFACTS.values():
        assert art.format in ("parquet", "csv", "json", "safetensors") and art.holds and art.made_by.startswith("attnlab ")
    assert HEAD_STATS.columns[:2] == ("layer", "head") and "head_type" in DETECTIONS.columns


def _copy_legacy(tmp_path: Path) -> Run:
    dst = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN, dst)
    return Run.open(dst)


def test_a_run_written_before_the_change_opens_unchanged(tmp_path, tiny_llama):
    run = _copy_legacy(tmp_path)
    assert run.identity.fingerprint is None and run.identity.n_heads == 4
    stats = run.read(HEAD_STATS)
    assert set(HEAD_STATS.columns) <= set(stats.columns) and len(stats) > 0
    assert run.block_maps().mass_sum.shape[:2] == (2, 4)
    assert set(run.detections()["head_type"]) >= {"sink"}
    run.check_model(tiny_llama)  # same name and shape: the legacy rule accepts it
    with pytest.raises(IdentityError, match="name is 'tiny-llama' there and 'x' here"):
        run.check_model({**tiny_llama.identity().to_dict(), "name": "x"})  # a legacy run has only its name


def test_read_checks_columns_and_names_the_command(tmp_path):
    run = _copy_legacy(tmp_path)
    pd.DataFrame({"layer": [0], "head": [0]}).to_parquet(run.file(DETECTIONS))
    with pytest.raises(RunError, match=r"lacks the column\(s\) kv_head, head_type.*attnlab probe all --model tiny-llama"):
        run.read(DETECTIONS)
    assert run.read_optional(FAMILIES) is None  # absent: not made yet
    run.file(FAMILIES).write_bytes(b"PAR1 truncated")
    with pytest.raises(RunError, match="not a readable Parquet file"):
        run.read_optional(FAMILIES)  # present but broken: an error, never "absent"
    with pytest.raises(RunError, match="has no circuit.json: run `attnlab circuit"):
        run.read(CIRCUIT)


def test_write_is_atomic_and_checks_columns(tmp_path):
    run = _copy_legacy(tmp_path)
    with pytest.raises(ValueError, match="needs column"):
        run.write(DETECTIONS, pd.DataFrame({"layer": [0]}))
    assert set(run.detections()["head_type"]) >= {"sink"}  # the old file is untouched
    run.write(CIRCUIT, {"nodes": []})
    assert run.read(CIRCUIT) == {"nodes": []}
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_record_stage_merges_parameters_and_summary(tmp_path):
    run = _copy_legacy(tmp_path)
    run.record_stage("probe:x", parameters={"a": 1})
    run.record_stage("probe:x", summary={"acc": 0.5})
    stage = Run.open(run.path).manifest["stages"]["probe:x"]
    assert stage["parameters"] == {"a": 1} and stage["summary"] == {"acc": 0.5}


def test_preflight_and_ensure_run_use_the_identity_check(tmp_path, tiny_llama, tiny_gpt2):
    out = tmp_path / "r"
    preflight_run(out, tiny_llama)  # absent and writable: fine, creates nothing
    assert not out.exists()
    run = ensure_run(out, tiny_llama, "probe:test", {"k": 1})
    assert run.identity == tiny_llama.identity() and run.manifest["stages"]["probe:test"]["parameters"] == {"k": 1}
    with pytest.raises(IdentityError, match=f"run {out}"):
        preflight_run(out, tiny_gpt2)
    with pytest.raises(IdentityError):
        ensure_run(out, tiny_model("llama", seed=1), "probe:test", {})


def test_force_replaces_runs_but_never_another_folder(tmp_path):
    keep = tmp_path / "d"
    keep.mkdir()
    (keep / "keep").write_text("x")
    with pytest.raises(RunError, match="not an attnlab run"):
        check_writable_target(keep, force=True)
    assert (keep / "keep").read_text() == "x"
    legacy = _copy_legacy(tmp_path)
    assert check_writable_target(legacy.path, force=True) == legacy.path
    (tmp_path / "empty").mkdir()
    check_writable_target(tmp_path / "empty", force=True)


def test_artifacts_are_path_like(tmp_path):
    run = _copy_legacy(tmp_path)
    assert (run.path / MANIFEST).is_file() and str(BLOCK_MAPS) == "block_maps.safetensors"
    assert run.has(BLOCK_MAPS) and run.has("block_maps") and run.has("block_maps.safetensors")
    with pytest.raises(RunError, match="unknown run artifact"):
        run.has("nope.txt")


# -- CLI argument types -----------------------------------------------------------------------
@pytest.mark.parametrize("parse,text", [(positive_int, "0"), (positive_int, "-1"), (positive_int, "x"), (unit_float, "nan"),
                                        (unit_float, "inf"), (unit_float, "0"), (unit_float, "1.5"), (fraction, "-0.1"),
                                        (int_list, ""), (int_list, "512,-3"), (unit_float_list, "0.1,nan")])
def test_cli_types_refuse_out_of_range_values(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_cli_types_parse_good_values():
    assert int_list("512, 1024") == [512, 1024] and unit_float("1") == 1.0 and fraction("0") == 0.0
    assert name_list(("a", "b", "c"))("c,a,c") == ["c", "a"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown 'd'"):
        name_list(("a", "b"))("a,d")


def test_subcommands_with_a_default():
    parser = argparse.ArgumentParser(prog="attnlab")
    sub = add_subcommands(parser, dest="cmd", default="make")
    make = sub.add_parser("make")
    make.add_argument("run")
    sub.add_parser("compare").add_argument("run")
    assert vars(parser.parse_args(["runs/r1"])) == {"cmd": "make", "run": "runs/r1"}
    assert vars(parser.parse_args(["compare", "runs/r1"])) == {"cmd": "compare", "run": "runs/r1"}
    assert list(sub.choices) == ["make", "compare"]


# -- the public API ---------------------------------------------------------------------------
def test_public_api_resolves_every_name():
    import attnlab

    missing = [name for name in attnlab.__all__ if getattr(attnlab, name, None) is None]
    assert not missing
    assert callable(attnlab.capture) and callable(attnlab.profile)  # not the submodules of the same name
    import attnlab.capture  # noqa: F401 - importing the submodule must not shadow the function

    assert callable(attnlab.capture)
    assert "HeadStatAccumulator" not in attnlab.__all__  # internals stay in their modules


def test_import_attnlab_is_lazy():
    import subprocess
    import sys

    code = "import sys, attnlab; print('torch' in sys.modules, 'attnlab.sparsity_stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
