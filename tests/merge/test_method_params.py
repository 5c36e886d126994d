"""Parameter validation through MergeMethod.__call__ and the registered schemas."""

import pytest
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError
from splice.merge import get_method

BASE = [0.0, 0.0]
MODELS = [[1.0, -1.0], [2.0, 1.0]]


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 1.5}, r"'density' = \[1.5, 1.5\] is invalid.*less than or equal to 1"),
        ("ties", {"density": -0.1}, "greater than or equal to 0"),
        ("ties", {"majority": "median"}, "'majority' = 'median' is invalid.*'sum' or 'count'"),
        ("ties", {"disjoint": "min"}, "'disjoint' = 'min' is invalid.*'mean', 'sum' or 'max'"),
        ("ties", {"scope": "layer"}, "'scope' = 'layer' is invalid.*'model' or 'tensor'"),
        ("dare_linear", {"density": 0.5, "rescale": "l2"}, "'rescale' = 'l2' is invalid"),
        ("breadcrumbs", {"density": 0.5, "gamma": 2}, "'gamma' = .* is invalid"),
        ("breadcrumbs", {"density": 0.5, "scope": "model"}, "'row' or 'tensor'"),
        ("model_stock", {"scope": "layer"}, "'tensor' or 'row'"),
        ("ties", {"denisty": 0.5}, r"no parameter\(s\) \['denisty'\]"),
        ("linear", {"weight": "heavy"}, "'weight' = .* is invalid"),
    ],
)
def test_rejected(method, params, message):
    base = None if method == "linear" else BASE
    with pytest.raises(MergeValidationError, match=message):
        run(method, base, MODELS, **params)


def test_mergekit_defaults():
    expected = {
        "ties": {"scope": "tensor"},
        "dare_linear": {"density": 1.0, "rescale": True},
        "dare_ties": {"density": 1.0, "rescale": True, "normalize": False},
        "breadcrumbs": {"density": 1.0, "scope": "tensor"},
        "breadcrumbs_ties": {"density": 1.0, "scope": "tensor", "normalize": False},
    }
    for name, defaults in expected.items():
        assert dict(get_method(name).mergekit_defaults) == defaults


def test_rescale_accepts_mergekit_booleans():
    # rescale: false == "none": the masks are random, but density 1 keeps everything
    out = run("dare_linear", BASE, MODELS, ctx=MERGEKIT, rescale=False)
    assert out.tolist() == [3.0, 0.0]


def test_model_counts():
    assert (get_method("slerp").min_models, get_method("slerp").max_models) == (1, 1)
    assert (get_method("passthrough").min_models, get_method("passthrough").max_models) == (1, 1)
    assert get_method("model_stock").min_models == 2
    assert not get_method("linear").needs_base
    assert get_method("dare_ties").random and not get_method("ties").random
