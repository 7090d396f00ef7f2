"""Head detectors: sinks, induction / previous-token / duplicate-token, echo, local heads.

Three levels, each asserting what a wrong implementation would break:

1. pure scoring functions on constructed ``[H, n, n]`` patterns with known answers
   (perfect heads score what the formulas say; the detection patterns equal TransformerLens's);
2. a tiny random model whose heads are *made* to behave a known way by patching their
   ``hook_pattern`` (a previous-token head, an induction head, a sink, a hidden sink at a known
   token, a local head): every probe must find exactly the planted head, through the run
   directory it writes;
3. agreement with TransformerLens's own ``detect_head`` on the bridge (tiny models here; the
   embedded model in the ``slow`` test), and bad input that must fail before anything is written.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from transformer_lens import head_detector as tl

from attnlab.errors import AttnlabError, PromptError
from attnlab.probes.base import ProbeError, rank_stability, split_half_stability
from attnlab.probes.detections import top_heads
from attnlab.probes.local import local_mass, local_scores, probe_local, streaming_mass
from attnlab.probes.repeated import (
    detection_pattern,
    duplicate_token_detection,
    induction_detection,
    kv_max_pool,
    mul_score,
    previous_token_detection,
    probe_repeated,
    repeated_samples,
    repeated_scores,
    row_mass_score,
    tl_detect_head,
)
from attnlab.probes.sinks import hidden_sink, key_importance, probe_sinks, sink_share
from attnlab.prompts import builtin_prompts
from attnlab.runs import DETECTIONS, MANIFEST

# --------------------------------------------------------------------------- constructed patterns


def seq_tokens(seq_len: int, repeats: int, seed: int = 0) -> torch.Tensor:
    """BOS (id 1) + a random permutation segment repeated: ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randperm(500, generator=g)[:seq_len] + 100
    return torch.cat([torch.tensor([1]), seg.repeat(repeats)])


def onto(targets: list[int]) -> torch.Tensor:
    """``[n, n]`` pattern where row i puts all its mass on key ``targets[i]``."""
    n = len(targets)
    a = torch.zeros(n, n)
    a[torch.arange(n), torch.tensor(targets)] = 1.0
    return a


def induction_pattern(n: int, seq_len: int) -> torch.Tensor:
    """Perfect induction head on BOS + seg × r: row i ≥ seq_len + 1 attends to i - seq_len + 1
    (the token after the previous copy of its token); earlier rows attend to BOS."""
    return onto([i - seq_len + 1 if i >= seq_len + 1 else 0 for i in range(n)])


def previous_pattern(n: int) -> torch.Tensor:
    return onto([max(i - 1, 0) for i in range(n)])


def echo_pattern(n: int, seq_len: int) -> torch.Tensor:
    """Row i ≥ seq_len + 1 attends to the previous copy of its own token."""
    return onto([i - seq_len if i >= seq_len + 1 else 0 for i in range(n)])


