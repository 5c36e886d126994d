"""Rank reduction in factor form, `concat` and `svd`: hand-computed values and golden SVDs."""

import pytest
import torch

from splice.delta import LowRank, truncate_factors
from splice.delta.low_rank import factor_svd
from splice.errors import MergeValidationError
from splice.lora_merge import LoraMergeOptions, get_lora_method


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
    out = get_lora_method("concat")([f1, f2], [2.0, -1.0])
    assert out.rank == 2 and out.scaling == 1.0
    torch.testing.assert_close(out.b, _t([[1, -1], [2, 0]]))  # [w1 s1 B1 | w2 s2 B2]
    torch.testing.assert_close(out.a, _t([[3, 4], [0, 1]]))  # [A1; A2]
    torch.testing.assert_close(out.to_dense(), _t([[3, 3], [6, 8]]))


def test_svd_hand_computed_keeps_the_larger_component():
    # ΔW1 = 3·e1 e1ᵀ, ΔW2 = 1·e2 e2ᵀ; their sum has σ = 3, 1; rank 1 keeps 3·e1 e1ᵀ.
    f1 = LowRank(_t([[3], [0]]), _t([[1, 0]]))
    f2 = LowRank(_t([[0], [1]]), _t([[0, 1]]))
    out = get_lora_method("svd")([f1, f2], opts=LoraMergeOptions(rank=1))
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
        out = get_lora_method("svd")(loras, weights, LoraMergeOptions(rank=rank))
        want = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(out.to_dense().double(), want, atol=1e-4, rtol=1e-4)
    # default rank = max r_i = 4
    assert get_lora_method("svd")(loras, weights).rank == 4


def test_option_errors():
    f = LowRank(_t([[1]]), _t([[1]]))
    with pytest.raises(MergeValidationError, match="takes no rank"):
        get_lora_method("concat")([f], opts=LoraMergeOptions(rank=2))
    with pytest.raises(MergeValidationError, match="takes no density"):
        get_lora_method("svd")([f], opts=LoraMergeOptions(density=0.5))
    with pytest.raises(MergeValidationError, match="needs a density"):
        get_lora_method("dare")([f, f])
    with pytest.raises(MergeValidationError, match="one weight per adapter"):
        get_lora_method("concat")([f, f], [1.0])
    with pytest.raises(MergeValidationError, match="unknown LoRA merge method"):
        get_lora_method("nope")
    with pytest.raises(MergeValidationError, match="must be at least 1"):
        get_lora_method("svd")([f], opts=LoraMergeOptions(rank=0))
