import pytest
import torch
from merge_test_util import run

from splice.errors import MergeValidationError


def test_weighted_mean():
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, 3.0])
    # (1*[1,2] + 3*[3,6]) / 4
    torch.testing.assert_close(out, torch.tensor([2.5, 5.0]))


def test_weighted_sum_without_normalize():
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, 3.0], normalize=False)
    torch.testing.assert_close(out, torch.tensor([10.0, 20.0]))


def test_default_weights_average():
    out = run("linear", None, [[1.0, -2.0], [3.0, 0.0], [2.0, 5.0]])
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]))


def test_zero_weight_sum_is_an_error_when_normalizing():
    with pytest.raises(MergeValidationError, match="sum to 0"):
        run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, -1.0])
    out = run("linear", None, [[1.0, 2.0], [3.0, 6.0]], weight=[1.0, -1.0], normalize=False)
    torch.testing.assert_close(out, torch.tensor([-2.0, -4.0]))


def test_same_tensor_twice_is_not_corrupted():
    from splice.merge import MergeContext, get_method

    a = torch.tensor([1.0, 2.0])
    out = get_method("linear")(None, [a, a], MergeContext(), weight=[1.0, 3.0])
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]))
