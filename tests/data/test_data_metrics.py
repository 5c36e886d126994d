"""Metrics on hand-computed inputs, and scikit-learn parity where it is installed."""

import pytest
import torch

from splice.data import (
    accuracy,
    macro_f1,
    mean_normalized_accuracy,
    normalized_accuracy,
    per_class_f1,
)
from splice.errors import DataError

PRED = [0, 0, 1, 1, 2, 2]
TRUE = [0, 1, 1, 1, 2, 0]
# class 0: TP 1 (i0), FP 1 (i1), FN 1 (i5) -> F1 = 2/(2+1+1) = 0.5
# class 1: TP 2 (i2,i3), FP 0, FN 1 (i1)   -> F1 = 4/(4+0+1) = 0.8
# class 2: TP 1 (i4), FP 1 (i5), FN 0      -> F1 = 2/(2+1+0) = 2/3


def test_accuracy_by_hand():
    assert accuracy(PRED, TRUE) == pytest.approx(4 / 6)  # right at i0, i2, i3, i4
    assert accuracy(torch.tensor(PRED), torch.tensor(TRUE)) == pytest.approx(4 / 6)


def test_macro_f1_by_hand():
    assert per_class_f1(PRED, TRUE) == pytest.approx({0: 0.5, 1: 0.8, 2: 2 / 3})
    assert macro_f1(PRED, TRUE) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # with num_classes=4, class 3 (never true, never predicted) counts as F1 = 0
    assert macro_f1(PRED, TRUE, num_classes=4) == pytest.approx((0.5 + 0.8 + 2 / 3 + 0) / 4)


def test_macro_f1_counts_predicted_only_classes():
    # class 1 only predicted: TP 0, FP 1, FN 0 -> 0; class 0: TP 1, FP 0, FN 1 -> 2/3
    assert macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)


def test_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=g).tolist()
    p = [v if torch.rand(1, generator=g).item() < 0.6 else (v + 1) % 6 for v in y]
    assert accuracy(p, y) == pytest.approx(metrics.accuracy_score(y, p))
    assert macro_f1(p, y) == pytest.approx(metrics.f1_score(y, p, average="macro"))
    assert macro_f1(p, y, num_classes=7) == pytest.approx(
        metrics.f1_score(y, p, average="macro", labels=list(range(7)), zero_division=0)
    )


def test_normalized_accuracy_by_hand():
    assert normalized_accuracy(0.6, 0.8) == pytest.approx(0.75)
    # tasks a: 0.6/0.8 = 0.75, b: 0.9/0.9 = 1.0 -> mean 0.875
    assert mean_normalized_accuracy({"a": 0.6, "b": 0.9}, {"b": 0.9, "a": 0.8}) == pytest.approx(
        0.875
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: accuracy([0, 1], [0]), "2 predictions but 1 labels"),
        (lambda: accuracy([], []), "no examples"),
        (lambda: accuracy([0.5], [0]), "integer class ids"),
        (lambda: macro_f1([0, 3], [0, 1], num_classes=3), "class id 3 outside 0..2"),
        (lambda: normalized_accuracy(0.5, 0.0), "undefined"),
        (lambda: normalized_accuracy(1.5, 0.5), r"must be in \[0, 1\]"),
        (lambda: mean_normalized_accuracy({"a": 0.5}, {"b": 0.5}), "tasks differ"),
        (lambda: mean_normalized_accuracy({}, {}), "no tasks"),
    ],
)
def test_errors(call, message):
    with pytest.raises(DataError, match=message):
        call()
