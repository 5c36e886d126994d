"""TSV-Merge on hand-computed matrices, and against a literal transcription of the
reference code's zero-padded block layout on random inputs."""

import math

import torch
from merge_test_util import run

from splice.merge.methods.tsv import tsv_merge_matrix

ONES = [[1.0, 1.0], [1.0, 1.0]]


def test_orthogonal_tasks_keep_their_top_component_scaled_by_lambda():
    # δ1 = diag(3, 1): top (k = ⌊2/2⌋ = 1) triplet 3·e1e1ᵀ; δ2 = diag(0, 2): 2·e2e2ᵀ.
    # U = [e1 e2] is already orthonormal, so merged Δ = diag(3, 2); the 1 of δ1 is dropped.
    # base + 0.5·Δ = [[1+1.5, 1], [1, 1+1]]
    t1 = [[4.0, 1.0], [1.0, 2.0]]
    t2 = [[1.0, 1.0], [1.0, 3.0]]
    out = run("tsv", ONES, [t1, t2], **{"lambda": 0.5})
    torch.testing.assert_close(out, torch.tensor([[2.5, 1.0], [1.0, 2.0]]))


def test_overlapping_singular_vectors_are_orthogonalized_symmetrically():
    # δ1 = 3·e1e1ᵀ, δ2 = 4·uuᵀ with u = (e1 + e2)/√2 (45° apart). The polar factor of [e1 u]
    # rotates both columns 22.5° apart from their bisector (22.5°): a = (cos 22.5°, −sin 22.5°),
    # b = (sin 22.5°, cos 22.5°); the same for V. Δ = 3·aaᵀ + 4·bbᵀ with
    # cos² 22.5° = (1 + s)/2, sin² = (1 − s)/2, cos·sin = s/2, s = 1/√2:
    # Δ00 = 3(1+s)/2 + 4(1−s)/2 = 3.5 − s/2;  Δ11 = 3.5 + s/2;  Δ01 = (−3 + 4)·s/2 = s/2.
    s = 1 / math.sqrt(2)
    zero = [[0.0, 0.0], [0.0, 0.0]]
    d1 = [[3.0, 0.0], [0.0, 0.0]]
    d2 = [[2.0, 2.0], [2.0, 2.0]]  # 4·uuᵀ
    out = run("tsv", zero, [d1, d2])
    expected = torch.tensor([[3.5 - s / 2, s / 2], [s / 2, 3.5 + s / 2]])
    torch.testing.assert_close(out, expected)


def test_sv_reduction_sets_the_rank_kept_per_task():
    # r = 4, T = 2: default k = 2 keeps diag(4, 3) and diag(2, 1) -> diag(4, 3, 2, 1).
    # sv_reduction 0.25: k = 1 keeps 4 and 2 only.
    z = torch.zeros(4, 4)
    d1 = torch.diag(torch.tensor([4.0, 3.0, 0.0, 0.0]))
    d2 = torch.diag(torch.tensor([0.0, 0.0, 2.0, 1.0]))
    torch.testing.assert_close(run("tsv", z, [d1, d2]), torch.diag(torch.tensor([4.0, 3, 2, 1])))
    torch.testing.assert_close(
        run("tsv", z, [d1, d2], sv_reduction=0.25), torch.diag(torch.tensor([4.0, 0, 2, 0]))
    )


def test_vectors_are_averaged():
    # 1-D: base + λ · mean(δ) = [1, 1] + 2·mean([1, −1], [0, 4]) = [1, 1] + 2·[0.5, 1.5]
    out = run("tsv", [1.0, 1.0], [[2.0, 0.0], [1.0, 5.0]], **{"lambda": 2.0})
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))


def reference_layout(deltas):
    """The reference code's steps: k = int(r / T) triplets of task i placed in columns
    [i·k, (i+1)·k) of zero r-column matrices, then U_u V_u diag(S) U_v V_v."""
    r = min(deltas[0].shape)
    k = int(r / len(deltas))
    f64 = torch.float64
    su = torch.zeros(deltas[0].shape[0], r, dtype=f64)
    ss = torch.zeros(r, dtype=f64)
    sv = torch.zeros(r, deltas[0].shape[1], dtype=f64)
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        su[:, i * k : (i + 1) * k] = u[:, :k]
        ss[i * k : (i + 1) * k] = s[:k]
        sv[i * k : (i + 1) * k] = vh[:k]
    uu, _, vu = torch.linalg.svd(su, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv))


def test_matches_the_reference_layout_on_random_matrices():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(9, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(tsv_merge_matrix(deltas), reference_layout(deltas))
