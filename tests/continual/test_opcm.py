"""OPCM's per-tensor update on hand-computed matrices."""

import pytest
import torch

from splice.merge.continual import OpcmState, opcm_projected_update, opcm_split_rank, projects


def test_split_rank_is_the_first_strict_exceedance():
    s = torch.tensor([5.0, 3.0, 2.0])  # cumulative shares 0.5, 0.8, 1.0
    assert opcm_split_rank(s, 0.5) == 1  # 0.5 is not > 0.5
    assert opcm_split_rank(s, 0.4) == 0
    assert opcm_split_rank(s, 0.85) == 2
    assert opcm_split_rank(s, 1.0) == 0  # never exceeded: argmax of all-false
    assert opcm_split_rank(torch.zeros(3), 0.5) == 0


def test_diagonal_of_the_previous_singular_pairs_is_removed():
    # τ̄ = diag(3, 1): U = V = I; shares (0.75, 1) -> k = 0 for α = 0.5. Uᵀ τ V = τ with its
    # diagonal zeroed: [[0, 2], [3, 0]]. u = 2·τ̄ + that = [[6, 2], [3, 2]].
    prev = torch.diag(torch.tensor([3.0, 1.0]))
    tau = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    u = opcm_projected_update(prev, tau, alpha=0.5, prev_lambda=2.0, project=True)
    torch.testing.assert_close(u, torch.tensor([[6.0, 2.0], [3.0, 2.0]]))
    assert tau.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # inputs untouched


def test_leading_block_is_removed():
    # τ̄ = diag(5, 3, 2), α = 0.85 -> k = 2: the diagonal and the [:2, :2] block of τ go.
    prev = torch.diag(torch.tensor([5.0, 3.0, 2.0]))
    tau = torch.arange(1.0, 10.0).reshape(3, 3)
    u = opcm_projected_update(prev, tau, alpha=0.85, prev_lambda=1.0, project=True)
    expected = torch.tensor([[5.0, 0.0, 3.0], [0.0, 3.0, 6.0], [7.0, 8.0, 2.0]])
    torch.testing.assert_close(u, expected)


def test_rectangular_uses_full_matrices():
    # τ̄ = [[2, 0, 0], [0, 1, 0]]: U = I₂, V = I₃; only (0, 0) and (1, 1) are diagonal.
    prev = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tau = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    u = opcm_projected_update(prev, tau, alpha=0.5, prev_lambda=1.0, project=True)
    torch.testing.assert_close(u, torch.tensor([[2.0, 2.0, 3.0], [4.0, 1.0, 6.0]]))


def test_unprojected_tensors_are_added():
    u = opcm_projected_update(
        torch.tensor([1.0, 2.0]),
        torch.tensor([3.0, 5.0]),
        alpha=0.5,
        prev_lambda=2.0,
        project=False,
    )
    torch.testing.assert_close(u, torch.tensor([5.0, 9.0]))


def test_which_tensors_are_projected():
    assert projects("model.layers.0.mlp.up_proj.weight", (4, 3))
    assert projects("lm_head.weight", (16, 8))
    assert not projects("model.embed_tokens.weight", (16, 8))
    assert not projects("transformer.wte.weight", (16, 8))
    assert not projects("model.layers.0.input_layernorm.weight", (8,))


def test_lambda_bookkeeping():
    # norms so far (2, 4), new 6: mean 4; ‖u‖ = 10 -> λ = 10/4
    s = OpcmState(task_vector_norms=[2.0, 4.0])
    assert s.next_lambda(6.0, 10.0) == (pytest.approx(2.5), pytest.approx(4.0))
    assert OpcmState.from_json(s.to_json()) == s


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
def test_thin_svd_equals_the_reference_full_svd_projection(shape, alpha):
    g = torch.Generator().manual_seed(5)
    prev = torch.randn(shape, generator=g, dtype=torch.float64)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(prev, full_matrices=True)  # the reference's way
    k = int(((s.cumsum(0) / s.sum()) > alpha).float().argmax())
    p = u.T @ tau @ vh.T
    p.diagonal().fill_(0)
    p[:k, :k] = 0
    expected = 1.5 * prev + u @ p @ vh
    got = opcm_projected_update(prev, tau, alpha=alpha, prev_lambda=1.5, project=True)
    torch.testing.assert_close(got, expected)
