"""PLeaS' partial matching on a hand-computed case, and its input checks (the limits f = 0,
f = 1 and the barrier are in test_align_barrier.py, on trained models)."""

import pytest
import torch

from splice.merge.align import AlignmentError, pleas_merge

A = {"fc0.weight": torch.tensor([[1.0, 0], [0, 1]]), "fc1.weight": torch.tensor([[1.0, 2]])}
B = {"fc0.weight": torch.tensor([[2.0, 0], [0, 4]]), "fc1.weight": torch.tensor([[3.0, 5]])}
X = torch.tensor([[1.0, 2], [3, -1], [0.5, 0.5]])


def test_partial_matching_blocks_by_hand():
    # matching: C = [[2 + 3, 0 + 5], [0 + 6, 4 + 10]]: identity (19) beats the swap (11);
    # pair scores 5 and 14, so at f = 0.5 unit 1 is merged and unit 0 kept from both models.
    out = pleas_merge(A, B, X, merge_fraction=0.5, least_squares=False)
    # hidden rows [merged 1, A's 0, B's 0]: (A[1] + B[1]) / 2, A[0], B[0]
    assert out["fc0.weight"].tolist() == [[0.0, 2.5], [1.0, 0.0], [2.0, 0.0]]
    # logits read: merged (2 + 5) / 2, A's unit with half A's weight, B's with half B's
    assert out["fc1.weight"].tolist() == [[3.5, 0.5, 1.5]]


def test_least_squares_solves_the_normal_equations_on_the_original_activations():
    # f = 1, ridge 0: each layer is the least-squares fit of the averaged outputs of A and B
    # from the averaged inputs of A and B (the original models' activations, not the merged
    # model's). B2 keeps the identity matching (C = [[5, 4], [7, 14]]: 19 against 11).
    # Layer 0: the target X (A0 + B0)ᵀ / 2 is linear in X, so the fit is (A0 + B0)/2.
    b2 = {"fc0.weight": torch.tensor([[2.0, 1], [-1, 4]]), "fc1.weight": B["fc1.weight"]}
    out = pleas_merge(A, b2, X, merge_fraction=1.0, ridge=0.0)
    torch.testing.assert_close(out["fc0.weight"], torch.tensor([[1.5, 0.5], [-0.5, 2.5]]))
    # layer 1: Zᵀ (Z W1ᵀ − T) = 0 with Z = (h_A + h_B)/2, T = (h_A A1ᵀ + h_B B1ᵀ)/2
    h_a, h_b = torch.relu(X @ A["fc0.weight"].T), torch.relu(X @ b2["fc0.weight"].T)
    z = (h_a + h_b) / 2
    t = (h_a @ A["fc1.weight"].T + h_b @ b2["fc1.weight"].T) / 2
    residual = z @ out["fc1.weight"].T - t
    assert residual.abs().max() > 0.01  # not an exact fit: the equations do the work
    torch.testing.assert_close(z.T @ residual, torch.zeros(2, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"merge_fraction": 1.5}, "merge_fraction must be in [0, 1]"),
        ({"ridge": -1.0}, "ridge must be >= 0"),
        ({"inputs": torch.ones(3, 5)}, "are not a batch of 2-feature rows"),
        ({"inputs": torch.tensor([[float("nan"), 0.0]])}, "must be finite"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"inputs": X, **kwargs}
    with pytest.raises(AlignmentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pleas_merge(A, B, **kwargs)
