import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError

# Task vectors of a 2x5 weight (base is 1 everywhere).
A = [[0.1, -5.0, 2.0, -3.0, 0.4], [1.0, 2.0, -3.0, 4.0, -5.0]]
B = [[0.0, 0.0, -1.0, -2.0, 0.0], [0.5, 1.0, 1.0, 2.0, 3.0]]
BASE = torch.ones(2, 5)


def model(delta):
    return BASE + torch.tensor(delta)


# scope row, density 0.4, gamma 0.2, 5 per row: keep 2, skip the 1 largest
#   A row 0: |.| desc 5(i1) 3(i3) 2(i2) .4 .1 -> [0, 0, 2, -3, 0]
#   A row 1: 5(i4) 4(i3) 3(i2) 2 1           -> [0, 0, -3, 4, 0]
#   B row 0: 2(i3) 1(i2) 0 0 0               -> [0, 0, -1, 0, 0] (+ a zero)
#   B row 1: 3(i4) 2(i3) 1(i1) 1(i2) .5      -> [0, 1, 0, 2, 0] (first of the tied 1s)
A_ROW = torch.tensor([[0.0, 0.0, 2.0, -3.0, 0.0], [0.0, 0.0, -3.0, 4.0, 0.0]])
KW = dict(density=0.4, gamma=0.2)


def test_row_scope_band():
    out = run("breadcrumbs", BASE, [model(A)], **KW)
    torch.testing.assert_close(out, BASE + A_ROW)


def test_tensor_scope_band():
    # density 0.3, gamma 0.1 over all 10 entries: keep 3 after skipping 1. The two |5|
    # tie for the skipped place: the first in flat order, (0,1), is skipped; then
    # -5 at (1,4), 4 at (1,3) and the first |3|, (0,3).
    out = run("breadcrumbs", BASE, [model(A)], scope="tensor", density=0.3, gamma=0.1)
    expected = torch.tensor([[0.0, 0.0, 0.0, -3.0, 0.0], [0.0, 0.0, 0.0, 4.0, -5.0]])
    torch.testing.assert_close(out, BASE + expected)
    # per row, the same parameters keep round(1.5) = 2 and skip round(0.5) = 0
    out = run("breadcrumbs", BASE, [model(A)], density=0.3, gamma=0.1)
    expected = torch.tensor([[0.0, -5.0, 0.0, -3.0, 0.0], [0.0, 0.0, 0.0, 4.0, -5.0]])
    torch.testing.assert_close(out, BASE + expected)


def test_mergekit_dialect_counts_and_scope():
    # density 0.38, gamma 0.2 over the whole tensor (mergekit default scope):
    # mergekit keeps int(3.8) = 3 after skipping int(2.0) = 2 -> 4, 3, 3
    out = run("breadcrumbs", BASE, [model(A)], ctx=MERGEKIT, density=0.38, gamma=0.2)
    expected = torch.zeros(2, 5)
    expected[0, 3], expected[1, 3], expected[1, 2] = -3.0, 4.0, -3.0
    torch.testing.assert_close(out, BASE + expected)
    # splice keeps round(3.8) = 4: also the first |2|
    out = run("breadcrumbs", BASE, [model(A)], scope="tensor", density=0.38, gamma=0.2)
    expected[0, 2] = 2.0
    torch.testing.assert_close(out, BASE + expected)


def test_mergekit_default_density_changes_nothing():
    out = run("breadcrumbs", BASE, [model(A)], ctx=MERGEKIT)
    torch.testing.assert_close(out, model(A))


def test_gamma_shrinks_to_keep_density():
    # density 0.8 of 5 = 4 kept, gamma 0.4 wants 2 skipped: only 1 can be
    out = run("breadcrumbs", BASE, [model(A)], density=0.8, gamma=0.4)
    expected = torch.tensor([[0.1, 0.0, 2.0, -3.0, 0.4], [1.0, 2.0, -3.0, 4.0, 0.0]])
    torch.testing.assert_close(out, BASE + expected)


def test_breadcrumbs_sum_of_two():
    out = run("breadcrumbs", BASE, [model(A), model(B)], weight=[1.0, 2.0], **KW, **{"lambda": 0.5})
    # (A_ROW + 2 * [[0,0,-1,0,0],[0,1,0,2,0]]) * 0.5
    expected = torch.tensor([[0.0, 0.0, 0.0, -1.5, 0.0], [0.0, 1.0, -1.5, 4.0, 0.0]])
    torch.testing.assert_close(out, BASE + expected)


def test_breadcrumbs_ties():
    out = run("breadcrumbs_ties", BASE, [model(A), model(B)], **KW)
    # sum [[0,0,1,-3,0],[0,1,-3,6,0]] -> elected [[+,+,+,-,+],[+,+,-,+,+]]
    # agreeing means: row0 [0,0,2,-3,0]; row1 [0,1,-3,(4+2)/2,0]
    expected = torch.tensor([[0.0, 0.0, 2.0, -3.0, 0.0], [0.0, 1.0, -3.0, 3.0, 0.0]])
    torch.testing.assert_close(out, BASE + expected)
    out = run("breadcrumbs_ties", BASE, [model(A), model(B)], normalize=False, **KW)
    expected[1, 3] = 6.0
    torch.testing.assert_close(out, BASE + expected)


def test_density_required_in_splice_dialect():
    with pytest.raises(MergeValidationError, match="needs parameter 'density'"):
        run("breadcrumbs", BASE, [model(A)])
