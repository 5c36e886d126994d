"""Iso-CTS on hand-computed matrices, and against the reference code's steps."""

import torch
from merge_test_util import run

from splice.merge.methods.iso_cts import iso_cts_matrix, split_dims


def test_split_dims():
    # ViT-B (r = 768), 8 tasks, 0.8: c0 = ⌊614.4⌋ = 614, round(154/8) = 19, c = 768 − 152 = 616
    assert split_dims(768, 8, 0.8) == (616, 19)
    # r = 4, T = 2, 0.5: c0 = 2, round(2/2) = 1, c = 2
    assert split_dims(4, 2, 0.5) == (2, 1)
    # r = 5, T = 3, 0.0: round(5/3) = 2 would need 6 > 5 dims; ⌊5/3⌋ = 1 -> c = 2
    assert split_dims(5, 3, 0.0) == (2, 1)


def test_common_plus_task_specific_directions():
    # δ1 = diag(6, 0, −2, 0), δ2 = diag(0, 5, −1, 3); Σδ = diag(6, 5, −3, 3).
    # r = 4, T = 2, fraction 0.5: c = 2 common dims (e1, e2 with σ 6, 5), 1 per task.
    # δ1 minus its common part = diag(0, 0, −2, 0): top triplet 2·(e3)(−e3)ᵀ;
    # δ2 minus its common part = diag(0, 0, −1, 3): top 3·e4e4ᵀ.
    # S = {2, 3, 6, 5}, mean 4; U, V already orthonormal -> Δ = 4·diag(1, 1, −1, 1).
    # (Iso-C would give mean(6, 5, 3, 3) = 4.25 on the same directions.)
    z = torch.zeros(4, 4)
    d1 = torch.diag(torch.tensor([6.0, 0, -2, 0]))
    d2 = torch.diag(torch.tensor([0.0, 5, -1, 3]))
    out = run("iso_cts", z, [d1, d2], common_space_fraction=0.5)
    torch.testing.assert_close(out, torch.diag(torch.tensor([4.0, 4, -4, 4])))
    iso_c = run("iso_c", z, [d1, d2])
    torch.testing.assert_close(iso_c, torch.diag(torch.tensor([4.25, 4.25, -4.25, 4.25])))


def test_lambda_and_vectors():
    out = run("iso_cts", [1.0, 1.0], [[3.0, 1.0], [1.0, 5.0]], **{"lambda": 0.5})
    # mean δ = [1, 2]; 1 + 0.5·[1, 2]
    torch.testing.assert_close(out, torch.tensor([1.5, 2.0]))


def reference_steps(deltas, fraction):
    """The reference code's layout: task blocks first, common block last, zero-initialised
    r-column matrices, U_u V_u and U_v V_v as orthogonal factors."""
    r = min(deltas[0].shape)
    t = len(deltas)
    c = int(r * fraction)
    c = r - round((r - c) / t) * t
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c]
    n = (r - c) // t
    cu = torch.zeros(deltas[0].shape[0], r)
    cs = torch.zeros(r)
    cv = torch.zeros(r, deltas[0].shape[1])
    for i, d in enumerate(deltas):
        ut, st, vt = torch.linalg.svd(d - uc @ uc.T @ d, full_matrices=False)
        cu[:, i * n : (i + 1) * n] = ut[:, :n]
        cs[i * n : (i + 1) * n] = st[:n]
        cv[i * n : (i + 1) * n] = vt[:n]
    cu[:, t * n : t * n + c] = uc
    cs[t * n : t * n + c] = sc
    cv[t * n : t * n + c] = vc
    a, _, b = torch.linalg.svd(cu, full_matrices=False)
    p, _, q = torch.linalg.svd(cv, full_matrices=False)
    return (a @ b) @ torch.diag(torch.ones_like(cs) * cs.mean()) @ (p @ q)


def test_matches_the_reference_steps_on_random_matrices():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(10, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = reference_steps([d.float() for d in deltas], 0.8)
    torch.testing.assert_close(iso_cts_matrix([d.float() for d in deltas], 0.8), ref)
