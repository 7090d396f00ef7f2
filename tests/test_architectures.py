"""The architecture matrix (issue 12): every path on tiny random-init models of 20 architectures.

For each architecture of `attnlab.models.TINY_KINDS` (built from a config, no weights needed):

- **load**: the bridge loads it and its ``hook_pattern`` forward equals the plain Hugging Face
  eager model's logits;
- **q/k**: the q/k statistics (and block maps) equal the pattern path's to <= 1e-5;
- **executors**: reference, flex and triton agree on logits to <= 1e-4 under a mixed sparse
  policy, each equals the model's own forward under an all-dense policy, and a forward after
  the executor equals one before;
- **generate**: `LoadedModel.generate` gives the plain Hugging Face model's greedy tokens.

An architecture that must be refused (Falcon with ALiBi: transformers adds its position bias to
the attention mask, which attnlab's executors and q/k statistics do not compute) is asserted to be
refused on every routed path, with its reason.

Every check records what it measured; `test_support_table_is_generated_from_the_matrix`
(slow: it needs the whole matrix) renders docs/support.md from those records and requires the
file to equal the rendering, so the table is never edited by hand. Regenerate it with::

    ATTNLAB_UPDATE_SUPPORT=1 python -m pytest tests/test_architectures.py
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import random_ids
from test_executors import make_policy

from attnlab.attention import RoutingError, layer_variants, mask_bias, route_attention, uses_alibi
from attnlab.capture import capture
from attnlab.models import TINY_KINDS, tiny_hf_model, tiny_model
from attnlab.names import attn_hook
from attnlab.sparsity_stats.executors import EXECUTORS, run_with_policy
from attnlab.stats import StatConfig

SUPPORT_MD = Path(__file__).resolve().parents[1] / "docs" / "support.md"
#: Architectures that every routed path must refuse, and the words their refusal must contain.
REFUSED = {"falcon-alibi": "adds a position bias (ALiBi) to its attention scores"}
#: The table holds for this transformers minor version (a new one can change what reaches attnlab).
TRANSFORMERS_MINOR = ".".join(transformers.__version__.split(".")[:2])
#: Small sizes so that the windows (8 tokens), block maps and chunks all cross boundaries.
STATS = StatConfig(sink_tokens=(1, 4), windows=(4, 16), budgets=(4, 16), block_size=8, query_chunk=16, coverage_rows=64)
N_TOKENS = 83  # not a multiple of the block size: ragged last block

_models: dict[str, object] = {}
_plain: dict[str, tuple] = {}
RESULTS: dict[str, dict[str, str]] = {}


def model_of(kind: str):
    if kind not in _models:
        _models[kind] = tiny_model(kind)
    return _models[kind]


def plain_of(kind: str):
    """The plain Hugging Face model with the same weights (no bridge has touched it)."""
    if kind not in _plain:
        _plain[kind] = tiny_hf_model(kind)
    return _plain[kind]


def describe_attention(fields: dict) -> str:
    """The identity's ``attention`` entry in words: windows per layer, soft-cap, learned sinks."""
    parts = []
    windows = fields.get("layer_windows") or []
    for w in sorted({w for w in windows if w}):
        layers = ",".join(str(i) for i, x in enumerate(windows) if x == w)
        parts.append(f"window {w} (layers {layers})")
    if "softcap" in fields:
        parts.append(f"soft-cap {fields['softcap']:g}")
    if fields.get("learned_sinks"):
        parts.append("learned sinks")
    return ", ".join(parts) or "causal"


