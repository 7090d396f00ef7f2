"""The variants benchmark's parsing: a variant's protected layers reach its dynamic baselines, and
a baseline spec with dense layers builds the policy it names."""


import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("task_suite_variants.py")


def test_a_variants_protected_layers_are_read_from_its_flags(bench):
    v = bench.parse_variant("p68n=tasks:16:--protect-layers 6-8 --protect none")
    assert v["flags"] == ["--protect-layers", "6-8", "--protect", "none"]
    assert bench.protected_layers(v["flags"]) == [6, 7, 8]
    assert bench.protected_layers(["--protect-layers=5,9-10"]) == [5, 9, 10]
    assert bench.protected_layers(["--protect", "floor"]) == []
    with pytest.raises(SystemExit, match="NAME=PROMPTS:BLOCK"):
        bench.parse_variant("p68n=tasks")


def test_a_baseline_spec_with_dense_layers_builds_that_policy(bench, tiny_llama, tmp_path):
    plain = bench.method_policy(tiny_llama, "flexprefill:gamma=0.8@16")
    assert plain.block_size == 16 and {h.kind for h in plain.heads} == {"flexprefill"}
    dense = bench.method_policy(tiny_llama, "xattention[dense1]:tau=0.4@32")
    assert dense.block_size == 32
    assert {(h.layer, h.kind) for h in dense.heads} == {(0, "xattention"), (1, "dense")}
    assert dense.heads[0].params["tau"] == 0.4
    path = dense.save(tmp_path / "p.json")
    assert bench.method_policy(tiny_llama, str(path)).to_dict()["heads"] == dense.to_dict()["heads"]
