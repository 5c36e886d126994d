"""The dataset record: validation, counts, subsets, and deduplication."""

import pytest

from splice.data import TextClassificationDataset
from splice.data.dataset import from_pairs
from splice.errors import DataError


def test_record_checks():
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        TextClassificationDataset(["a", "b"], [0], ["x", "y"], "s")
    with pytest.raises(DataError, match=r"label 2 outside 0\.\.1"):
        TextClassificationDataset(["a"], [2], ["x", "y"], "s")
    with pytest.raises(DataError, match="duplicate label names"):
        TextClassificationDataset(["a"], [0], ["x", "x"], "s")
    ds = TextClassificationDataset(["a", "b", "c"], [1, 1, 0], ["x", "y", "z"], "s")
    assert ds.class_counts() == {"x": 1, "y": 2, "z": 0}
    assert ds.subset([2, 0]).texts == ("c", "a")
    with pytest.raises(DataError, match=r"index 3 outside 0\.\.2"):
        ds.subset([3])


def test_from_pairs_dedupe_rules():
    pairs = [("a", 0), ("b", 1), ("a", 0), ("c", 0), ("c", 1), ("b", 1), ("c", 0)]
    ds = from_pairs(pairs, ["n", "p"], "s")
    # "a" and "b" keep their first copy (2 dropped); "c" has labels 0 and 1: all 3 rows go
    assert ds.texts == ("a", "b") and ds.labels == (0, 1)
    assert ds.info == {"duplicates_dropped": 2, "conflicting_dropped": 3}
    assert len(from_pairs(pairs, ["n", "p"], "s", dedupe=False)) == 7
