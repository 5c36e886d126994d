"""Classification metrics as pure functions of predicted and true class ids.

- accuracy = (1/N) Σ_i [ŷ_i = y_i]
- macro-F1 = (1/|C|) Σ_{c∈C} F1_c,  F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)  (= harmonic mean
  of precision and recall), and F1_c = 0 when the denominator is 0. C is ``0..K-1`` when
  ``num_classes=K`` is given, otherwise the classes present in the labels or the
  predictions. Both choices match scikit-learn's ``f1_score(average="macro")`` (with
  ``labels=range(K)`` for the first; its zero-division value is 0).
- normalized accuracy (Ilharco et al. 2023, "Editing Models with Task Arithmetic", and
  the merging papers after it): acc(merged model on task t) / acc(task t's own fine-tuned
  expert on task t); over several tasks the mean of the per-task ratios.

Inputs are sequences of ints, or anything with ``tolist()`` (torch / numpy arrays).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from splice.errors import DataError


def _ints(x: Any, what: str) -> list[int]:
    values = x.tolist() if hasattr(x, "tolist") else list(x)
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(f"{what} must be integer class ids, got {v!r}")
        out.append(v)
    return out


def _pair(predictions: Any, labels: Any) -> tuple[list[int], list[int]]:
    p, y = _ints(predictions, "predictions"), _ints(labels, "labels")
    if len(p) != len(y):
        raise DataError(f"{len(p)} predictions but {len(y)} labels")
    if not y:
        raise DataError("no examples to score")
    return p, y


def accuracy(predictions: Sequence[int] | Any, labels: Sequence[int] | Any) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(predictions, labels)
    return sum(a == b for a, b in zip(p, y)) / len(y)


def per_class_f1(
    predictions: Sequence[int] | Any, labels: Sequence[int] | Any, num_classes: int | None = None
) -> dict[int, float]:
    """F1 of each class (see the module docstring for which classes)."""
    p, y = _pair(predictions, labels)
    if num_classes is not None:
        if num_classes < 1:
            raise DataError(f"num_classes must be >= 1, got {num_classes}")
        bad = next((v for v in p + y if not 0 <= v < num_classes), None)
        if bad is not None:
            raise DataError(f"class id {bad} outside 0..{num_classes - 1}")
        classes = list(range(num_classes))
    else:
        classes = sorted(set(p) | set(y))
    scores: dict[int, float] = {}
    for c in classes:
        tp = sum(a == c and b == c for a, b in zip(p, y))
        fp = sum(a == c and b != c for a, b in zip(p, y))
        fn = sum(a != c and b == c for a, b in zip(p, y))
        denom = 2 * tp + fp + fn
        scores[c] = 2 * tp / denom if denom else 0.0
    return scores


def macro_f1(
    predictions: Sequence[int] | Any, labels: Sequence[int] | Any, num_classes: int | None = None
) -> float:
    """Unweighted mean of the per-class F1 scores."""
    scores = per_class_f1(predictions, labels, num_classes)
    return sum(scores.values()) / len(scores)


def normalized_accuracy(merged: float, expert: float) -> float:
    """Merged model's accuracy on a task divided by that task's expert's accuracy."""
    for name, v in (("merged", merged), ("expert", expert)):
        if not 0.0 <= v <= 1.0:
            raise DataError(f"{name} accuracy must be in [0, 1], got {v}")
    if expert == 0.0:
        raise DataError("expert accuracy is 0: normalized accuracy is undefined")
    return merged / expert


def mean_normalized_accuracy(merged: Mapping[str, float], experts: Mapping[str, float]) -> float:
    """Mean over tasks of ``normalized_accuracy(merged[t], experts[t])``; same task keys."""
    if set(merged) != set(experts):
        raise DataError(
            f"tasks differ: merged has {sorted(merged)}, experts have {sorted(experts)}"
        )
    if not merged:
        raise DataError("no tasks to average")
    return sum(normalized_accuracy(merged[t], experts[t]) for t in merged) / len(merged)
