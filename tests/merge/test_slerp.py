import math

import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError

R2 = math.sqrt(2) / 2  # sin(45°)
R3 = math.sqrt(3) / 2  # sin(60°)


def test_endpoints():
    a, b = [1.0, 0.0, 2.0], [0.0, 1.0, -1.0]
    torch.testing.assert_close(run("slerp", a, [b], t=0.0), torch.tensor(a))
    torch.testing.assert_close(run("slerp", a, [b], t=1.0), torch.tensor(b))


def test_orthogonal_unit_vectors():
    # Ω = 90°: weights sin((1-t)·90°), sin(t·90°)
    torch.testing.assert_close(
        run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=0.5), torch.tensor([R2, R2])
    )
    torch.testing.assert_close(
        run("slerp", [1.0, 0.0], [[0.0, 1.0]], t=1 / 3), torch.tensor([R3, 0.5])
    )


def test_sixty_degrees_gives_the_midpoint_direction():
    out = run("slerp", [1.0, 0.0], [[0.5, R3]], t=0.5)
    torch.testing.assert_close(out, torch.tensor([R3, 0.5]))  # unit vector at 30°


def test_vectors_not_directions_are_interpolated():
    out = run("slerp", [2.0, 0.0], [[0.0, 3.0]], t=0.5)
    torch.testing.assert_close(out, torch.tensor([2 * R2, 3 * R2]))


def test_whole_tensor_not_per_row():
    # flattened [1,0,0,0] and [0,0,0,1] are orthogonal: both weights sin(45°)
    out = run("slerp", [[1.0, 0.0], [0.0, 0.0]], [[[0.0, 0.0], [0.0, 1.0]]], t=0.5)
    torch.testing.assert_close(out, torch.tensor([[R2, 0.0], [0.0, R2]]))


def test_parallel_and_antiparallel_fall_back_to_linear():
    out = run("slerp", [1.0, 2.0], [[2.0, 4.0]], t=0.25)
    torch.testing.assert_close(out, torch.tensor([1.25, 2.5]))
    out = run("slerp", [1.0, 0.0], [[-1.0, 0.0]], t=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0]))


def test_zero_norm_guard_by_dialect():
    # splice: linear; mergekit: norm 1 -> cos 0 -> weights sin(45°)
    torch.testing.assert_close(
        run("slerp", [0.0, 0.0], [[2.0, 4.0]], t=0.5), torch.tensor([1.0, 2.0])
    )
    out = run("slerp", [0.0, 0.0], [[2.0, 4.0]], t=0.5, ctx=MERGEKIT)
    torch.testing.assert_close(out, torch.tensor([2 * R2, 4 * R2]))


def test_t_is_required_and_bounded():
    with pytest.raises(MergeValidationError, match="needs parameter 't'"):
        run("slerp", [1.0], [[2.0]])
    with pytest.raises(
        MergeValidationError, match=r"'t' = 1.5 is invalid.*less than or equal to 1"
    ):
        run("slerp", [1.0], [[2.0]], t=1.5)
