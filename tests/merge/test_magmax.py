import torch
from merge_test_util import run

BASE = [1.0, 1.0, 1.0, 1.0]
D1 = [3.0, -1.0, 2.0, 0.5]
D2 = [-2.0, 2.0, -2.0, -4.0]


def models(*deltas):
    return [[1.0 + x for x in d] for d in deltas]


def test_largest_magnitude_per_entry_scaled_by_default_half():
    out = run("magmax", BASE, models(D1, D2))
    # picks [3, 2, -2 (|2| == |-2|: the last model wins), -4]; x0.5 -> [1.5, 1, -1, -2]; + 1
    torch.testing.assert_close(out, torch.tensor([2.5, 2.0, 0.0, -1.0]))


def test_lambda_and_single_model():
    out = run("magmax", BASE, models(D1, D2), **{"lambda": 1.0})
    torch.testing.assert_close(out, torch.tensor([4.0, 3.0, -1.0, -3.0]))
    out = run("magmax", BASE, models(D1), **{"lambda": 2.0})
    # one model: base + 2 * D1
    torch.testing.assert_close(out, torch.tensor([7.0, -1.0, 5.0, 2.0]))


def test_tie_order_follows_model_order():
    out = run("magmax", BASE, models(D2, D1), **{"lambda": 1.0})
    # same inputs swapped: entry 2 now takes D1's +2 (the last model)
    torch.testing.assert_close(out, torch.tensor([4.0, 3.0, 3.0, -3.0]))
