"""splice train checks its data before it makes the output folder or loads the model:
split sizes, label sets, validation files; and a model it cannot load safely is one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from splice.cli import main
from splice.data.splits import class_split_sizes, min_class_size
from splice.errors import DataError
from splice.train import parse_train_config
from splice.train.data import classification_splits, lm_splits

MISSING_MODEL = "/nonexistent/model"  # loading it would fail: the data check comes first


def _csv(path: Path, counts: dict[str, int]) -> Path:
    rows = ["text,label"] + [f"{c} {i},{c}" for c, n in counts.items() for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(data: dict, task: str = "seq_cls", **extra) -> object:
    return parse_train_config({"model": MISSING_MODEL, "task": task, "data": data, **extra})


def _train(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    out = tmp_path / "out"
    rc = main(["train", *args, "--steps", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert not out.exists() and not out.with_name("out.splice-partial").exists()
    return rc, err


@pytest.mark.parametrize(
    ("fractions", "expected"), [((0.8, 0.1, 0.1), 5), ((0.5, 0.25, 0.25), 3), ((1, 0, 0), 1)]
)
def test_min_class_size(fractions, expected):
    assert min_class_size(fractions) == expected
    fr = dict(zip(("train", "validation", "test"), fractions))
    sizes = class_split_sizes(expected, fr)
    assert all(sizes[n] >= 1 for n in fr if fr[n] > 0)
    assert any(class_split_sizes(expected - 1, fr)[n] == 0 for n in fr if fr[n] > 0)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"fruit": 2, "animal": 2}, "class 'animal' has 2 example\\(s\\), too few"),
        ({"fruit": 20, "animal": 4}, "class 'animal' has 4 example\\(s\\)"),
        ({"fruit": 1, "animal": 30}, "class 'fruit' has 1 example\\(s\\).*validation gets none"),
        ({"a": 30, "b": 30, "c": 3}, "class 'c' has 3 example\\(s\\).*at least 5"),
    ],
)
def test_classification_split_too_small(tmp_path, capsys, counts, message):
    f = _csv(tmp_path / "d.csv", counts)
    with pytest.raises(DataError, match=message):
        classification_splits(_cfg({"train": str(f)}))
    rc, err = _train(
        tmp_path, capsys, "--model", MISSING_MODEL, "--task", "seq_cls", "--data", str(f)
    )
    assert rc == 1 and "too few for the seeded 80/10/10 split" in err


def test_five_per_class_is_enough(tmp_path):
    parts = classification_splits(
        _cfg({"train": str(_csv(tmp_path / "d.csv", {"a": 5, "b": 5})), "max_train_examples": None})
    )["parts"]
    assert {n: len(p) for n, p in parts.items()} == {"train": 6, "validation": 2, "test": 2}
    for p in parts.values():
        assert set(p.labels) == {0, 1}


def test_given_validation_and_test_files_lift_the_per_class_need(tmp_path):
    train = _csv(tmp_path / "t.csv", {"a": 2, "b": 2, "c": 2})
    val = _csv(tmp_path / "v.csv", {"c": 1, "a": 1})  # subsets of the classes, by name
    test = _csv(tmp_path / "e.csv", {"c": 2, "b": 1})
    parts = classification_splits(
        _cfg({"train": str(train), "validation": str(val), "test": str(test)})
    )["parts"]
    assert parts["validation"].label_names == parts["test"].label_names == ("a", "b", "c")
    assert sorted(parts["validation"].labels) == [0, 2]  # 'c' is id 2 of the training classes
    assert sorted(parts["test"].labels) == [1, 2, 2]
    assert parts["test"].texts == ("c 0", "c 1", "b 0")


def test_validation_file_with_an_unknown_class(tmp_path):
    train = _csv(tmp_path / "t.csv", {"a": 10, "b": 10})
    val = _csv(tmp_path / "v.csv", {"a": 1, "zebra": 1})
    with pytest.raises(
        DataError, match=r"data.validation .*v.csv\) has classes that data.train lacks: \['zebra'\]"
    ):
        classification_splits(_cfg({"train": str(train), "validation": str(val)}))


@pytest.mark.parametrize(("rows", "ok"), [(1, False), (2, False), (3, True), (10, True)])
def test_causal_lm_rows(tmp_path, capsys, rows, ok):
    f = tmp_path / "lm.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(rows)))
    cfg = _cfg({"train": str(f)}, task="causal_lm")
    if ok:
        parts = lm_splits(cfg)
        assert all(parts[n] for n in ("train", "validation", "test"))
        assert sum(len(p) for p in parts.values()) == rows
        return
    with pytest.raises(DataError, match="too few rows for the seeded 80/10/10 split"):
        lm_splits(cfg)
    rc, err = _train(
        tmp_path, capsys, "--model", MISSING_MODEL, "--task", "causal_lm", "--data", str(f)
    )
    assert rc == 1 and "at least 3 are needed" in err


def test_huge_integer_labels_make_two_classes(tiny_bert_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    words = ["apple pear", "fig plum", "lion wolf", "tiger zebra"]
    rows = [
        {"text": f"{words[i % 2 + 2 * (y > 0)]} {i}", "label": y}
        for i in range(12)
        for y in (0, 10**12)
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_bert_dir),
                "--task",
                "seq_cls",
                "--data",
                str(f),
                "--steps",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads((out / "eval.json").read_text())
    assert res["label_names"] == ["0", "1000000000000"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    head = [k for k in cfg.get("modules_to_save") or []]
    assert head == ["classifier"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    shapes = {tuple(v.shape) for k, v in weights.items() if "classifier" in k and "bias" in k}
    assert shapes == {(2,)}


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/splice-pwned-train",))


def test_refused_pickle_model_is_one_line(tiny_bert_dir, fruit_csv, tmp_path, capsys):
    model = tmp_path / "bin-model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").unlink()
    torch.save(
        {"bert.embeddings.word_embeddings.weight": torch.zeros(2), "x": Boom()},
        model / "pytorch_model.bin",
    )
    rc, err = _train(
        tmp_path, capsys, "--model", str(model), "--task", "seq_cls", "--data", str(fruit_csv)
    )
    assert rc == 1 and "Traceback" not in err
    assert f"{model}: refuses to unpickle" in err and "GLOBAL posix.system" in err
    assert not Path("/tmp/splice-pwned-train").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{bad", "not valid JSON"), (b"[1]", "expected a JSON object"), (b"\xff", "not valid UTF-8")],
)
def test_model_config_json_checked_before_loading(
    tiny_bert_dir, fruit_csv, tmp_path, capsys, content, message
):
    model = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, model)
    (model / "config.json").write_bytes(content)
    rc, err = _train(
        tmp_path, capsys, "--model", str(model), "--task", "seq_cls", "--data", str(fruit_csv)
    )
    assert rc == 1 and f"{model / 'config.json'}" in err and message in err


def test_gguf_without_accelerate_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from splice.errors import SpliceError
    from splice.train import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(SpliceError, match=r"m\.gguf: loading a GGUF model needs the accelerate"):
        models.gguf_to_hf_folder(f)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model_type", "has model type `nonsense` but Transformers does not recognize"),
        ("no model_type", "Should have a `model_type` key"),
        ("no weights", "no file named model.safetensors"),
    ],
)
def test_model_transformers_rejects_is_one_line(
    tiny_bert_dir, fruit_csv, tmp_path, capsys, change, message
):
    model = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, model)
    if change == "no weights":
        (model / "model.safetensors").unlink()
    else:
        cfg = json.loads((model / "config.json").read_text())
        cfg["model_type"] = "nonsense"
        if change == "no model_type":
            cfg = {}
        (model / "config.json").write_text(json.dumps(cfg))
    rc, err = _train(
        tmp_path, capsys, "--model", str(model), "--task", "seq_cls", "--data", str(fruit_csv)
    )
    assert rc == 1 and "Traceback" not in err
    assert f"splice: error: {model}: transformers cannot load it: " in err and message in err
