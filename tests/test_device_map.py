"""Models placed with a device map (accelerate): same numbers as on one device, hooks on every
layer, one-line errors for a map that cannot place the model.

This machine has no GPU, so every map here names the CPU; a model loaded with a device map
always runs under accelerate's hooks (`attnlab.models._dispatch_on_one_device`), so these tests
exercise the path a multi-GPU run takes: each decoder layer's hook moves its inputs to the
layer's device, and the stages create their tensors on `LoadedModel.layer_device`.
"""

from __future__ import annotations

import collections
import json
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import random_ids
from test_models import save_tiny_llama

from attnlab.capture import capture
from attnlab.cli import main
from attnlab.errors import AttnlabError, ModelLoadError
from attnlab.models import load_model

TINY_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
            "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip


def smollm_map(n_layers: int = 30) -> dict[str, str]:
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n_layers)},
            "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model") / "tiny"
    save_tiny_llama(d)
    return d


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    """The tiny model on one device, and the same model loaded with an explicit device map."""
    return load_model(tiny_dir), load_model(tiny_dir, device_map=TINY_MAP)


@contextmanager
def layer_hooks_seen():
    """Counts, by module class, the calls of accelerate's device-moving hook."""
    import accelerate.hooks as hooks

    seen: collections.Counter = collections.Counter()
    original = hooks.AlignDevicesHook.pre_forward

    def pre_forward(self, module, *args, **kwargs):
        seen[type(module).__name__] += 1
        return original(self, module, *args, **kwargs)

    hooks.AlignDevicesHook.pre_forward = pre_forward
    try:
        yield seen
    finally:
        hooks.AlignDevicesHook.pre_forward = original


# ---------------------------------------------------------------------------------------
# the tiny model: placement, forward, capture, executors
# ---------------------------------------------------------------------------------------
def test_a_device_map_places_every_layer_and_keeps_the_identity(tiny_pair):
    single, placed = tiny_pair
    assert single.device_map is None and placed.device_map == TINY_MAP
    assert placed.device == torch.device("cpu")
    assert [placed.layer_device(i) for i in range(2)] == [torch.device("cpu")] * 2
    assert [single.layer_device(i) for i in range(2)] == [single.device] * 2
    with pytest.raises(IndexError):
        placed.layer_device(2)
    # every decoder layer carries accelerate's hook, with its execution device
    for block in placed.bridge.blocks:
        assert block.original_component._hf_hook.execution_device in ("cpu", torch.device("cpu"))
    # the same weights, wherever they are: the same identity (fingerprint included)
    assert placed.identity() == single.identity()
    assert placed.identity().fingerprint == single.identity().fingerprint
    assert "device_map=6 entries" in repr(placed)


def test_a_device_map_forward_equals_the_single_device_forward(tiny_pair):
    single, placed = tiny_pair
    ids = random_ids(24, seed=1)
    with torch.no_grad(), layer_hooks_seen() as seen:
        ref = single.bridge(ids)
        assert sum(seen.values()) == 0  # one device, no device map: no hooks
        out = placed.bridge(ids)
    assert torch.equal(out, ref)
    assert seen["LlamaDecoderLayer"] == 2  # each layer's inputs went through its device hook
    with layer_hooks_seen() as seen:
        assert torch.equal(placed.generate(ids, max_new_tokens=4), single.generate(ids, max_new_tokens=4))
    assert seen["LlamaDecoderLayer"] == 2 * 4


@pytest.mark.parametrize("path", ["pattern", "qk"])
def test_capture_statistics_equal_under_a_device_map(tiny_pair, path):
    single, placed = tiny_pair
    ids = random_ids(40, seed=2)
    ref = capture(single, ids, path=path)
    with layer_hooks_seen() as seen:
        got = capture(placed, ids, path=path)
    assert seen["LlamaDecoderLayer"] == 2
    torch.testing.assert_close(got.values(), ref.values(), atol=1e-6, rtol=0)
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert a.values.device.type == "cpu"  # gathered on one device
        torch.testing.assert_close(a.block_sum, b.block_sum, atol=1e-6, rtol=0)


