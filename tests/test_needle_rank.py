"""benchmarks/needle_rank.py: the ranks it reports are the order the pick's top-k keeps blocks in."""

import pytest
import torch
from conftest import load_benchmark

from attnlab.sparsity_stats.kinds import select_block_topk


@pytest.fixture(scope="module")
def nr():
    return load_benchmark("needle_rank.py")


def test_the_diagonal_ranks_first_the_first_block_second_then_by_score(nr):
    scores = torch.zeros(1, 4, 4)
    scores[0, 3] = torch.tensor([0.1, 0.5, 0.2, 0.2])  # the last query-block row
    assert nr.block_ranks(scores).tolist() == [[2, 3, 4, 1]]


def test_a_block_is_kept_by_a_top_k_exactly_when_its_rank_is_at_most_k(nr):
    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(3, 12, 12), -1)
    ranks = nr.block_ranks(scores)
    for k in range(2, 13):
        kept = select_block_topk(scores, topk_blocks=k)[:, -1]
        assert torch.equal(kept, ranks <= k), k


def test_the_report_counts_heads_kept_at_each_multiple_of_k(nr, capsys):
    heads = [{"layer": 21, "head": 0, "k": 10, "kept": True, "needed_pooled": 5, "needed_antidiagonal": 4},
             {"layer": 21, "head": 1, "k": 10, "kept": False, "needed_pooled": 18, "needed_antidiagonal": 31}]
    nr.report([{"sample": "s", "group": "g", "needle_blocks": [7], "heads": heads}])
    out = capsys.readouterr().out
    assert "| g (1) | 2 | pooled | 1 (50%) | 1 (50%) | 2 (100%) | 2 (100%) | 1.15 |" in out
    assert "| g (1) | 2 | antidiagonal | 1 (50%) | 1 (50%) | 1 (50%) | 1 (50%) | 1.75 |" in out
    assert "- layer 21: 2 heads; pooled 1, antidiagonal 1" in out


def test_report_without_a_file_is_one_line(nr, tmp_path):
    with pytest.raises(SystemExit, match="--report takes one file"):
        nr.main(["--report", str(tmp_path / "missing.json")])