def record(kind: str, column: str, text: str) -> None:
    RESULTS.setdefault(kind, {})[column] = text


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(ids, use_cache=False).logits


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_loads_and_pattern_path_is_hf_eager(kind):
    model = model_of(kind)
    plain, _ = plain_of(kind)
    ids = random_ids(N_TOKENS, seed=1)
    patterns = {}

    def grab(layer):
        return lambda pattern, hook: patterns.__setitem__(layer, pattern)

    hooks = [(attn_hook(layer, "hook_pattern"), grab(layer)) for layer in range(model.n_layers)]
    with torch.no_grad():
        want = plain(ids).logits
        got = model.bridge.run_with_hooks(ids, fwd_hooks=hooks)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"{kind}: the bridge's forward differs from Hugging Face eager by {diff:.2e}"
    assert sorted(patterns) == list(range(model.n_layers)), "hook_pattern must fire on every layer"
    record(kind, "class", type(plain).__name__)
    record(kind, "attention", "ALiBi" if uses_alibi(plain.config) else describe_attention(model.identity()["attention"]))
    record(kind, "pattern", "ok")


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_qk_statistics_equal_the_pattern_path(kind):
    model = model_of(kind)
    ids = random_ids(N_TOKENS, seed=2)
    if kind in REFUSED:
        with pytest.raises(RoutingError, match=re.escape(REFUSED[kind])):
            capture(model, ids, STATS, path="qk")
        record(kind, "qk", "refused")
        return
    a = capture(model, ids, STATS, path="pattern")
    b = capture(model, ids, STATS, path="qk")
    diff = float((a.values() - b.values()).abs().max())
    blocks = max(float((x.block_sum - y.block_sum).abs().max()) for x, y in zip(a.layers, b.layers, strict=True))
    sinks = max(float((x.learned_sink_mass - y.learned_sink_mass).abs().max()) for x, y in zip(a.layers, b.layers, strict=True))
    assert max(diff, blocks, sinks) <= 1e-5, f"{kind}: q/k statistics differ by {diff:.2e}, block maps by {blocks:.2e}"
    sink_mass = max(float(s.learned_sink_mass.max()) for s in a.layers)
    if kind == "gpt-oss":
        assert sink_mass > 0.05, "gpt-oss's learned sinks take mass, reported as learned_sink_mass"
    else:
        assert sink_mass < 1e-5
    record(kind, "qk", "ok")


def _executors_agree(kind: str, executors: tuple[str, ...]) -> dict[str, float]:
    model = model_of(kind)
    ids = random_ids(N_TOKENS, seed=4)
    mixed, dense_policy = make_policy(model), make_policy(model, kinds=[("dense", {})])
    before = _logits(model, ids)
    out, worst = {}, {}
    for name in executors:
        with torch.no_grad(), run_with_policy(model, mixed, name) as ex:
            out[name] = model.hf_model(ids, use_cache=False).logits
        with torch.no_grad(), run_with_policy(model, dense_policy, name):
            dense = model.hf_model(ids, use_cache=False).logits
        worst[f"{name} all-dense vs model"] = float((dense - before).abs().max())
        if name == "reference":
            dens = torch.cat([ex.layouts_[layer].density for layer in range(model.n_layers)])
            assert (dens < 1).any(), "the mixed policy must really be sparse on some heads"
            variants = layer_variants(model)
            for layer, v in enumerate(variants):
                assert ex.layouts_[layer].model_window == v.window, "the model's window is in every layout"
    for name in executors:
        worst[f"{name} vs reference"] = float((out[name] - out["reference"]).abs().max())
    assert float((out["reference"] - before).abs().max()) > 1e-3, "a sparse policy should change the logits"
    after = _logits(model, ids)
    assert torch.equal(after, before), "the model's own attention must come back after the executor"
    for what, diff in worst.items():
        assert diff <= 1e-4, f"{kind}: {what} differ by {diff:.2e}"
    return worst


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_reference_executor(kind):
    if kind in REFUSED:
        model = model_of(kind)
        for name in EXECUTORS:
            with pytest.raises(RoutingError, match=re.escape(REFUSED[kind])):
                with run_with_policy(model, make_policy(model), name):
                    pass
        record(kind, "executors", "refused")
        return
    _executors_agree(kind, ("reference",))
    record(kind, "reference", "ok")


# The Triton interpreter (~15 s per architecture) and FlexAttention's CPU compile (~30 s per new
# shape or variant) are slow on a CPU: the variants run by default, the rest with the slow tests.
KERNEL_FAST = {"triton": ("gemma2", "gpt-oss"), "flex": ("gpt-oss",)}