def test_the_accumulator_reduces_rows_from_another_device():
    """A layer's rows are moved to the accumulator's device (a no-op on the same device)."""
    from attnlab.stats import HeadStatAccumulator, StatConfig

    config = StatConfig(block_size=4)
    probs = torch.softmax(torch.randn(2, 8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")), -1)
    a = HeadStatAccumulator(2, 8, config, device="cpu")
    a.update(probs.to(torch.float64), 0)
    b = HeadStatAccumulator(2, 8, config, device=torch.device("cpu"))
    b.update(probs, 0)
    torch.testing.assert_close(a.finalize().values, b.finalize().values)


@pytest.mark.parametrize("executor", ["reference", "flex"])
def test_a_policy_runs_under_a_device_map(tiny_pair, executor):
    from attnlab.sparsity_stats.executors import run_with_policy
    from attnlab.sparsity_stats.policy import uniform_policy

    single, placed = tiny_pair
    policy = uniform_policy(single, "streaming", {"sink": 8, "window": 24}, block_size=16)
    ids = random_ids(80, seed=3)
    with torch.no_grad():
        with run_with_policy(single, policy, executor) as ex:
            ref = single.bridge(ids)
            ref_density = {layer: lay.density.tolist() for layer, lay in ex.layouts_.items()}
        with layer_hooks_seen() as seen, run_with_policy(placed, policy, executor) as ex:
            out = placed.bridge(ids)
            density = {layer: lay.density.tolist() for layer, lay in ex.layouts_.items()}
    assert seen["LlamaDecoderLayer"] == 2
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert density == ref_density and sorted(density) == [0, 1]


# ---------------------------------------------------------------------------------------
# bad maps: one line naming the module or device and the fix, nothing loaded
# ---------------------------------------------------------------------------------------
@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if a model's weights start loading."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the device map was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "device_map, expected",
    [
        ({k: v for k, v in TINY_MAP.items() if k != "model.layers.1"},
         ["leaves 'model.layers.1' nowhere", "weight model.layers.1.", "add 'model.layers.1' to the map"]),
        ({k: v for k, v in TINY_MAP.items() if k != "model.rotary_emb"},
         ["leaves 'model.rotary_emb' nowhere", "buffer model.rotary_emb.inv_freq", "add 'model.rotary_emb'"]),
        ({k: v for k, v in TINY_MAP.items() if k != "lm_head"}, ["'lm_head' nowhere", "lm_head.weight"]),
        ({**TINY_MAP, "model.layerz.0": "cpu"}, ["'model.layerz.0' is not a module of this model", "named_modules"]),
        # no GPU here ("asks for a GPU but this torch has no CUDA device"); on a GPU machine
        # "is not here: this machine has N CUDA device(s)"
        ({**TINY_MAP, "model.layers.1": "cuda:99"}, ["'model.layers.1' → 'cuda:99'", "CUDA device", "use cpu, cuda:N"]),
        ({**TINY_MAP, "model.layers.1": 99}, ["'model.layers.1' → 99", "CUDA device"]),
        ({**TINY_MAP, "model.layers.1": "tpu"}, ["'model.layers.1' → 'tpu' is not a device", "use cpu, cuda:N"]),
        ({**TINY_MAP, "model.layers.1": "disk"}, ["'model.layers.1' → 'disk'", "does not offload weights to disk", "place it on cpu or a GPU"]),
        ({**TINY_MAP, "model.layers.1": None}, ["'model.layers.1' → None is not a device"]),
        ("balanced", ["must be 'auto' or a {module name: device} mapping, got 'balanced'"]),
        ({}, ["must be 'auto' or a {module name: device} mapping"]),
    ],
)
def test_a_bad_device_map_is_one_line_and_nothing_loads(tiny_dir, no_weights_read, device_map, expected):
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_dir, device_map=device_map)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message