def banded(n: int, window: int) -> torch.Tensor:
    """Uniform over the ``window`` most recent keys."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    a = ((j <= i) & (i - j < window)).float()
    return a / a.sum(-1, keepdim=True)


def test_detection_patterns_equal_transformer_lens():
    tokens = seq_tokens(7, 3)
    t = tokens[None]
    assert torch.equal(previous_token_detection(tokens.numel()), tl.get_previous_token_head_detection_pattern(t))
    assert torch.equal(duplicate_token_detection(tokens), tl.get_duplicate_token_head_detection_pattern(t))
    assert torch.equal(induction_detection(tokens), tl.get_induction_head_detection_pattern(t))
    # echo / razor_induction share the patterns, only the score differs
    assert torch.equal(detection_pattern("echo", tokens), duplicate_token_detection(tokens))
    assert torch.equal(detection_pattern("razor_induction", tokens), induction_detection(tokens))


def test_perfect_heads_score_what_the_conventions_say():
    seq_len = 10
    tokens = seq_tokens(seq_len, 2)
    n = tokens.numel()  # 21
    heads = torch.stack([induction_pattern(n, seq_len), previous_pattern(n), echo_pattern(n, seq_len), torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]])
    ind = mul_score(heads, induction_detection(tokens))
    prev = mul_score(heads, previous_token_detection(n))
    dup = mul_score(heads, duplicate_token_detection(tokens))
    # "mul": a perfect induction head on a twice-repeated sequence scores seq_len / n ≈ 0.5
    assert ind[0].item() == pytest.approx(seq_len / n)
    assert prev[1].item() == pytest.approx((n - 1) / n)
    assert dup[2].item() == pytest.approx(seq_len / n)
    assert ind.argmax() == 0 and prev.argmax() == 1 and dup.argmax() == 2
    assert ind[1] == 0 and dup[0] == 0  # a previous-token head is no induction head, and so on

    # RazorAttention: only rows with an earlier copy count, so perfect heads score 1 (× 4 repeats)
    tokens4 = seq_tokens(seq_len, 4)
    n4 = tokens4.numel()
    heads4 = torch.stack([induction_pattern(n4, seq_len), echo_pattern(n4, seq_len)])
    razor_ind = row_mass_score(heads4, induction_detection(tokens4))
    echo = row_mass_score(heads4, duplicate_token_detection(tokens4))
    assert razor_ind.tolist() == pytest.approx([1.0, 0.0])
    assert echo.tolist() == pytest.approx([0.0, 1.0])
    # the "mul" score of the same induction head on 4 copies approaches 3/4
    assert mul_score(heads4[0], induction_detection(tokens4)).item() == pytest.approx(3 * seq_len / n4)


def test_kv_max_pool_takes_each_groups_best_query_head():
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.2, 0.9, 0.0]])  # [layers=1, heads=6], groups of 3
    values, argmax = kv_max_pool(scores, 3)
    assert values[0].tolist() == pytest.approx([0.7, 0.9])
    assert argmax.tolist() == [[1, 4]]


def test_key_importance_sinks_and_the_tail_rule():
    n, min_q = 40, 8
    sink = onto([0] * n)
    hidden = torch.zeros(n, n)
    for i in range(n):  # rows ≥ 5 give 0.6 to key 5 and 0.4 to themselves
        if i >= 5:
            hidden[i, 5] += 0.6
            hidden[i, i] += 0.4
        else:
            hidden[i, i] = 1.0
    diagonal = torch.eye(n)  # each key only sees itself: the last key's importance is 1
    imp = key_importance(torch.stack([sink, hidden, diagonal]))
    assert imp[0, 0].item() == pytest.approx(1.0)
    assert imp[1, 5].item() == pytest.approx((0.6 * (n - 6) + 1.0) / (n - 5))
    assert imp[2, -1].item() == pytest.approx(1.0)
    value, pos = hidden_sink(imp, min_q)
    assert pos[1].item() == 5 and value[1].item() == pytest.approx(imp[1, 5].item())
    # the diagonal head's last keys are excluded by the tail rule: its best eligible key is weak
    assert value[2].item() == pytest.approx(1 / min_q)
    assert pos[2].item() == n - min_q
    assert sink_share(imp, 0.3) == pytest.approx(1 / 3)
    with pytest.raises(ProbeError, match="min_queries"):
        hidden_sink(imp, n)


def test_streaming_and_local_mass_on_constructed_heads():
    n = 64
    heads = torch.stack([banded(n, 8), onto([0] * n), torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]])
    s8 = streaming_mass(heads, 4, 8)
    s4 = streaming_mass(heads, 0, 4)
    loc = local_mass(heads, 8, sink_tokens=4)
    assert s8[0].item() == pytest.approx(1.0)  # a window-8 head loses nothing under sink 4 + window 8
    # a window of 4 keeps 4 of its min(i + 1, 8) keys: half, once rows see a full window
    expected = torch.tensor([4 / min(i + 1, 8) for i in range(4, n)]).mean().item()
    assert s4[0].item() == pytest.approx(expected, rel=1e-6) and expected < 0.52
    assert s8[1].item() == pytest.approx(1.0) and loc[1].item() == pytest.approx(0.0)  # the sink head needs its sinks
    rows = torch.arange(12, n, dtype=torch.float64)  # uniform head: (4 + 8) / (i + 1) for i ≥ 12
    assert s8[2].item() == pytest.approx(float((12 / (rows + 1)).mean()), rel=1e-5)
    with pytest.raises(ProbeError, match="raise --lengths"):
        streaming_mass(heads, 4, 60)


def test_rank_stability_and_split_half():
    a = torch.arange(10.0)
    assert rank_stability(a, a * 3 + 1) == pytest.approx(1.0)
    assert rank_stability(a, -a) == pytest.approx(-1.0)
    assert rank_stability(a, torch.ones(10)) != rank_stability(a, torch.ones(10))  # NaN when constant
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5, 6, generator=g)
    per_sample = base + 0.01 * torch.randn(8, 5, 6, generator=g)
    assert split_half_stability(per_sample) > 0.95
    noise = torch.randn(8, 5, 6, generator=g)
    assert abs(split_half_stability(noise)) < 0.6
    with pytest.raises(ProbeError):
        rank_stability(torch.ones(3), torch.ones(4))


# --------------------------------------------------------------------------- planted heads in a tiny model


def lh(row) -> tuple[int, int]:
    """(layer, head) of a detections row (``row.head`` would be pandas' method)."""
    return int(row["layer"]), int(row["head"])


@contextmanager
def patched(model, patches: dict[tuple[int, int], callable]):
    """Replace head (layer, h)'s attention pattern by ``fn(n) -> [n, n]`` during forwards."""
    def make(layer: int, heads: dict[int, callable]):
        def hook(pattern, hook=None):
            pattern = pattern.clone()
            n = pattern.shape[-1]
            for h, fn in heads.items():
                pattern[:, h] = fn(n).to(pattern)
            return pattern

        return hook

    by_layer: dict[int, dict[int, callable]] = {}
    for (layer, h), fn in patches.items():
        by_layer.setdefault(layer, {})[h] = fn
    hooks = [(f"blocks.{layer}.attn.hook_pattern", make(layer, heads)) for layer, heads in by_layer.items()]
    with model.bridge.hooks(fwd_hooks=hooks):
        yield


def test_probe_repeated_finds_planted_heads(tiny_llama, tmp_path):
    seq_len = 12
    plant = {
        (1, 2): previous_pattern,
        (0, 1): lambda n: induction_pattern(n, seq_len),
        (1, 0): lambda n: echo_pattern(n, seq_len),
    }
    with patched(tiny_llama, plant):
        result = probe_repeated(tiny_llama, tmp_path / "run", seq_len=seq_len, n_samples=2, progress=False)
    det = result.run.detections()
    top = {t: top_heads(det, t, 1).iloc[0] for t in ("previous_token", "induction", "duplicate_token", "razor_induction", "echo")}
    assert lh(top["previous_token"]) == (1, 2)
    assert top["previous_token"].score == pytest.approx(24 / 25, abs=1e-4)
    assert lh(top["induction"]) == (0, 1)
    assert top["induction"].score == pytest.approx(12 / 25, abs=1e-4)  # the "mul" convention, ≈ 0.5
    assert lh(top["duplicate_token"]) == (1, 0)
    assert lh(top["razor_induction"]) == (0, 1)
    assert top["razor_induction"].score == pytest.approx(1.0, abs=1e-4)
    assert lh(top["echo"]) == (1, 0)
    # KV-pooled rows: head -1, the group's best query head in the evidence
    kv = det[(det.head_type == "razor_induction_kv") & (det.layer == 0) & (det.kv_head == 0)].iloc[0]
    assert kv["head"] == -1 and kv.score == pytest.approx(1.0, abs=1e-4)
    assert json.loads(kv.evidence)["argmax_head"] == 1
    assert set(det.probe) == {"repeated_random:x2", "repeated_random:x4"}
    # TransformerLens sees the same patched patterns and agrees exactly
    tl_summary = result.summary["types"]["induction"]["transformer_lens"]
    assert tl_summary["spearman"] >= 0.9 and tl_summary["max_abs_diff"] < 1e-5
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["stages"]["probe:repeated"]["summary"]["types"]["previous_token"]["max"] == pytest.approx(0.96, abs=1e-3)
    ev = json.loads(det[(det.head_type == "induction") & (det.layer == 0) & (det["head"] == 1)].evidence.iloc[0])
    assert ev["repeats"] == 2 and len(ev["per_sample"]) == 2 and ev["split_half_stability"] is not None


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_scores_agree_with_transformer_lens_detect_head(fixture, request):
    model = request.getfixturevalue(fixture)
    samples = repeated_samples(model.tokenizer, seq_len=15, repeats=2, n_samples=2, seed=3)
    assert all(s.text is not None for s in samples)
    ours = repeated_scores(model, samples, ["induction", "previous_token", "duplicate_token"])
    for head_type in ("induction", "previous_token", "duplicate_token"):
        theirs = tl_detect_head(model, samples, head_type)
        mean = ours[head_type].mean(0)
        assert rank_stability(mean, theirs) >= 0.9
        torch.testing.assert_close(mean, theirs, atol=1e-5, rtol=1e-4)


def test_probe_sinks_finds_planted_sink_and_hidden_sink(tiny_llama, tmp_path):
    def hidden_at_5(n):
        a = torch.zeros(n, n)
        for i in range(n):
            if i >= 5:
                a[i, 5] += 0.7
                a[i, i] += 0.3
            else:
                a[i, i] = 1.0
        return a

    prompts = builtin_prompts(tiny_llama.tokenizer, [48], 2, seed=1)
    with patched(tiny_llama, {(0, 0): lambda n: onto([0] * n), (1, 3): hidden_at_5}):
        result = probe_sinks(tiny_llama, tmp_path / "run", prompts=prompts, min_queries=8, progress=False)
    det = result.run.detections()
    sink = top_heads(det, "sink", 1).iloc[0]
    assert lh(sink) == (0, 0) and sink.score == pytest.approx(1.0)
    hidden = top_heads(det, "hidden_sink", 1).iloc[0]
    assert lh(hidden) == (1, 3)
    ev = json.loads(det[(det.head_type == "hidden_sink") & (det.layer == 1) & (det["head"] == 3)].evidence.iloc[0])
    assert {t["position"] for t in ev["top"]} == {5}
    expected = {tiny_llama.tokenizer.decode([int(p.input_ids[0, 5])]) for p in prompts}
    assert {t["token"] for t in ev["top"]} == expected
    assert ev["top"][0]["importance"] == pytest.approx((0.7 * (48 - 6) + 1.0) / (48 - 5), abs=1e-3)
    assert result.summary["sink_share_first_token"] >= 1 / 8
    sink_ev = json.loads(det[(det.head_type == "sink") & (det.layer == 0) & (det["head"] == 0)].evidence.iloc[0])
    assert sink_ev["token"] == tiny_llama.tokenizer.decode([1]) and sink_ev["share_samples_above_eps"] == 1.0


def test_probe_local_finds_planted_window_head(tiny_llama, tmp_path):
    prompts = builtin_prompts(tiny_llama.tokenizer, [80], 2, seed=2)
    with patched(tiny_llama, {(1, 1): lambda n: banded(n, 8)}):
        result = probe_local(tiny_llama, tmp_path / "run", prompts=prompts, sink_tokens=4, windows=(4, 8, 32), window=8, progress=False)
    det = result.run.detections()
    best = top_heads(det, "local", 1).iloc[0]
    assert lh(best) == (1, 1) and best.score == pytest.approx(1.0, abs=1e-5)
    ev = json.loads(det[(det.layer == 1) & (det["head"] == 1)].evidence.iloc[0])
    assert set(ev["streaming_mass"]) == {"4", "8", "32"}
    assert ev["local_mass"]["4"] == pytest.approx(0.5, abs=1e-4)
    wide = local_scores(det).set_index(["layer", "head"])
    assert wide.loc[(1, 1), "streaming_8"] == pytest.approx(1.0, abs=1e-4) and wide.loc[(1, 1), "local_4"] == pytest.approx(0.5, abs=1e-4)


def test_local_from_a_profiled_run(tiny_gpt2, tmp_path):
    from attnlab.profile import head_means, profile

    prompts = builtin_prompts(tiny_gpt2.tokenizer, [96], 2)
    run = profile(tiny_gpt2, prompts, tmp_path / "run", progress=False)
    result = probe_local(None, tmp_path / "run", sink_tokens=4, window=64)
    means = head_means(run).set_index(["layer", "head"])
    det = result.detections.set_index(["layer", "head"])
    expected = (means["sink_mass_4"] + means["local_mass_64"]).clip(upper=1.0)
    torch.testing.assert_close(torch.tensor(det["score"].to_numpy()), torch.tensor(expected.loc[det.index].to_numpy()))
    assert set(det.probe) == {"streaming:profile"}
    with pytest.raises(ProbeError, match="sink_mass_2"):
        probe_local(None, tmp_path / "run", sink_tokens=2, window=64)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, out: probe_repeated(m, out, which=("induction", "bogus"), progress=False), "bogus"),
        (lambda m, out: probe_repeated(m, out, seq_len=1, progress=False), "--seq-len"),
        (lambda m, out: probe_repeated(m, out, repeats=1, progress=False), "--repeats"),
        (lambda m, out: probe_repeated(m, out, seq_len=200, progress=False), "exceeds the 512-token context"),
        (lambda m, out: probe_sinks(m, out, eps=1.5, progress=False), "--eps"),
        (lambda m, out: probe_sinks(m, out, lengths=(20,), n_samples=1, progress=False), "raise --lengths"),
        (lambda m, out: probe_local(m, out, windows=(16, 64), window=32, progress=False), "--window 32"),
        (lambda m, out: probe_local(m, out, lengths=(64,), n_samples=1, progress=False), "raise --lengths"),
    ],
)
def test_bad_input_fails_before_writing(tiny_llama, tmp_path, call, match):
    out = tmp_path / "run"
    with pytest.raises(AttnlabError, match=match) as info:
        call(tiny_llama, out)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_run_of_another_model_is_refused_before_any_work(tiny_llama, tiny_gpt2, tmp_path, monkeypatch):
    from attnlab.runs import ensure_run

    ensure_run(tmp_path / "run", tiny_gpt2.identity(), "test", {})  # 4 KV heads, tiny_llama has 2

    def no_forward(*args, **kwargs):
        raise AssertionError("the probe ran the model before checking --out")

    monkeypatch.setattr("attnlab.probes.repeated.reduce_patterns", no_forward)
    with pytest.raises(AttnlabError, match="(?i)choose another --out"):
        probe_repeated(tiny_llama, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / DETECTIONS).exists()


