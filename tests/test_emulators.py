"""Exports against the target tools: each tool's emulator on the exported file, compared with the
mask attnlab validates (conformance), the tools' own rules, and the README readers run without attnlab."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import MIXED, MODEL, make_policy

from attnlab.sparsity_stats import FormatError, compile_policy, export_policy, import_policy
from attnlab.sparsity_stats.emulators import (
    MI_DEFAULT_PATTERN,
    Deployment,
    compare_deployment,
    deployed_masks,
    deployed_masks_for_input,
    deployment_report,
    duo_full_heads,
    duo_masks,
    duo_streaming_mask,
    flex_masks,
    mask_file_masks,
    minference_block_sparse_blocks,
    minference_head_mask,
    minference_masks,
    minference_stream_mask,
    minference_vs_indices,
    minference_vs_mask,
    minference_vs_sizes,
    validated_masks,
)
from attnlab.sparsity_stats.export import MINFERENCE_DENSE

README = Path(__file__).resolve().parents[1] / "README.md"
#: Lengths: ragged (not a multiple of 16 or 64), a multiple, and past the profiled 128.
LENGTHS = (100, 128, 257, 600)
PROFILED = make_policy([
    [("dense", {}), ("streaming", {"sink": 4, "window": 40}), ("a_shape", {"sink": 16, "window": 48}), ("vertical_slash", {"vertical": 32, "slash": 48})],
    [("block_topk", {"topk": 64}), ("block_topk", {"gamma": 0.9}), ("streaming", {"sink": 0, "window": {"alpha": 8, "beta": 0.05}}), ("dense", {})],
])
PROFILED.profiled_lengths = [128]
DUO_SMALL = make_policy([
    [("dense", {}), ("dense", {}), ("streaming", {"sink": 4, "window": 33}), ("streaming", {"sink": 4, "window": 33})],
    [("streaming", {"sink": 4, "window": 33}), ("streaming", {"sink": 4, "window": 33}), ("dense", {}), ("dense", {})],
])
MI_EXACT = make_policy([
    [("dense", {}), ("streaming", {"sink": 4, "window": 40}), ("dense", {}), ("streaming", {"sink": 0, "window": 64})],
    [("streaming", {"sink": 64, "window": 200}), ("dense", {}), ("dense", {}), ("streaming", {"sink": 8, "window": 16})],
])


def causal(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return i[None, :] <= i[:, None]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- conformance: every format on a mixed policy at several lengths --------------------------------
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_mask_files_run_exactly_the_validated_mask(fmt, n):
    val = quiet(validated_masks, PROFILED, n)
    dep = quiet(deployed_masks, PROFILED, fmt, n)
    for a, b in zip(val, dep, strict=True):
        assert torch.equal(a, b)
    assert quiet(compare_deployment, PROFILED, val, dep, fmt).equal


@pytest.mark.parametrize("n", LENGTHS)
def test_flex_file_alone_attends_partial_blocks_whole_and_the_loader_is_exact(n):
    val = quiet(validated_masks, PROFILED, n)
    exact = quiet(deployed_masks, PROFILED, "flex", n, flex_mask_mod=True)
    for a, b in zip(val, exact, strict=True):
        assert torch.equal(a, b)
    alone = quiet(deployed_masks, PROFILED, "flex", n)
    rep = compare_deployment(PROFILED, val, alone, "flex")
    assert rep.superset and not rep.equal
    assert all(h.future > 0 for h in rep.heads)  # every head's diagonal blocks attend future tokens whole
    assert "future tokens: a wrong result" in "\n".join(rep.lines())
    eager = quiet(deployed_masks, PROFILED, "flex", n, flex_compiled=False)  # eager Flex ignores the block lists
    assert all(bool(m.all()) for m in eager)


@pytest.mark.parametrize("n", LENGTHS)
def test_minference_runs_a_superset_of_the_validated_mask(n):
    """No input (the prior): streaming and dense heads are exact; vertical-slash with MInference's
    minimums and 64-key ranges, A-shape as stream_llm and block_topk as block_sparse (--lossy)
    are supersets, and the report says by how much."""
    val = quiet(validated_masks, PROFILED, n)
    dep = quiet(deployed_masks, PROFILED, "minference", n, lossy=True)
    rep = compare_deployment(PROFILED, val, dep, "minference")
    assert rep.superset
    for h in rep.heads:
        if h.kind in ("dense", "streaming"):
            assert h.added == 0 and h.dropped == 0, h
        assert h.future == 0
    # below 100 blocks of 64 tokens, MInference's block_sparse is dense: the "heads that ran dense"
    topk = [h for h in rep.heads if h.kind == "block_topk"]
    assert all(h.deployed_density == 1.0 and h.dense for h in topk)
    exact = quiet(deployed_masks, MI_EXACT, "minference", n)
    assert compare_deployment(MI_EXACT, quiet(validated_masks, MI_EXACT, n), exact, "minference").equal


@pytest.mark.parametrize("n", [100, 257, 600])
def test_duo_decoding_is_exact_prefill_is_dense_chunks_see_more(tmp_path, n):
    val = quiet(validated_masks, DUO_SMALL, n)
    decode = quiet(deployed_masks, DUO_SMALL, "duo", n)
    assert compare_deployment(DUO_SMALL, val, decode, "duo").equal
    prefill = quiet(deployed_masks, DUO_SMALL, "duo", n, phase="prefill")
    assert all(torch.equal(m, causal(n).expand_as(m)) for m in prefill)
    chunked = quiet(deployed_masks, DUO_SMALL, "duo", n, phase="chunked", chunk=32)
    rep = compare_deployment(DUO_SMALL, val, chunked, "duo")
    assert rep.superset and not rep.equal
    # the export before the fix wrote recent_size = window: DuoAttention then ran one more token per query
    export_policy(DUO_SMALL, tmp_path, "duo", seq_len=n)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["recent_size"] = cfg["attnlab_window"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = duo_masks(tmp_path, n, 4)
    before = compare_deployment(DUO_SMALL, val, old, "duo")
    assert before.superset and not before.equal and sum(h.added for h in before.heads) == 4 * (n - 4 - 33)


GQA_MIXED = make_policy([
    [("dense", {}), ("dense", {}), ("streaming", {"sink": 4, "window": 40}), ("streaming", {"sink": 4, "window": 40})],
    [("vertical_slash", {"vertical": 32, "slash": 48})] * 2 + [("a_shape", {"sink": 16, "window": 48})] * 2,
])


@pytest.mark.parametrize("n", [128, 256, 608])
def test_flashinfer_block_sparse_rows_run_exactly_the_validated_mask(tmp_path, n):
    val = quiet(validated_masks, GQA_MIXED, n)
    dep = quiet(deployed_masks, GQA_MIXED, "flashinfer", n)
    assert compare_deployment(GQA_MIXED, val, dep, "flashinfer").equal
    (path,) = export_policy(GQA_MIXED, tmp_path, "flashinfer", seq_len=n)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnlab"])
        indptr, mask = f.get_tensor("layer1.kv0.indptr"), f.get_tensor("layer1.kv0.mask")
    assert indptr.shape == (n // 16 + 1,) and mask.shape[1:] == (16, 16) and int(indptr[-1]) == mask.shape[0]
    assert meta["group"] == 2 and "num_kv_heads=1" in meta["usage"]


def test_flashinfer_refuses_ragged_lengths_and_mixed_kv_groups(tmp_path):
    with pytest.raises(FormatError, match=r"--seq-len 100 is not a multiple of the block size 16.*export at 96 or 112"):
        export_policy(GQA_MIXED, tmp_path, "flashinfer", seq_len=100)
    with pytest.raises(FormatError, match=r"head \(layer 0, head 1\) \(streaming\) cannot be written in flashinfer.*KV head 0 mixes"):
        export_policy(MIXED, tmp_path, "flashinfer", seq_len=128)
    with pytest.raises(FormatError, match="unknown format 'flashinfer'"):
        import_policy("flashinfer", tmp_path / "x", MODEL)
    assert not any(tmp_path.iterdir())


def test_mixed_policy_export_refuses_what_a_target_cannot_run_without_lossy(tmp_path):
    with pytest.raises(FormatError, match=r"\(block_topk\).*--lossy"):
        export_policy(make_policy([[("dense", {}), ("block_topk", {"topk": 64}), ("dense", {}), ("dense", {})]] * 2),
                      tmp_path, "minference", seq_len=256)
    with pytest.raises(FormatError, match=r"head \(layer 0, head 1\) \(streaming\) cannot be written in duo format"):
        export_policy(MIXED, tmp_path, "duo", seq_len=256)
    assert not any(tmp_path.iterdir())


def test_export_report_is_the_emulated_comparison():
    rep = quiet(deployment_report, PROFILED, "minference", 257, lossy=True)
    direct = compare_deployment(PROFILED, quiet(validated_masks, PROFILED, 257),
                                quiet(deployed_masks, PROFILED, "minference", 257, lossy=True), "minference")
    assert [(h.added, h.dropped) for h in rep.heads] == [(h.added, h.dropped) for h in direct.heads]
    text = "\n".join(rep.lines())
    assert "as minference runs it at 257 tokens" in text and "2 run dense" in text and "block_topk: 2 heads" in text
    assert "compared on the prior" in text
    assert "every head identical" in "\n".join(quiet(deployment_report, DUO_SMALL, "duo", 300).lines())


# -- MInference's own rules -------------------------------------------------------------------
def test_minference_sizes_minimums_and_forced_indices():
    assert minference_vs_sizes(1, 1, 1000) == (30, 50)
    assert minference_vs_sizes(5000, 6000, 1000) == (1000, 1000)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    cols, dists = minference_vs_indices(300, 40, 120, q, k)
    assert len(cols) == 40 and len(dists) == 120 and torch.all(cols[1:] > cols[:-1])
    assert set(range(30)) <= set(cols.tolist())  # the first 30 columns always
    assert set(range(100)) <= set(dists.tolist())  # the last 100 diagonals always
    prior_cols, prior_dists = minference_vs_indices(300, 40, 120)
    assert prior_cols.tolist() == list(range(40)) and sorted(prior_dists.tolist()) == list(range(120))


def test_minference_diagonals_run_as_64_key_ranges_and_gap_columns_one_by_one():
    n = 200
    m = minference_vs_mask(n, torch.tensor([0, 5, 130]), torch.tensor([0]))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same_block = (i // 64 == j // 64) & (j <= i)  # the diagonal's range is the query block's 64 keys, causal
    columns = (j == 0) | (j == 5) | ((j == 130) & (i >= 192))  # columns below the range, one by one
    assert torch.equal(m, same_block | (columns & (j <= i)))
    # nearby diagonals merge into one range grown 64 keys at a time, past the diagonals themselves
    m2 = minference_vs_mask(256, torch.tensor([0]), torch.tensor([40, 0]))
    assert bool(m2[255, 152]) and not bool(m2[255, 151]) and bool(m2[255, 0])
    assert bool(m2[191, 88]) and not bool(m2[191, 87])


def test_minference_block_sparse_keeps_100_blocks_of_64_whatever_the_config():
    n = 64 * 102 + 5
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    blocks = minference_block_sparse_blocks(n, q, k)
    counts = blocks.sum(-1)
    assert torch.equal(counts[:100], torch.arange(1, 101)) and torch.all(counts[100:] == 100)
    a = minference_head_mask(["block_sparse", 2, 16, 1.0], 300)
    b = minference_head_mask(["block_sparse", 1, 64, 0.5], 300)
    assert torch.equal(a, b) and torch.equal(a, causal(300))  # both numbers ignored; dense below 6,400 tokens


def test_minference_dense_heads_are_dense_beyond_the_context():
    n = 700  # past a context of 256: the old (n_ctx, n_ctx) entry keeps <= 256 columns + 256 diagonals (+ 64-key ranges)
    assert torch.equal(minference_head_mask(["vertical_and_slash", MINFERENCE_DENSE, MINFERENCE_DENSE, 1.0], n), causal(n))
    old = minference_head_mask(["vertical_and_slash", 256, 256, 1.0], n)
    assert not torch.equal(old, causal(n)) and int((causal(n) & ~old).sum()) > 0
    assert torch.equal(minference_stream_mask(50, 4, 10), minference_head_mask(["stream_llm", 4, 10, 0.9], 50))
    cfg = [{"0": ["stream_llm", 4, 10, 0.9]}]  # head 1 missing: MInference's default pattern
    masks = minference_masks(cfg, 50, n_heads=2)
    assert torch.equal(masks[0][1], minference_head_mask(list(MI_DEFAULT_PATTERN), 50))


def test_minference_with_an_input_selects_per_token():
    """On one input, MInference's vertical-slash heads select from the last 64 queries per token,
    attnlab per block: both are computed, and the comparison is what validate --as reports."""
    n = 257
    g = torch.Generator().manual_seed(2)
    pol = make_policy([[("vertical_slash", {"vertical": 32, "slash": 48}), ("streaming", {"sink": 4, "window": 40}),
                        ("dense", {}), ("vertical_slash", {"vertical": 64, "slash": 128})]] * 2)
    qs = [torch.randn(4, n, 16, generator=g) for _ in range(2)]
    ks = [torch.randn(2, n, 16, generator=g) for _ in range(2)]
    val = quiet(validated_masks, pol, n, qk=lambda lay: (qs[lay], ks[lay]))
    dep = quiet(deployed_masks, pol, "minference", n, qk=lambda lay: (qs[lay], ks[lay]))
    rep = compare_deployment(pol, val, dep, "minference")
    for h in rep.heads:
        assert h.future == 0
        if h.kind != "vertical_slash":
            assert h.added == 0 and h.dropped == 0
    vs = dep[0][0]
    assert bool(vs[:, :30][causal(n)[:, :30]].all())  # first 30 columns for every query
    assert all(bool(vs[i, i - d]) for i in range(100, n) for d in range(100))  # last 100 diagonals
    one = quiet(deployed_masks_for_input, pol, "minference", 1, qs[1], ks[1])
    assert torch.equal(one, dep[1])
    dep_once = Deployment(pol, "minference", seq_len=4096)  # sizes resolved at the export length, as attnlab export does
    assert torch.equal(dep_once.layer_mask(0, qs[0], ks[0]), dep[0])
    duo = Deployment(DUO_SMALL, "duo", seq_len=n)
    assert torch.equal(duo.layer_mask(1, qs[1], ks[1]), quiet(deployed_masks, DUO_SMALL, "duo", n)[1])
    npz = Deployment(PROFILED, "npz", seq_len=n)
    assert torch.equal(npz.layer_mask(0, qs[0], ks[0]), quiet(validated_masks, PROFILED, n)[0])
    with pytest.raises(ValueError, match="holds masks for 257 tokens, the input has 100"):
        npz.layer_mask(0, qs[0][:, :100], ks[0][:, :100])


# -- DuoAttention's own rules -------------------------------------------------------------------
def test_duo_head_selection_and_streaming_phases():
    gates = np.array([[0.9, 0.2], [0.4, 0.7]])
    assert duo_full_heads(gates, sparsity=0.5).tolist() == [[True, False], [False, True]]
    assert duo_full_heads(gates, sparsity=0).all() and not duo_full_heads(gates, sparsity=1).any()
    # tied 0/1 gates (earlier exports): Duo's tie-break noise picks the full heads at random
    assert int(duo_full_heads(np.zeros((4, 2)), sparsity=0.5, noise_seed=0).sum()) == 4
    n, sink, recent = 60, 3, 7
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    decode = duo_streaming_mask(n, sink, recent, 1)
    assert torch.equal(decode, (j <= i) & ((j < sink) | (i - j <= recent)))  # recent keys exclude the query
    assert torch.equal(duo_streaming_mask(n, sink, recent, n), causal(n))  # one prefill forward: dense
    chunk = duo_streaming_mask(n, sink, recent, 16)
    assert torch.equal(chunk[:16], causal(n)[:16])  # the first chunk is a prefill
    assert bool(chunk[47, 32]) and bool(chunk[47, 25]) and not bool(chunk[47, 24]) and bool(chunk[47, 2])


def test_duo_export_selects_the_same_heads_in_duo(tmp_path):
    export_policy(DUO_SMALL, tmp_path, "duo", seq_len=256)
    cfg = json.loads((tmp_path / "config.json").read_text())
    gates = np.loadtxt(tmp_path / "full_attention_heads.tsv", delimiter="\t", ndmin=2)
    want = [[True, False], [False, True]]
    # DuoAttention adds noise below 1e-6 and re-thresholds with the sparsity it is given
    rng = np.random.default_rng(0)
    for _ in range(20):
        noisy = gates + rng.uniform(0, 1e-6, gates.shape)
        assert duo_full_heads(noisy, sparsity=cfg["sparsity"]).tolist() == want
    assert (gates >= 0.5).tolist() == want
    back = import_policy("duo", tmp_path, MODEL, block_size=16)
    assert back.entry(0, 2).params["window"].resolve(256) == 33


# -- README readers, run in processes that never import attnlab ---------------------------------
_BLOCK_ATTNLAB = textwrap.dedent("""
    import sys
    class _NoAttnlab:
        def find_spec(self, name, path=None, target=None):
            if name == "attnlab" or name.startswith("attnlab."):
                raise ImportError("this reader must not need attnlab")
    sys.meta_path.insert(0, _NoAttnlab())
