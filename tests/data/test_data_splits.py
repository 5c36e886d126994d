"""Seeded stratified splits: counts by the rounding rule, order by the SHA-256 key, caps,
the saved file, and the content-hash check."""

import hashlib
import json

import pytest

from splice.data import TextClassificationDataset, load_splits, make_splits
from splice.errors import DataError


def toy(n_a: int, n_b: int) -> TextClassificationDataset:
    return TextClassificationDataset(
        texts=[f"text {i}" for i in range(n_a + n_b)],
        labels=[0] * n_a + [1] * n_b,
        label_names=["a", "b"],
        source="toy",
    )


def key(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big")


def count(ds, idx):
    return [sum(ds.labels[i] == c for i in idx) for c in range(ds.num_classes)]


def test_stratified_counts_by_hand():
    ds = toy(10, 5)
    s = make_splits(ds, seed=3, sizes=(0.6, 0.2, 0.2))
    # a: n=10 -> test floor(2.0+.5)=2, val 2, train 6
    # b: n=5  -> test floor(1.0+.5)=1, val 1, train 3
    assert count(ds, s.test) == [2, 1]
    assert count(ds, s.validation) == [2, 1]
    assert count(ds, s.train) == [6, 3]


def test_rounding_is_half_up():
    ds = toy(5, 5)
    s = make_splits(ds, seed=0, sizes=(0.6, 0.3, 0.1))
    # n=5: test 0.5 -> 1 (half up; round() would give 0), val 1.5 -> 2, train 5-1-2 = 2
    assert count(ds, s.test) == [1, 1]
    assert count(ds, s.validation) == [2, 2]
    assert count(ds, s.train) == [2, 2]


def test_membership_and_order_follow_the_sha256_key():
    ds = toy(7, 6)
    seed = 11
    s = make_splits(ds, seed=seed, sizes=(0.5, 0.25, 0.25))
    expected = {"train": [], "validation": [], "test": []}
    for c in (0, 1):
        members = sorted(
            (i for i in range(len(ds)) if ds.labels[i] == c), key=lambda i: key(seed, i)
        )
        n = len(members)
        n_test = int(n * 0.25 + 0.5)
        n_val = min(int(n * 0.25 + 0.5), n - n_test)
        expected["test"] += members[:n_test]
        expected["validation"] += members[n_test : n_test + n_val]
        expected["train"] += members[n_test + n_val :]
    for name, idx in expected.items():
        assert list(s.indices(name)) == sorted(idx, key=lambda i: key(seed, i))


def test_pinned_split_never_changes():
    # key order for seed 0 over 0..7 is [7, 4, 3, 2, 6, 0, 5, 1] (sha256 of "0:i"):
    # a = 0..3 -> 3, 2, 0, 1: test 3, val 2, train 0 1;  b = 4..7 -> 7, 4, 6, 5: test 7, val 4
    ds = toy(4, 4)
    assert sorted(range(8), key=lambda i: key(0, i)) == [7, 4, 3, 2, 6, 0, 5, 1]
    s = make_splits(ds, seed=0, sizes=(0.5, 0.25, 0.25))
    assert s.train == (6, 0, 5, 1)
    assert s.validation == (4, 2)
    assert s.test == (7, 3)


def test_seeds_are_deterministic_and_differ():
    ds = toy(30, 20)
    assert make_splits(ds, seed=1) == make_splits(ds, seed=1)
    assert make_splits(ds, seed=1).test != make_splits(ds, seed=2).test
    s = make_splits(ds, seed=1)
    together = s.train + s.validation + s.test
    assert sorted(together) == list(range(50))  # disjoint and covering


def test_caps_take_a_subset_and_leave_other_splits_alone():
    ds = toy(30, 20)
    full = make_splits(ds, seed=5)
    capped = make_splits(ds, seed=5, max_per_class={"train": 4, "test": 1})
    assert count(ds, capped.train) == [4, 4]
    assert count(ds, capped.test) == [1, 1]
    assert set(capped.train) <= set(full.train)
    assert set(capped.test) <= set(full.test)
    assert capped.validation == full.validation
    # the kept ones are the first of each class in key order
    first_a = sorted((i for i in full.train if ds.labels[i] == 0), key=lambda i: key(5, i))[:4]
    assert {i for i in capped.train if ds.labels[i] == 0} == set(first_a)


def test_sizes_as_mapping_and_zero_validation():
    ds = toy(10, 10)
    s = make_splits(ds, seed=0, sizes={"train": 0.8, "test": 0.2})
    assert s.validation == () and len(s.test) == 4 and len(s.train) == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (0.5, 0.2, 0.2)}, "must sum to 1"),
        ({"sizes": (0.8, 0.2)}, "must be 3 fractions"),
        ({"sizes": (1.2, -0.1, -0.1)}, r"must be in \[0, 1\]"),
        ({"sizes": {"train": 0.9, "dev": 0.1}}, "unknown split"),
        ({"max_per_class": {"train": 0}}, "must be a positive integer"),
        ({"max_per_class": {"dev": 3}}, "unknown split 'dev'"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_splits(toy(4, 4), **kwargs)


def test_content_hash_definition():
    ds = TextClassificationDataset(texts=["hé"], labels=[1], label_names=["x", "y"], source="s")

    def put(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b

    raw = b"".join(
        put(b)
        for b in (b"splice-text-classification/1", b"2", b"x", b"y", b"1", b"1", "hé".encode())
    )
    assert ds.content_hash() == hashlib.sha256(raw).hexdigest()
    # the source name is not part of the identity; the label names are
    assert (
        ds.content_hash() == TextClassificationDataset(["hé"], [1], ["x", "y"], "t").content_hash()
    )
    assert (
        ds.content_hash() != TextClassificationDataset(["hé"], [1], ["x", "z"], "s").content_hash()
    )


def test_save_load_roundtrip_and_apply(tmp_path):
    ds = toy(6, 6)
    s = make_splits(ds, seed=9, sizes=(0.5, 0.25, 0.25), max_per_class={"train": 2})
    path = s.save(tmp_path / "sub" / "split.json", ds)
    obj = json.loads(path.read_text())
    assert obj["data_hash"] == ds.content_hash()
    assert obj["counts"]["train"] == {"a": 2, "b": 2}
    assert obj["max_per_class"] == {"train": 2}
    assert not [p for p in path.parent.iterdir() if p.name != "split.json"]  # no temp files left
    loaded = load_splits(path, ds)
    assert loaded == s
    parts = loaded.apply(ds)
    assert parts["train"].texts == tuple(ds.texts[i] for i in s.train)
    assert parts["test"].source == "toy:test"


def test_hash_mismatch_is_refused(tmp_path):
    ds = toy(6, 6)
    path = make_splits(ds, seed=0).save(tmp_path / "split.json")
    changed = TextClassificationDataset(
        texts=[*ds.texts[:-1], "edited"], labels=ds.labels, label_names=ds.label_names, source="toy"
    )
    with pytest.raises(DataError, match="split does not match the data"):
        load_splits(path, changed)
    with pytest.raises(DataError, match="split does not match the data"):
        load_splits(path).apply(changed)


def test_damaged_split_files(tmp_path):
    ds = toy(4, 4)
    path = make_splits(ds, seed=0).save(tmp_path / "split.json")
    obj = json.loads(path.read_text())

    def bad(change, message):
        o = json.loads(json.dumps(obj))
        change(o)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(o))
        with pytest.raises(DataError, match=message):
            load_splits(p)

    bad(lambda o: o["splits"]["test"].append(o["splits"]["train"][0]), "in more than one split")
    bad(lambda o: o["splits"]["test"].append(99), "outside 0..7")
    bad(lambda o: o.update(extra=1), r"unknown key\(s\) \['extra'\]")
    bad(lambda o: o.update(format="other"), "not a splice split file")
    bad(lambda o: o.pop("seed"), "malformed split file")
    with pytest.raises(DataError, match="no such split file"):
        load_splits(tmp_path / "none.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(DataError, match="not a readable split file"):
        load_splits(tmp_path / "junk.json")