@pytest.mark.parametrize(
    ("executor", "kind"),
    [
        (name, kind) if kind in KERNEL_FAST[name] else pytest.param(name, kind, marks=pytest.mark.slow)
        for name in ("triton", "flex")
        for kind in TINY_KINDS
        if kind not in REFUSED
    ],
)
def test_kernel_executor_equals_reference(executor, kind):
    _executors_agree(kind, ("reference", executor))
    record(kind, executor, "ok")


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_generate_equals_plain_hf_greedy(kind):
    model = model_of(kind)
    plain, tok = plain_of(kind)
    ids = random_ids(20, seed=5)
    with torch.no_grad():
        want = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.eos_token_id)
    got = model.generate(ids, max_new_tokens=6)
    assert torch.equal(got, want), f"{kind}: greedy tokens differ from the plain Hugging Face model"
    record(kind, "generate", "ok")


def test_refused_model_is_refused_with_its_reason_before_any_forward():
    model = model_of("falcon-alibi")
    calls = []
    with pytest.raises(RoutingError, match=r"FalconAttention adds a position bias \(ALiBi\).*config asks for ALiBi.*--path pattern"):
        with route_attention(model, lambda *a, **k: calls.append(a)):
            pass
    assert calls == []


def test_a_bias_in_the_attention_mask_is_refused_at_run_time(monkeypatch):
    """A model whose config does not announce its bias is stopped at its first attention call."""
    import attnlab.attention as attention

    model = model_of("falcon-alibi")
    monkeypatch.setattr(attention, "uses_alibi", lambda cfg: False)
    with pytest.raises(RoutingError, match=r"FalconAttention adds a bias to its attention scores through its attention mask \(layer 0: values "
                                          r"other than 0 and the masking value.*--path pattern"):
        capture(model, random_ids(N_TOKENS, seed=2), STATS, path="qk")


def test_mask_bias_tells_a_bias_from_masking():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert not mask_bias(causal) and not mask_bias(None)
    low = torch.finfo(torch.float32).min
    assert not mask_bias(torch.zeros(5, 5).masked_fill(~causal, float("-inf")))
    assert not mask_bias(torch.zeros(5, 5).masked_fill(~causal, low))
    alibi = -torch.arange(5.0)[None, :].flip(-1).expand(5, 5) * 0.25
    assert mask_bias(alibi.masked_fill(~causal, low))
    assert mask_bias(torch.full((5, 5), 1e-6).masked_fill(~causal, low)), "any finite nonzero value is a bias"


# --- the support table -----------------------------------------------------------------------
COLUMNS = (
    ("pattern", "pattern path"),
    ("qk", "q/k statistics"),
    ("reference", "reference executor"),
    ("triton", "triton executor"),
    ("flex", "flex executor"),
    ("generate", "generate"),
)


_EXECUTOR_COLUMNS = ("reference", "triton", "flex")