""")


def readme_code(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- reader: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no '<!-- reader: {name} -->' code block"
    return m.group(1)


def run_without_attnlab(code: str, tmp_path: Path) -> None:
    script = tmp_path / "reader.py"
    script.write_text(_BLOCK_ATTNLAB + code + "\nassert not any(m.split('.')[0] == 'attnlab' for m in sys.modules)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_readme_numpy_reader_runs_without_attnlab(tmp_path, fmt):
    n = 100
    (path,) = quiet(export_policy, PROFILED, tmp_path, fmt, seq_len=n)
    want = [lay.token_mask().numpy() for lay in quiet(compile_policy, PROFILED, n)]
    np.save(tmp_path / "want.npy", np.stack(want))
    code = readme_code(fmt) + textwrap.dedent(f"""
        import numpy as np
        got = read_masks({str(path)!r})
        meta = read_meta({str(path)!r})
        assert meta["dynamic"][1][:2] == [True, True] and meta["estimator"][1][0]["rule"] == "pooled_qk"
        assert np.array_equal(np.stack(got), np.load("want.npy"))
    """)
    run_without_attnlab(code, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(mask_file_masks(path), map(torch.from_numpy, want), strict=True))


@pytest.mark.slow
def test_readme_flex_loader_runs_without_attnlab(tmp_path):
    n = 100
    (path,) = quiet(export_policy, PROFILED, tmp_path, "flex", seq_len=n)
    layouts = quiet(compile_policy, PROFILED, n)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g) for _ in range(3))
    ref = []
    for lay in layouts:
        s = (q @ k.transpose(-1, -2)) / 4.0
        s = s.masked_fill(~lay.token_mask()[None], float("-inf"))
        ref.append(torch.softmax(s, -1) @ v)
    torch.save({"q": q, "k": k, "v": v, "ref": torch.stack(ref)}, tmp_path / "qkv.pt")
    code = readme_code("flex") + textwrap.dedent(f"""
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        d = torch.load("qkv.pt")
        for layer, bm in enumerate(load_flex_masks({str(path)!r})):
            out = flex_attention(d["q"], d["k"], d["v"], block_mask=bm)
            assert torch.allclose(out, d["ref"][layer], atol=1e-5), (layer, (out - d["ref"][layer]).abs().max())
    """)
    run_without_attnlab(code, tmp_path)
    assert all(torch.equal(a, b.token_mask()) for a, b in zip(flex_masks(path), layouts, strict=True))
