"""User data files: CSV / TSV / JSONL, string or integer labels, and the clear errors."""

import json

import pytest

from splice.data import load_task, load_user_file
from splice.errors import DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_string_labels_are_sorted_names(tmp_path):
    f = write(
        tmp_path / "d.csv", 'id,text,label\n1,good film,pos\n2,bad film,neg\n3,"ok, fine",pos\n'
    )
    ds = load_user_file(f)
    assert ds.label_names == ("neg", "pos")  # sorted
    assert ds.labels == (1, 0, 1)
    assert ds.texts == ("good film", "bad film", "ok, fine")
    assert ds.source == "d"


def test_csv_digit_labels_are_the_integers_present(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,2\nb,0\nc,2\n")
    ds = load_user_file(f)
    assert ds.labels == (1, 0, 1)
    assert ds.label_names == ("0", "2")  # the integers present, sorted; no empty class "1"


@pytest.mark.parametrize(
    ("labels", "names", "ids"),
    [
        ([0, 10**12], ("0", "1000000000000"), (0, 1)),  # two classes, not 10**12 + 1
        ([10**12, 0, 10**12], ("0", "1000000000000"), (1, 0, 1)),
        ([10, 9, 100], ("9", "10", "100"), (1, 0, 2)),  # numeric order, not string order
        (["007", 7, "3"], ("3", "7"), (1, 1, 0)),  # digit strings are integers
    ],
)
def test_integer_labels_are_bounded_by_the_labels_present(tmp_path, labels, names, ids):
    lines = [json.dumps({"text": f"t{i}", "label": y}) for i, y in enumerate(labels)]
    ds = load_user_file(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n"))
    assert ds.label_names == names
    assert ds.labels == ids


@pytest.mark.parametrize("integers", [True, False])
def test_too_many_distinct_labels_is_an_error(tmp_path, integers):
    from splice.data.dataset import MAX_CLASSES

    n = MAX_CLASSES + 1
    rows = [f"t{i},{i * 10**9 if integers else f'c{i}'}" for i in range(n)]
    f = write(tmp_path / "d.csv", "text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"{n:,} distinct labels; at most {MAX_CLASSES:,}"):
        load_user_file(f)
    # exactly the bound is accepted
    f = write(tmp_path / "e.csv", "text,label\n" + "\n".join(rows[:-1]) + "\n")
    assert load_user_file(f).num_classes == MAX_CLASSES


def test_jsonl_int_labels_bom_blank_lines_and_custom_columns(tmp_path):
    lines = [json.dumps({"sentence": "x", "y": 1}), "", json.dumps({"sentence": "y", "y": 0})]
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    ds = load_user_file(f, text_column="sentence", label_column="y")
    assert ds.labels == (1, 0)
    assert ds.label_names == ("0", "1")


def test_tsv_and_dedupe(tmp_path):
    f = write(tmp_path / "d.tsv", "text\tlabel\nx\ta\nx\ta\ny\tb\n")
    assert len(load_user_file(f)) == 3  # duplicates kept by default for user data
    assert load_user_file(f, dedupe=True).texts == ("x", "y")


def test_load_task_by_path(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,x\nb,y\n")
    assert load_task(str(f)).labels == (0, 1)
    with pytest.raises(DataError, match="did you mean 'label_column'"):
        load_task(f, label_col="y")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "", "the file is empty"),
        ("d.csv", "text,label\n", "no examples"),
        ("d.jsonl", "\n\n", "no examples"),
        (
            "d.csv",
            "text,target\na,1\n",
            r"no 'label' column \(columns found: \['text', 'target'\]\)",
        ),
        ("d.jsonl", '{"text": "a"}\n', "no 'label' column"),
        ("d.csv", "text,label\na,x\nb,x\n", "only one class \\('x'\\)"),
        ("d.csv", "text,label\na,x\n  ,y\n", "line 3: empty or missing 'text'"),
        ("d.csv", "text,label\na,x\nb,\n", "line 3: empty or missing 'label'"),
        ("d.jsonl", '{"text": "a", "label": true}\n', "must be a string or an integer"),
        ("d.jsonl", '{"text": "a", "label": 0.5}\n', "must be a string or an integer"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": -1}\n', "negative"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{bad\n', "line 2: not valid JSON"),
        ("d.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("d.txt", "text,label\n", "unknown data file type '.txt'"),
    ],
)
def test_errors(tmp_path, name, content, message):
    f = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_user_file(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_user_file(tmp_path / "nope.csv")