def render_table(results: dict[str, dict[str, str]]) -> str:
    lines = [
        "# What works where",
        "",
        "Generated by `ATTNLAB_UPDATE_SUPPORT=1 python -m pytest tests/test_architectures.py` (the",
        "architecture matrix of tiny random-init models; do not edit by hand), measured with",
        f"transformers {TRANSFORMERS_MINOR}, the version attnlab asks for. **ok** means: the",
        "pattern path equals Hugging Face eager attention; q/k statistics and block maps equal the",
        "pattern path's to <= 1e-5; every executor agrees with the reference to <= 1e-4 under a",
        "mixed sparse policy and equals the model's own forward under an all-dense policy, and the",
        "model's attention comes back after it; `LoadedModel.generate` gives the plain model's",
        "greedy tokens. **refused** means the path stops with one error naming the reason before",
        "any number is computed.",
        "",
        "| architecture | HF class | attention | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for kind in TINY_KINDS:
        row = results.get(kind, {})
        cells = [row.get("executors", row.get(col, "-")) if col in _EXECUTOR_COLUMNS else row.get(col, "-") for col, _ in COLUMNS]
        lines.append(f"| {kind} | {row.get('class', '-')} | {row.get('attention', '-')} | " + " | ".join(cells) + " |")
    if any(kind in REFUSED for kind in TINY_KINDS):
        lines += ["", "Refused:"] + [f"- {kind}: {why}, which attnlab's executors and q/k statistics "
                                      "do not compute; use the pattern path (`--path pattern`) for its statistics."
                                      for kind, why in REFUSED.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_support_table_is_generated_from_the_matrix():
    """Runs last in this file, with the slow tests: every cell must have been measured above."""
    missing = [(kind, col) for kind in TINY_KINDS for col, _ in COLUMNS
               if col not in RESULTS.get(kind, {}) and not (col in _EXECUTOR_COLUMNS and "executors" in RESULTS.get(kind, {}))]
    assert not missing, f"run the whole file (with the slow tests) to render the table; unmeasured: {missing[:5]}"
    text = render_table(RESULTS)
    if os.environ.get("ATTNLAB_UPDATE_SUPPORT") == "1":
        SUPPORT_MD.parent.mkdir(exist_ok=True)
        SUPPORT_MD.write_text(text)
    assert SUPPORT_MD.read_text() == text, (
        "docs/support.md is stale: run `ATTNLAB_UPDATE_SUPPORT=1 python -m pytest tests/test_architectures.py`"
    )



# --- policies respect the model's own structure (issue 12, item 3) ------------------------------
def _estimator(kind: str):
    from attnlab.runs import BlockMaps
    from attnlab.sparsity_stats.curves import ProfileEstimator

    model = model_of(kind)
    result = capture(model, random_ids(96, seed=6), STATS, path="qk")
    mass = torch.stack([s.block_sum for s in result.layers])
    qb = mass.shape[-1]
    maps = BlockMaps(block_size=STATS.block_size, mass_sum=mass, mass_max=torch.stack([s.block_max for s in result.layers]),
                     count=torch.ones(qb, qb, dtype=torch.int32))
    return model, ProfileEstimator(maps, model.identity().to_dict(), profiled_lengths=[96])


def test_window_layers_bound_what_a_policy_keeps_and_cost_their_windowed_cost():
    from attnlab.sparsity_stats.kinds import Candidate, windowed_causal_tiles

    model, est = _estimator("gemma2")  # layer 0: window 8; layer 1: full
    assert model.identity()["attention"] == {"layer_windows": [8, 0], "softcap": 2.0}
    assert list(est.layer_windows) == [8, 0]
    cost = est.layer_cost(96)
    assert cost[1] == 1.0 and cost[0] == windowed_causal_tiles(96, 8, 8) / windowed_causal_tiles(96, 8) == 23 / 78
    dense = est.evaluate(Candidate.make("dense"))
    assert (dense.density == 1).all() and (dense.recall == 1).all()
    wide = est.evaluate(Candidate.make("streaming", sink=4, window=32))
    assert (wide.density[0] == 1).all(), "a policy window wider than the model's keeps the whole window layer"
    assert (wide.density[1] < 0.8).all(), "on the full layer the same policy is sparse"
    assert (wide.kv[0] <= 8 / 96 + 1e-12).all(), "a window layer never needs more KV than its window"
    assert (wide.recall[0] > 1 - 1e-4).all(), "the window layer's mass is all inside the model's window"
    # the executor's layouts on the window layer cost exactly the windowed dense cost
    ids = random_ids(96, seed=6)
    with torch.no_grad(), run_with_policy(model, make_policy(model, kinds=[("dense", {})], block_size=8), "reference") as ex:
        model.hf_model(ids, use_cache=False)
    assert ex.layouts_[0].model_window == 8 and int(ex.layouts_[0].kept_blocks()[0]) == windowed_causal_tiles(96, 8, 8)
    assert (ex.layouts_[0].density == 1).all()


def test_a_learned_sinks_mass_counts_in_recall():
    from attnlab.sparsity_stats.kinds import Candidate

    _, est = _estimator("gpt-oss")
    sink = est.sink_share(96)
    assert (sink > 0.01).all(), "every gpt-oss head's learned sink takes mass"
    narrow = est.evaluate(Candidate.make("streaming", sink=0, window=1))
    assert (narrow.recall >= sink - 1e-9).all(), "the sink is always kept: it counts in every policy's recall"
    _, plain = _estimator("llama")
    assert (plain.sink_share(96) == 0).all()