def test_a_decoder_layer_split_over_two_devices_is_refused():
    """Attention runs on one device per layer: a map that splits a layer is refused (checked
    on an empty copy of the model, so GPU names need no GPU here)."""
    from attnlab.models import _empty_model, check_device_map, tiny_hf_model

    hf, _ = tiny_hf_model("llama")
    empty = _empty_model(hf.config, False)
    split = {**{k: v for k, v in TINY_MAP.items() if k != "model.layers.1"},
             "model.layers.1.self_attn": "cuda:0", "model.layers.1.mlp": "cuda:1",
             "model.layers.1.input_layernorm": "cuda:0", "model.layers.1.post_attention_layernorm": "cuda:0"}
    with pytest.raises(ModelLoadError, match=r"splits decoder layer 'model.layers.1' over cuda:0, cuda:1: .* map 'model.layers.1' as a whole"):
        check_device_map(empty, split)
    check_device_map(empty, {**split, "model.layers.1.mlp": 0})  # 0 is cuda:0, as in accelerate
    check_device_map(empty, {"": "cuda:0"})  # the whole model on one device


def test_device_and_device_map_together_are_refused(tiny_dir, no_weights_read):
    with pytest.raises(ModelLoadError, match=r"--device cuda:1 and --device-map cannot be used together: .*drop --device"):
        load_model(tiny_dir, device="cuda:1", device_map="auto")


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def test_device_map_option_reads_auto_json_and_files(tmp_path):
    import argparse

    from attnlab.cliargs import add_model_arguments, device_map, device_map_argv

    assert device_map("auto") == "auto"
    assert device_map('{"": "cpu"}') == {"": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(TINY_MAP))
    assert device_map(str(path)) == TINY_MAP
    for bad, part in [("{nope", "the JSON is not valid JSON"), ("[1]", "must hold a non-empty JSON object"), ('"auto"', "must hold a non-empty JSON object"),
                      (str(tmp_path / "missing.json"), "expected auto, a JSON object or a .json file"), ("{}", "non-empty JSON object")]:
        with pytest.raises(argparse.ArgumentTypeError, match=part):
            device_map(bad)
    for value in ("auto", TINY_MAP, {"model": 0}):  # what a re-run command passes on reads back the same
        assert device_map(device_map_argv(value)[1]) == value
    assert device_map_argv(None) == []
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    args = p.parse_args(["--device-map", str(path)])
    assert args.device_map == TINY_MAP and args.device == "cpu"
    assert p.parse_args([]).device_map is None


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_cli_refuses_device_with_device_map_and_a_bad_map(capsys, tmp_path, tiny_dir):
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--device", "cuda:0", "--device-map", "auto",
                          "--out", str(tmp_path / "r")])
    assert "--device cuda:0 and --device-map cannot be used together" in err
    bad = json.dumps({k: v for k, v in TINY_MAP.items() if k != "model.norm"})
    err = _error(capsys, ["profile", "--model", str(tiny_dir), "--device-map", bad, "--out", str(tmp_path / "r")])
    assert "leaves 'model.norm' nowhere" in err
    assert not (tmp_path / "r").exists()


