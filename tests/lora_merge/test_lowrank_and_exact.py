"""Rank reduction in factor form, `concat` and `svd`: hand-computed values and golden SVDs."""

import pytest
import torch

import splice.lora_merge  # noqa: F401  (registers the low-rank methods)
from splice.delta import LowRank, truncate_factors
from splice.delta.low_rank import factor_svd
from splice.errors import MergeValidationError
from splice.merge import get_method


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_factor_svd_hand_computed():
    # B @ A = [[2,0,0],[0,1,0],[0,0,0]]: singular values 2 and 1.
    b = _t([[2, 0], [0, 1], [0, 0]])
    a = _t([[1, 0, 0], [0, 1, 0]])
    _, s, _ = factor_svd(b, a)
    torch.testing.assert_close(s, _t([2, 1]))
    b1, a1 = truncate_factors(b, a, 1)
    # Rank 1 keeps the σ=2 component only: 2·e1·e1ᵀ.
    torch.testing.assert_close(b1 @ a1, _t([[2, 0, 0], [0, 0, 0], [0, 0, 0]]))


def test_truncate_factors_equals_dense_truncated_svd():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    u, s, vh = torch.linalg.svd((b @ a).double())
    want = (u[:, :3] * s[:3]) @ vh[:3]
    b3, a3 = truncate_factors(b, a, 3)
    assert b3.shape == (40, 3) and a3.shape == (3, 30)
    torch.testing.assert_close((b3 @ a3).double(), want, atol=1e-5, rtol=1e-5)


def test_concat_hand_computed():
    # w1 s1 B1 A1 = 2 · 0.5 · [[1],[2]] @ [[3,4]] = [[3,4],[6,8]]
    # w2 s2 B2 A2 = -1 · 1 · [[1],[0]] @ [[0,1]] = [[0,-1],[0,0]]
    f1 = LowRank(_t([[1], [2]]), _t([[3, 4]]), 0.5)
    f2 = LowRank(_t([[1], [0]]), _t([[0, 1]]), 1.0)
    out = get_method("lora:concat")(None, [f1, f2], weight=[2.0, -1.0])
    assert out.rank == 2 and out.scaling == 1.0
    torch.testing.assert_close(out.b, _t([[1, -1], [2, 0]]))  # [w1 s1 B1 | w2 s2 B2]
    torch.testing.assert_close(out.a, _t([[3, 4], [0, 1]]))  # [A1; A2]
    torch.testing.assert_close(out.to_dense(), _t([[3, 3], [6, 8]]))


def test_svd_hand_computed_keeps_the_larger_component():
    # ΔW1 = 3·e1 e1ᵀ, ΔW2 = 1·e2 e2ᵀ; their sum has σ = 3, 1; rank 1 keeps 3·e1 e1ᵀ.
    f1 = LowRank(_t([[3], [0]]), _t([[1, 0]]))
    f2 = LowRank(_t([[0], [1]]), _t([[0, 1]]))
    out = get_method("lora:svd")(None, [f1, f2], rank=1)
    torch.testing.assert_close(out.to_dense(), _t([[3, 0], [0, 0]]))


def test_svd_golden_against_dense_sum():
    g = torch.Generator().manual_seed(1)
    loras = [
        LowRank(torch.randn(24, r, generator=g), torch.randn(r, 16, generator=g), s)
        for r, s in ((4, 2.0), (2, 0.5), (3, 1.0))
    ]
    weights = [0.7, -0.3, 1.2]
    dense = sum(w * f.to_dense().double() for f, w in zip(loras, weights))
    u, s, vh = torch.linalg.svd(dense)
    for rank in (1, 4, 9):
        out = get_method("lora:svd")(None, loras, weight=weights, rank=rank)
        want = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(out.to_dense().double(), want, atol=1e-4, rtol=1e-4)
    # default rank = max r_i = 4
    assert get_method("lora:svd")(None, loras, weight=weights).rank == 4


def test_parameter_errors():
    """The registry's signature-as-schema checks, as for the dense methods."""
    f = LowRank(_t([[1]]), _t([[1]]))
    with pytest.raises(MergeValidationError, match=r"'concat' has no parameter\(s\) \['rank'\]"):
        get_method("lora:concat")(None, [f], rank=2)
    with pytest.raises(MergeValidationError, match=r"no parameter\(s\) \['density'\]"):
        get_method("lora:svd")(None, [f], density=0.5)
    with pytest.raises(MergeValidationError, match="needs parameter 'density'"):
        get_method("lora:dare")(None, [f, f])
    with pytest.raises(MergeValidationError, match="1 values of 'weight' for 2 models"):
        get_method("lora:concat")(None, [f, f], weight=[1.0])
    with pytest.raises(MergeValidationError, match=r"unknown low-rank .* 'nope'"):
        get_method("lora:nope")
    with pytest.raises(MergeValidationError, match="greater than or equal to 1"):
        get_method("lora:svd")(None, [f], rank=0)
    with pytest.raises(MergeValidationError, match="less than or equal to 1"):
        get_method("lora:ties")(None, [f], density=1.5)


def test_low_rank_and_dense_methods_share_names_not_entries():
    """`ties` names two methods: dense (tensors) and low-rank (factors), told apart by
    representation; `lora:NAME` is the low-rank one."""
    dense, low = get_method("ties"), get_method("lora:ties")
    assert (dense.representation, low.representation) == ("dense", "low_rank")
    assert low is get_method("ties", "low_rank") and low.label == "lora:ties"
    assert "rank" in [p.name for p in low.params] and "rank" not in [p.name for p in dense.params]
