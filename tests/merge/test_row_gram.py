"""The row-order Gram matrix (`splice.merge.methods._row_gram`): float64 per-row partials
added one at a time in row order, the same bits whole or in any row slices; and SLERP /
Model Stock merging a row chunk with the whole tensor's Gram (`TensorGram` answered)."""

from __future__ import annotations

import math

import pytest
import torch
from merge_test_util import run

from splice.merge import MergeContext, TensorGram
from splice.merge.methods import _row_gram
from splice.merge.methods._row_gram import RowGram, row_dots, tensor_gram

R2 = math.sqrt(2) / 2


def test_gram_of_two_matrices_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    # x·x = 1+4+9+16 = 30, x·y = 5+12+21+32 = 70, y·y = 25+36+49+64 = 174
    assert tensor_gram([x, y]).tolist() == [[30.0, 70.0], [70.0, 174.0]]
    # per row: row 0 (x·x 5, x·y 17, y·y 61), row 1 (25, 53, 113)
    assert row_dots([x, y]).tolist() == [[[5.0, 17.0], [17.0, 61.0]], [[25.0, 53.0], [53.0, 113.0]]]


def test_partials_are_added_in_row_order_in_float64():
    # row partials 1e16, 1, 1, -1e16: in row order 1e16 + 1 rounds back to 1e16 (ulp 2, tie
    # to even) twice, then -1e16 gives 0; the exact sum (fsum, or pairwise: (1e16 + 1) +
    # (1 − 1e16)) would be 2
    x = torch.tensor([1e8, 1.0, 1.0, 1e8], dtype=torch.float64)
    y = torch.tensor([1e8, 1.0, 1.0, -1e8], dtype=torch.float64)
    assert math.fsum([1e16, 1.0, 1.0, -1e16]) == 2.0
    assert tensor_gram([x, y])[0, 1].item() == 0.0
    gram = RowGram(2)
    for a, b in ((0, 1), (1, 3), (3, 4)):  # row chunks: the same
        gram.add([x[a:b], y[a:b]])
    assert gram.gram()[0, 1].item() == 0.0


def test_products_of_float32_entries_are_exact():
    # (1 + 2^-23)^2 = 1 + 2^-22 + 2^-46: exact in float64, lost in float32
    v = torch.tensor([1 + 2**-23], dtype=torch.float32)
    assert tensor_gram([v])[0, 0].item() == 1 + 2**-22 + 2**-46


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(("rows", "cols"), [(50, 40000), (300, 41), (2000, 1)])
def test_any_row_slices_give_the_whole_tensors_bits(monkeypatch, threads, rows, cols):
    """Slices of 1, 2, 7 rows (a one-row slice of 40000 entries would be split over
    torch's threads as a whole vector: the row is reduced serially instead) and blocks of
    a few rows (``ROW_BLOCK`` small) give the whole tensor's Gram bit for bit."""
    g = torch.Generator().manual_seed(rows)
    xs = [torch.randn(rows, cols, generator=g) for _ in range(3)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = tensor_gram(xs)
        for step in (1, 2, 7):
            gram = RowGram(3)
            for a in range(0, rows, step):
                gram.add([x[a : a + step] for x in xs])
            assert torch.equal(gram.gram(), whole)
        monkeypatch.setattr(_row_gram, "ROW_BLOCK", 3 * cols)
        assert torch.equal(tensor_gram(xs), whole)
    finally:
        torch.set_num_threads(old)


def test_slerp_of_a_chunk_takes_the_answered_gram():
    # the chunk's rows [1, 0] and [0, 1] are orthogonal by themselves, but the answer says
    # the whole tensors are at 60° (|a| = |b| = 1, a·b = 1/2): Ω = 60°, t = 1/2 gives
    # weights sin(30°) / sin(60°) = 1/√3 each
    ctx = MergeContext(
        model_stats={
            TensorGram(of_delta=False): torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        }
    )
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5, ctx=ctx)
    w = 1 / math.sqrt(3)
    torch.testing.assert_close(out, torch.tensor([w, w]))
    # unanswered: the chunk's own Gram (90°)
    torch.testing.assert_close(
        run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5), torch.tensor([R2, R2])
    )


def test_model_stock_of_a_chunk_takes_the_answered_gram():
    # the chunk's task vectors δ1 = [1, 0], δ2 = [1, 1] alone: cos = 1/√2; the answered
    # whole-tensor Gram [[4, 2], [2, 4]] says cos = 2 / (2·2) = 1/2: t = 2c / (1 + c) = 2/3,
    # merged = base + t · mean δ = [1, 2] + 2/3 · [1, 0.5]
    gram = torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    ctx = MergeContext(model_stats={TensorGram(of_delta=True): gram})
    out = run("model_stock", [1.0, 2.0], [[2.0, 2.0], [2.0, 3.0]], ctx=ctx)
    torch.testing.assert_close(out, torch.tensor([1 + 2 / 3, 2 + 1 / 3]))