def test_cli_profile_with_a_device_map_writes_the_same_run(tmp_path, tiny_dir):
    common = ["profile", "--model", str(tiny_dir), "--samples", "2", "--lengths", "40", "--block-size", "16", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    (tmp_path / "map.json").write_text(json.dumps(TINY_MAP))
    assert main([*common, "--device-map", str(tmp_path / "map.json"), "--out", str(tmp_path / "placed")]) == 0
    from attnlab.runs import HEAD_STATS, Run

    one, placed = Run.open(tmp_path / "one"), Run.open(tmp_path / "placed")
    assert placed.identity == one.identity
    a, b = one.read(HEAD_STATS), placed.read(HEAD_STATS)
    pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("command", [
    ["profile", "--samples", "2", "--lengths", "40"],
    ["eval", "--tasks", "niah_noise", "--samples", "1"],
    ["validate", "POLICY", "--prompts", "2"],
    ["probe", "retrieval", "--causal-k", ""],
    ["circuit", "--task", "induction", "--method", "activation", "--no-faithfulness"],
], ids=lambda c: c[0])
def test_every_command_on_ray_passes_the_model_options_to_every_shard(tmp_path, tiny_dir, monkeypatch, command):
    """A Ray shard re-runs the command: it must load the model placed the same way."""
    from attnlab import ray_engine

    seen = {}

    def fake_run_sharded(argv, out, **kwargs):
        seen["argv"] = list(argv)
        raise AttnlabError("stop here")

    monkeypatch.setattr(ray_engine, "run_sharded", fake_run_sharded)
    (tmp_path / "map.json").write_text(json.dumps(TINY_MAP))
    if "POLICY" in command:
        from attnlab.sparsity_stats.policy import HeadPolicy, Policy

        model = load_model(tiny_dir, verbose=False)
        heads = [HeadPolicy(la, h, h // model.group_size, "dense", {}) for la in range(model.n_layers) for h in range(model.n_heads)]
        Policy(model.identity().to_dict(), 16, heads).save(tmp_path / "policy.json")
    command = [str(tmp_path / "policy.json") if a == "POLICY" else a for a in command]
    assert main([*command, "--model", str(tiny_dir), "--device-map", str(tmp_path / "map.json"), "--trust-remote-code",
                 "--ray", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    argv = seen["argv"]
    assert argv[0] == command[0]
    assert json.loads(argv[argv.index("--device-map") + 1]) == TINY_MAP
    assert argv[argv.index("--model") + 1] == str(Path(tiny_dir).resolve()) and "--trust-remote-code" in argv


@pytest.mark.parametrize("batch_edges", [True, False])
def test_attribution_patching_with_edges_under_a_device_map(tiny_pair, batch_edges):
    """Edge scores multiply one layer's head writes by a later layer's gradient: the placed
    model gathers them on one device and gives the single-device scores."""
    from attnlab.circuits.patching import attribution_patching
    from attnlab.circuits.tasks import induction_task_for

    one, placed = tiny_pair
    task = induction_task_for(one, n=2, seed=0)
    a = attribution_patching(one, task, batch_edges=batch_edges)
    b = attribution_patching(placed, task, batch_edges=batch_edges)
    torch.testing.assert_close(b.nodes, a.nodes, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.edges, a.edges, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.logit_edges, a.logit_edges, atol=1e-6, rtol=0)
    assert a.edges.abs().max() > 0


def test_load_errors_are_attnlab_errors():
    assert issubclass(ModelLoadError, AttnlabError)


# ---------------------------------------------------------------------------------------
# the embedded model (SmolLM2-135M), short prompts
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def placed_smollm():
    return load_model("smollm2-135m", verbose=False, device_map=smollm_map())


@pytest.mark.slow
def test_smollm_device_map_forward_capture_and_identity(embedded, placed_smollm):
    placed = placed_smollm
    ids = embedded.encode("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")
    with torch.no_grad(), layer_hooks_seen() as seen:
        out = placed.bridge(ids)
    assert seen["LlamaDecoderLayer"] == 30
    with torch.no_grad():
        torch.testing.assert_close(out, embedded.bridge(ids), atol=1e-6, rtol=0)
    for path in ("pattern", "qk"):
        torch.testing.assert_close(capture(placed, ids, path=path).values(), capture(embedded, ids, path=path).values(),
                                   atol=1e-6, rtol=0)
    assert placed.identity() == embedded.identity()
    assert torch.equal(placed.generate(ids, max_new_tokens=6), embedded.generate(ids, max_new_tokens=6))


@pytest.mark.slow
def test_smollm_needle_probe_and_patching_under_a_device_map(embedded, placed_smollm):
    from attnlab.circuits.patching import activation_patching
    from attnlab.circuits.tasks import IOI_TEMPLATES, ioi_task
    from attnlab.probes.needle import greedy_answer, needle_samples

    placed = placed_smollm
    sample = needle_samples(embedded, lengths=(200,), depths=(0.5,), kinds=("kv",), n_samples=1, seed=0)[0]
    with layer_hooks_seen() as seen:
        got = greedy_answer(placed, sample, max_new_tokens=8)
    assert seen["LlamaDecoderLayer"] >= 30
    ref = greedy_answer(embedded, sample, max_new_tokens=8)
    assert got.generated_ids == ref.generated_ids and got.contains == ref.contains

    task = ioi_task(embedded.tokenizer, n=2, templates=IOI_TEMPLATES[:1])
    heads = [(9, 2), (20, 0), (23, 3)]
    a = activation_patching(placed, task, heads=heads)
    b = activation_patching(embedded, task, heads=heads)
    torch.testing.assert_close(a.nodes, b.nodes, atol=1e-6, rtol=0)
    assert a.clean_metric == pytest.approx(b.clean_metric, abs=1e-6)