# --------------------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_agrees_with_transformer_lens_and_has_sinks(embedded, tmp_path):
    samples = repeated_samples(embedded.tokenizer, seq_len=30, repeats=2, n_samples=3, seed=7)
    ours = repeated_scores(embedded, samples, ["induction", "previous_token", "duplicate_token"])
    for head_type in ("induction", "previous_token", "duplicate_token"):
        theirs = tl_detect_head(embedded, samples, head_type)
        assert rank_stability(ours[head_type].mean(0), theirs) >= 0.9
    # SmolLM2 has real induction and previous-token heads (a random model scores ~0.03)
    assert ours["induction"].mean(0).max() > 0.3
    assert ours["previous_token"].mean(0).max() > 0.7

    result = probe_sinks(embedded, tmp_path / "run", n_samples=2, lengths=(128,), progress=False)
    assert result.summary["prompt_kinds"] == {"builtin": 2, "chat": 2}
    assert result.summary["sink_share_first_token"] > 0.3  # most heads sink on the first token
    assert result.summary["kind_stability"]["sink"] > 0.8


# --------------------------------------------------------------------------- one base for every probe


def test_every_probe_returns_the_one_result_type(tiny_llama, tmp_path):
    from attnlab.probes.base import ProbeResult
    from attnlab.probes.families import compute_families

    out = tmp_path / "run"
    prompts = builtin_prompts(tiny_llama.tokenizer, [48], 2, seed=1)
    results = {
        "probe:repeated": probe_repeated(tiny_llama, out, which=("induction",), seq_len=8, n_samples=2, cross_check=False, progress=False),
        "probe:sinks": probe_sinks(tiny_llama, out, prompts=prompts, min_queries=8, chat=False, progress=False),
        "probe:local": probe_local(tiny_llama, out, prompts=prompts, sink_tokens=4, windows=(4, 8), window=8, progress=False),
    }
    manifest = json.loads((out / MANIFEST).read_text())
    for stage, result in results.items():
        assert isinstance(result, ProbeResult) and result.run.path == out
        assert len(result.detections) > 0 and result.tables == {} and result.extras == {}
        assert manifest["stages"][stage]["summary"] == json.loads(json.dumps(result.summary))
        assert result["summary"] is result.summary and result["detections"] is result.detections
    # the detections of all three probes are merged in the run
    assert set(results["probe:repeated"].run.detections()["head_type"]) == {"induction", "sink", "hidden_sink", "local"}
    families = compute_families(out, k_max=3)
    assert isinstance(families, ProbeResult) and families.detections.empty
    assert list(families.tables) == ["families"] and families.summary == _stage_summary(out, "families")


