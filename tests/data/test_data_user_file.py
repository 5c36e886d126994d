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


def test_csv_digit_labels_are_class_ids(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,2\nb,0\nc,2\n")
    ds = load_user_file(f)
    assert ds.labels == (2, 0, 2)
    assert ds.label_names == ("0", "1", "2")  # ids as given, names "0".."max"


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
