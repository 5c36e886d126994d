"""Iso-C on hand-computed matrices."""

import torch
from merge_test_util import run


def test_spectrum_of_the_sum_is_flattened_to_its_mean():
    # Σδ = diag(3, 1): σ = (3, 1), mean 2 -> diag(2, 2); base + 0.5·diag(2, 2)
    base = [[1.0, 0.0], [0.0, 1.0]]
    t1 = [[4.0, 0.0], [0.0, 1.0]]  # δ1 = diag(3, 0)
    t2 = [[1.0, 0.0], [0.0, 2.0]]  # δ2 = diag(0, 1)
    out = run("iso_c", base, [t1, t2], **{"lambda": 0.5})
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0], [0.0, 2.0]]))


def test_off_diagonal_sum():
    # Σδ = [[0, 4], [2, 0]] = P·diag(4, 2)·Qᵀ with P Qᵀ = [[0, 1], [1, 0]]; mean σ = 3
    z = [[0.0, 0.0], [0.0, 0.0]]
    out = run("iso_c", z, [[[0.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]]])
    torch.testing.assert_close(out, torch.tensor([[0.0, 3.0], [3.0, 0.0]]))


def test_vectors_are_averaged():
    out = run("iso_c", [0.0, 0.0], [[2.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]))
