"""Metrics-weighted averaging on hand-computed weights."""

import pytest
import torch
from merge_test_util import run

from splice.errors import MergeValidationError
from splice.merge.methods.metrics_weighted import mwa_weights

A = [3.0, 0.0]
B = [0.0, 3.0]


def test_loss_weights():
    # losses (1, 2), p = 1: scores (1/1, 1/2) -> w = (2/3, 1/3); 2/3·A + 1/3·B = (2, 1)
    out = run("metrics_weighted", None, [A, B], metric=[1.0, 2.0])
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]))


def test_step_weights_with_penalty():
    # steps (100, 300), p = 2: scores (100², 300²) ∝ (1, 9) -> w = (0.1, 0.9)
    out = run("metrics_weighted", None, [A, B], metric=[100.0, 300.0], by="step", penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([0.3, 2.7]))


def test_penalty_zero_is_uniform_and_scale_free():
    assert mwa_weights([0.5, 4.0, 1.0], "loss", 0.0) == pytest.approx([1 / 3] * 3)
    # only ratios matter: losses (1, 2) and (10, 20) give the same weights
    assert mwa_weights([10.0, 20.0], "loss", 3.0) == pytest.approx(mwa_weights([1, 2], "loss", 3))
    # p = 3: (1, 1/8) -> (8/9, 1/9)
    assert mwa_weights([1.0, 2.0], "loss", 3.0) == pytest.approx([8 / 9, 1 / 9])
    # large steps with a large penalty do not overflow
    assert mwa_weights([1e6, 2e6], "step", 400.0)[1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"metric": [1.0, 0.0]}, "'metric' = .* is invalid"),
        ({"metric": [1.0, 2.0], "by": "accuracy"}, "'by' = 'accuracy' is invalid"),
        ({"metric": [1.0, 2.0], "penalty": -1.0}, "'penalty' = -1.0 is invalid"),
        ({}, "needs parameter 'metric'"),
    ],
)
def test_rejected(params, message):
    with pytest.raises(MergeValidationError, match=message):
        run("metrics_weighted", None, [A, B], **params)
