"""`ties`/`dare` (dense + refactor), KnOTS and LoRA-LEGO on hand-computed inputs."""

import torch

from splice.delta import LowRank
from splice.lora_merge.kmeans import kmeans
from splice.lora_merge.methods.knots import knots_basis
from splice.merge import get_method
from splice.merge.registry import MergeContext


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _row(b, a, s=1.0):
    return LowRank(_t(b), _t(a), s)


def test_ties_hand_computed():
    # ΔW1 = [[1,-2],[0,0]], ΔW2 = [[3,4],[0,0]] (density 1: sign election + disjoint mean)
    # col 0: signs agree (+), mean (1+3)/2 = 2; col 1: sum -2+4 = 2 > 0, only ΔW2 agrees -> 4
    f1, f2 = _row([[1], [0]], [[1, -2]]), _row([[1], [0]], [[3, 4]])
    out = get_method("lora:ties")(None, [f1, f2])
    torch.testing.assert_close(out.to_dense(), _t([[2, 4], [0, 0]]))
    assert out.rank == 1  # default rank max r_i = 1


def test_ties_trims_by_density():
    # ΔW_i are 2×2 (4 entries); density 0.25 keeps 1 per task: ΔW1 keeps -2, ΔW2 keeps 4;
    # col 0: nothing left -> 0; col 1: -2 + 4 > 0 -> only ΔW2 agrees -> 4
    f1, f2 = _row([[1], [0]], [[1, -2]]), _row([[1], [0]], [[3, 4]])
    out = get_method("lora:ties")(None, [f1, f2], density=0.25, rank=2)
    torch.testing.assert_close(out.to_dense(), _t([[0, 4], [0, 0]]))


def test_dare_matches_registered_method_on_dense_deltas():
    g = torch.Generator().manual_seed(3)
    loras = [LowRank(torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)) for _ in "ab"]
    ctx = MergeContext(tensor_name="m", seed=7)
    got = get_method("lora:dare")(None, loras, ctx, weight=[1.0, 0.5], density=0.5, rank=4)
    want = get_method("dare_linear")(
        torch.zeros(5, 4), [f.to_dense() for f in loras], ctx=ctx, weight=[1.0, 0.5], density=0.5
    )
    assert float(want.abs().sum()) > 0
    torch.testing.assert_close(got.to_dense(), want, atol=1e-5, rtol=1e-5)  # rank 4 = full: exact


def test_knots_basis_reconstructs_each_task():
    g = torch.Generator().manual_seed(4)
    loras = [
        LowRank(torch.randn(12, r, generator=g), torch.randn(r, 9, generator=g), s)
        for r, s in ((3, 2.0), (2, 0.5))
    ]
    basis, coeffs = knots_basis(loras)
    assert basis.shape == (12, 5) and [c.shape for c in coeffs] == [(5, 9), (5, 9)]
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)  # orthonormal
    for f, c in zip(loras, coeffs):
        torch.testing.assert_close(basis @ c, f.to_dense(), atol=1e-5, rtol=1e-5)


def test_knots_same_direction_is_averaged():
    # ΔW1 = [[1,0],[0,0]], ΔW2 = [[3,0],[0,0]]: [ΔW1|ΔW2] has one σ = √10 (σ ≤ 1e-5 dropped),
    # u = ±e1, coefficients C1 = ±[1,0], C2 = ±[3,0]; TIES disjoint mean (1+3)/2 = 2.
    f1, f2 = _row([[1], [0]], [[1, 0]]), _row([[1], [0]], [[3, 0]])
    out = get_method("lora:knots")(None, [f1, f2])
    assert out.rank == 1
    torch.testing.assert_close(out.to_dense(), _t([[2, 0], [0, 0]]))


def test_knots_disjoint_tasks_add_up():
    # ΔW1 = [[2,0],[0,0]], ΔW2 = [[0,0],[0,-1]]: the coefficients never overlap, so the
    # disjoint mean of each entry is its one value and KnOTS returns ΔW1 + ΔW2.
    f1, f2 = _row([[1], [0]], [[2, 0]]), _row([[0], [1]], [[0, -1]])
    out = get_method("lora:knots")(None, [f1, f2])
    torch.testing.assert_close(out.to_dense(), _t([[2, 0], [0, -1]]))
    # and --rank 1 keeps the σ = 2 component
    one = get_method("lora:knots")(None, [f1, f2], rank=1)
    torch.testing.assert_close(one.to_dense(), _t([[2, 0], [0, 0]]))


def test_knots_dare_is_seeded():
    g = torch.Generator().manual_seed(5)
    loras = [LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)) for _ in "ab"]
    m = get_method("lora:knots_dare")
    x = m(None, loras, MergeContext("t", seed=1), density=0.5)
    y = m(None, loras, MergeContext("t", seed=1), density=0.5)
    z = m(None, loras, MergeContext("t", seed=2), density=0.5)
    assert torch.equal(x.to_dense(), y.to_dense()) and not torch.equal(x.to_dense(), z.to_dense())


def test_kmeans_hand_computed():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
    labels, centres = kmeans(x, 2, torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] != labels[2] == labels[3]
    got = sorted(tuple(c.tolist()) for c in centres)
    assert got == [(0.0, 0.5), (10.0, 10.5)]