def _stage_summary(out, stage):
    from attnlab.runs import Run

    return Run.open(out).manifest["stages"][stage]["summary"]


def test_probe_errors_share_one_base():
    from attnlab.probes.ablation import AblationError
    from attnlab.probes.base import ProbeError as BaseError
    from attnlab.probes.needle import NeedleError

    assert ProbeError is BaseError and issubclass(ProbeError, AttnlabError) and issubclass(AblationError, ProbeError)
    assert issubclass(NeedleError, ProbeError) and issubclass(NeedleError, PromptError)


def test_a_corrupt_detections_file_is_an_error_not_no_detections(tmp_path):
    from attnlab.errors import RunError
    from attnlab.probes.detections import detection_frame, write_detections
    from attnlab.probes.families import compute_families
    from attnlab.runs import ensure_run

    run = ensure_run(tmp_path / "run", {"name": "m", "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4}, "test", {})
    rows = [{"layer": 0, "head": h, "kv_head": 0, "head_type": "sink", "score": 0.5, "probe": "x", "evidence": {}} for h in (0, 1)]
    write_detections(run, detection_frame(rows))
    (run.path / DETECTIONS).write_bytes(b"not parquet at all")
    new = detection_frame([{**rows[0], "head_type": "local"}])
    with pytest.raises(RunError, match="not a readable Parquet file"):
        write_detections(run.path, new)  # a path works as well as a Run
    assert (run.path / DETECTIONS).read_bytes() == b"not parquet at all"  # the old rows are not overwritten
    with pytest.raises(RunError, match="not a readable Parquet file"):
        compute_families(run)


# --------------------------------------------------------------------------- the command line


def _exit_code(argv):
    from attnlab.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["probe", "sinks", "--top", "-1"], "--top"),
        (["probe", "sinks", "--samples", "0"], "--samples"),
        (["probe", "sinks", "--eps", "0"], "--eps"),
        (["probe", "retrieval", "--depths", "0.5,1.5"], "--depths"),
        (["probe", "retrieval", "--mode", "sampled"], "--mode"),
        (["probe", "retrieval", "--causal-k", "5,x"], "--causal-k"),
        (["probe", "retrieval", "--draws", "0"], "--draws"),
        (["probe", "local", "--window", "0"], "--window"),
        (["probe", "local", "--sink-tokens", "-1"], "--sink-tokens"),
        (["probe", "induction", "--seq-len", "nan"], "--seq-len"),
        (["probe", "nonsense"], "probe"),
    ],
)
def test_cli_refuses_out_of_range_values_before_loading_a_model(argv, option, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr("attnlab.models.load_model", no_model)
    assert _exit_code([*argv, "--out", str(tmp_path / "run")]) == 2
    assert option in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_heads_type_is_a_choice_and_causal_k_may_be_empty(tmp_path, capsys):
    from attnlab.cli import build_parser

    assert _exit_code(["heads", str(tmp_path), "--type", "bogus"]) == 2
    assert "--type" in capsys.readouterr().err
    assert _exit_code(["heads", str(tmp_path), "--type", "sink", "--top", "0"]) == 2
    args = build_parser().parse_args(["probe", "retrieval", "--out", str(tmp_path), "--causal-k", "", "--depths", "0,1"])
    assert args.causal_k == [] and args.depths == [0.0, 1.0]


def test_cli_heads_prints_the_top_heads_or_names_the_probe_to_run(tmp_path, capsys):
    from attnlab.probes.cli import _PROBE_OF
    from attnlab.probes.detections import HEAD_TYPES, detection_frame, write_detections
    from attnlab.runs import ensure_run

    assert set(_PROBE_OF) == set(HEAD_TYPES)  # every head type names the detector that writes it
    run = ensure_run(tmp_path / "run", {"name": "m", "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4}, "test", {})
    write_detections(run, detection_frame(
        [{"layer": 0, "head": h, "kv_head": 0, "head_type": "sink", "score": s, "probe": "x", "evidence": {}} for h, s in ((0, 0.2), (1, 0.9))]))
    assert _exit_code(["heads", str(run.path), "--type", "sink", "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["0", "1", "0", "0.9000"]
    assert _exit_code(["heads", str(run.path), "--type", "previous_token"]) == 2
    assert f"run `attnlab probe previous --out {run.path}` first" in capsys.readouterr().err
