"""The multi-key diagnosis script's parts: the last row's mask is the layout's own, the needle
spans are the needles' tokens, and the recorded probabilities are the softmax over the keys the
method keeps (on a tiny model, under a real streaming policy)."""

import numpy as np
import pytest
import torch
from conftest import load_benchmark, random_ids

from attnlab.kernels.layout import BlockSparseLayout
from attnlab.sparsity_stats.executors import PolicyExecutor
from attnlab.sparsity_stats.policy import uniform_policy


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("task_suite_multikey.py")


@pytest.mark.parametrize("n", [77, 128, 130])
def test_last_row_mask_is_the_token_masks_last_row(bench, n):
    g = torch.Generator().manual_seed(n)
    nb = -(-n // 16)
    blocks = (torch.rand(3, nb, nb, generator=g) < 0.5) & torch.ones(nb, nb, dtype=torch.bool).tril()
    blocks[:, -1, 0] = True  # the sink's block, so the streaming head's sink rule is exercised
    lay = BlockSparseLayout.from_block_masks(blocks, block_size=16, n_q=n, n_k=n, causal=True,
                                             sink=[0, 4, 0], window=[0, 20, 0])
    mask = bench.last_row_mask(lay)
    assert torch.equal(mask, lay.token_mask()[:, -1])
    assert not mask[1, 4 : n - 20].any() and mask[1, :4].all()  # head 1: sink 4 + the last 20 keys


class Pieces:
    """A tokenizer whose tokens are the words (with their leading space) of a fixed text."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.words[i] for i in ids)


def test_needle_spans_cover_the_needles_tokens(bench):
    text = "Noise here. The secret number for apple is 1234567. More noise. The secret number for pear is 7654321. End"
    words = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
    tok = Pieces(words)
    decoded, starts = bench.token_starts(tok, list(range(len(words))))
    assert decoded == text
    a, b = bench.needle_span(decoded, starts, "7654321")
    assert tok.decode(range(a, b)).strip() == "The secret number for pear is 7654321."
    a, b = bench.needle_span(decoded, starts, "1234567")
    assert tok.decode(range(a, b)).strip() == "The secret number for apple is 1234567."
    with pytest.raises(SystemExit, match="not in the prompt exactly once"):
        bench.needle_span(decoded, starts, "999")


def test_token_starts_refuses_pieces_that_do_not_concatenate(bench):
    class Merging(Pieces):
        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.words[i] for i in ids).replace("  ", " ") if len(list(ids)) > 1 else self.words[ids[0]]

    with pytest.raises(SystemExit, match="do not concatenate"):
        bench.token_starts(Merging(["a ", " b"]), [0, 1])


def test_the_last_rows_probabilities_are_the_softmax_over_the_kept_keys(bench, tiny_llama):
    ex = PolicyExecutor(uniform_policy(tiny_llama, "streaming", {"sink": 4, "window": 16}, block_size=16), "reference")
    rec = bench.LastRow(ex)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 70, 8, generator=g) for h in (4, 2, 2))
    out = rec(0, q, k, v, scaling=0.3)
    assert torch.allclose(out, ex.attention(0, q, k, v, scaling=0.3), atol=1e-6)
    p = rec.probs[0]
    kept = rec.kept[0]
    assert kept[:, :4].all() and kept[:, -16:].all() and not kept[:, 4:-16].any()
    assert torch.all(p[~kept] == 0) and torch.allclose(p.sum(-1), torch.ones(4))
    scores = torch.einsum("hd,hnd->hn", q[0, :, -1], k[0].repeat_interleave(2, 0)) * 0.3
    want = torch.softmax(scores[:, kept[0]], -1)
    assert torch.allclose(p[:, kept[0]], want, atol=1e-6)
    dense = bench.LastRow(None)
    dense(0, q, k, v, scaling=0.3)
    assert torch.allclose(dense.probs[0], torch.softmax(scores, -1), atol=1e-6)
    assert np.isclose(float(dense.probs[0][:, 4:-16].sum()), float(4 - torch.softmax(scores, -1)[:, kept[0]].sum()),
                      atol=1e-5)


def test_the_teacher_forced_reply_is_the_models_probability_of_each_answer_token(bench, tiny_llama):
    """`measure`'s answer steps: after a dense prefill, each step's probability of the reference
    token is what one forward over prompt + reference gives at that position, and ``greedy`` is
    that position's argmax; under a sparse prefill the first step's probability changes."""
    from types import SimpleNamespace

    ids = random_ids(40, seed=3, vocab=tiny_llama.hf_model.config.vocab_size)
    answer = [5, 17, 9]
    sample = SimpleNamespace(input_ids=ids)
    m = bench.measure(tiny_llama, sample, None, answer)
    with torch.no_grad():
        whole = tiny_llama.hf_model(input_ids=torch.cat([ids, torch.tensor([answer[:-1]])], -1)).logits[0, -len(answer):]
    probs = torch.softmax(whole.float(), -1)
    assert np.allclose(m["p_answer"], probs[torch.arange(3), answer].numpy(), rtol=1e-4, atol=0)
    assert m["greedy"] == probs.argmax(-1).tolist() and m["first"] == m["greedy"][0]
    ex = PolicyExecutor(uniform_policy(tiny_llama, "streaming", {"sink": 4, "window": 16}, block_size=16), "reference")
    sparse = bench.measure(tiny_llama, sample, ex, answer)
    assert not np.isclose(sparse["p_answer"][0], m["p_answer"][0], rtol=1e-3, atol=0)
    assert sparse["kept"].shape == m["kept"].shape and not sparse["kept"].all()


def test_the_reply_report_counts_where_greedy_leaves_the_reference(bench, capsys):
    """Two samples, answer ``[" ", "4", "4", "8"]``: dense follows both all the way; the pick leaves
    the first at its last digit (as the ``44.`` replies of the 4k essay misses do) and the second at its
    first digit."""
    def method(p, greedy):
        return {"p_answer": p, "greedy": greedy}

    ref = [0, 4, 4, 8]
    results = [
        {"group": "g", "answered": {"dense": True}, "answer_ids": ref, "first_digit": 1,
         "methods": {"dense": method([1.0, 0.9, 0.8, 0.7], ref), "pick": method([1.0, 0.9, 0.8, 0.2], [0, 4, 4, 99])}},
        {"group": "g", "answered": {"dense": True}, "answer_ids": ref, "first_digit": 1,
         "methods": {"dense": method([1.0, 0.5, 0.8, 0.7], ref), "pick": method([1.0, 0.1, 0.8, 0.7], [0, 1, 4, 8])}},
    ]
    bench.reply_report(results, ["dense", "pick"], lambda r: "g", ["g"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| g |")]
    assert rows[0] == "| g | 2 | dense | 0.70 | 0.60 | 2 | 0 | 0 |"
    assert rows[1] == "| g | 2 | pick | 0.50 | 0.15 | 0 | 1 | 1 |"
