import math

import torch
from merge_test_util import run

SQ2 = math.sqrt(2)


def test_two_models():
    # δ1 = [1,0], δ2 = [1,1]: cos = 1/√2, t = 2c/(1+c) = 2(√2-1); mean δ = [1, .5]
    t = 2 * (SQ2 - 1)
    out = run("model_stock", [1.0, 2.0], [[2.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(out, torch.tensor([1 + t, 2 + 0.5 * t]))


def test_three_models():
    # δ = [1,0,0], [0,1,0], [1,1,0]: cos = (0 + 1/√2 + 1/√2)/3 = √2/3
    # t = 3c/(1+2c) = 9√2 - 12; mean δ = [2/3, 2/3, 0]
    base = [0.5, -1.0, 2.0]
    tensors = [[1.5, -1.0, 2.0], [0.5, 0.0, 2.0], [1.5, 0.0, 2.0]]
    step = (9 * SQ2 - 12) * 2 / 3
    out = run("model_stock", base, tensors)
    torch.testing.assert_close(out, torch.tensor([0.5 + step, -1.0 + step, 2.0]))


# Row 0: δ1 = [1,0], δ2 = [1,1] -> t = 2(√2-1); row 1: δ1 = [1,0], δ2 = [-1,0] -> cos = -1,
# 1 + (N-1)cos = 0: singular, the base row is kept. As one tensor: δ1·δ2 = 0 -> t = 0.
BASE = [[1.0, 1.0], [1.0, 1.0]]
MODELS = [[[2.0, 1.0], [2.0, 1.0]], [[2.0, 2.0], [0.0, 1.0]]]


def test_row_scope_and_singularity():
    t = 2 * (SQ2 - 1)
    expected = torch.tensor([[1 + t, 1 + 0.5 * t], [1.0, 1.0]])
    torch.testing.assert_close(run("model_stock", BASE, MODELS, scope="row"), expected)
    torch.testing.assert_close(run("model_stock", BASE, MODELS, filter_wise=True), expected)


def test_tensor_scope():
    expected = torch.tensor(BASE)
    torch.testing.assert_close(run("model_stock", BASE, MODELS), expected)
    # filter_wise, when given, decides over scope
    torch.testing.assert_close(
        run("model_stock", BASE, MODELS, scope="row", filter_wise=False), expected
    )


def test_zero_task_vector_gives_base():
    out = run("model_stock", [1.0, 2.0], [[1.0, 2.0], [3.0, 5.0]])
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]))