def test_lego_identical_units_merge_to_one():
    f = _row([[1], [0]], [[1, 0]])
    out = get_method("lora:lego")(None, [f, f])  # k = max r_i = 1, one cluster of two equal MSUs
    torch.testing.assert_close(out.to_dense(), _t([[1, 0], [0, 0]]))


def test_lego_norm_rescaling_hand_computed():
    # MSU1: a=[1,0], b=[1,0]; MSU2: a=[0,1], b=[1,0]; one cluster.
    # mean a = [.5,.5] (norm .707) rescaled to the members' mean norm 1 -> [1/√2, 1/√2];
    # b = [1,0] already has norm 1. ΔW = b aᵀ = [[1/√2, 1/√2],[0,0]] (plain averaging: .5).
    f1, f2 = _row([[1], [0]], [[1, 0]]), _row([[1], [0]], [[0, 1]])
    out = get_method("lora:lego")(None, [f1, f2])
    h = 2**-0.5
    torch.testing.assert_close(out.to_dense(), _t([[h, h], [0, 0]]))


def test_lego_weights_and_scales_split_onto_both_halves():
    # w s = 4 on a single MSU b=[1,0], a=[0,1]: g = 2, b=[2,0], a=[0,2] -> ΔW = 4·b aᵀ.
    f = _row([[1], [0]], [[0, 1]], s=2.0)
    out = get_method("lora:lego")(None, [f], weight=[2.0])
    torch.testing.assert_close(out.to_dense(), _t([[0, 4], [0, 0]]))
    neg = get_method("lora:lego")(None, [f], weight=[-2.0])
    torch.testing.assert_close(neg.to_dense(), _t([[0, -4], [0, 0]]))


def test_lego_two_clusters_deterministic():
    # Two tasks, rank 2 each; units 1/3 and 2/4 are near-duplicates -> 2 clusters of 2.
    f1 = _row([[1, 0], [0, 1]], [[1, 0], [0, 1]])
    f2 = _row([[1, 0], [0, 1.1]], [[1, 0], [0, 0.9]])
    out = get_method("lora:lego")(None, [f1, f2], MergeContext(seed=3), rank=2)
    # cluster 1: b=[1,0], a=[1,0] twice -> e1 e1ᵀ. cluster 2: b≈[0,1.05], a≈[0,.95]:
    # norms rescale to the mean norms 1.05 and .95 (already parallel) -> 0.9975 at (1,1).
    torch.testing.assert_close(out.to_dense(), _t([[1, 0], [0, 1.05 * 0.95]]), atol=1e-6, rtol=0)


def _dare_ties_by_hand(deltas, weights, density, ctx):
    """DARE (Yu et al.: keep each entry with probability `density`, rescale by 1/density;
    masks from the documented per-(seed, module, model) generator) then TIES (Yadav et al.:
    elected sign = sign of the weighted sum, >= 0 counts as +; disjoint weighted mean of the
    agreeing entries, a zero divisor counting as 1), written entry by entry."""
    from splice.merge.methods.dare import dare_mask

    kept = []
    for i, d in enumerate(deltas):
        mask = dare_mask(d.shape, density, ctx.generator(i))
        kept.append(
            [
                [float(d[r, c]) / density if mask[r, c] else 0.0 for c in range(d.shape[1])]
                for r in range(d.shape[0])
            ]
        )
    rows, cols = deltas[0].shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            values = [w * k[r][c] for k, w in zip(kept, weights)]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agree = [(v, w) for v, w in zip(values, weights) if v != 0 and (v > 0) == (sign > 0)]
            den = sum(w for _, w in agree) or 1.0
            out[r, c] = sum(v for v, _ in agree) / den
    masks = [dare_mask(d.shape, density, ctx.generator(i)) for i, d in enumerate(deltas)]
    return out, masks


def test_dare_ties_golden():
    # ΔW_1 = A_1, ΔW_2 = A_2 (B = I); density 0.5, weights 1 and 0.5; full rank 2: exact SVD
    a1, a2 = _t([[1, -2], [3, 0.5]]), _t([[-1, 4], [2, -3]])
    loras = [LowRank(torch.eye(2), a1), LowRank(torch.eye(2), a2)]
    ctx = MergeContext(tensor_name="layers.0.q_proj", seed=11)
    want, masks = _dare_ties_by_hand([a1, a2], [1.0, 0.5], 0.5, ctx)
    assert all(0 < int(m.sum()) < m.numel() for m in masks)  # the masks drop and keep
    got = get_method("lora:dare_ties")(None, loras, ctx, weight=[1.0, 0.5], density=0.5, rank=2)
    torch.testing.assert_close(got.to_dense().double(), want, atol=1e-5, rtol=1e-5)


def test_knots_dare_golden():
    # KnOTS-DARE: ΔW = U · DARE-TIES(C_1, C_2) with [ΔW_1 | ΔW_2] = U [C_1 | C_2]
    g = torch.Generator().manual_seed(4)
    loras = [LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g)) for _ in "ab"]
    ctx = MergeContext(tensor_name="layers.1.v_proj", seed=3)
    basis, coeffs = knots_basis(loras)
    merged, masks = _dare_ties_by_hand(coeffs, [1.0, 1.0], 0.5, ctx)
    assert all(0 < int(m.sum()) < m.numel() for m in masks)
    got = get_method("lora:knots_dare")(None, loras, ctx, weight=[1.0, 1.0], density=0.5)
    torch.testing.assert_close(
        got.to_dense().double(), basis.double() @ merged, atol=1e-5, rtol=1e-5
    )
