"""The expert cache key: stable for the same inputs, different when any input changes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from splice.bench.backbone import Base
from splice.bench.cache import content_key, model_identity
from splice.bench.config import parse_bench_config
from splice.bench.experts import expert_key
from splice.bench.tasks import per_class_caps, prepare_task
from splice.io.output_folder import cache_folder


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture
def setup(tmp_path):
    rows = [(f"text number {i}", "yes" if i % 2 else "no") for i in range(100)]
    data = _csv(tmp_path / "t.csv", rows)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "model.safetensors").write_bytes(b"weights-v1")
    base = Base("m", model, "k", model_identity(model), "classifier", None, 0)
    return tmp_path, data, model, base


def _key(base, path, kind="full", **over):
    cfg = parse_bench_config({"tasks": [str(path), "other.csv"], **over})
    return expert_key(base, [prepare_task(str(path), cfg.data)], kind, cfg)


def test_stable_for_the_same_inputs(setup):
    _, data, _, base = setup
    assert _key(base, data) == _key(base, data)
    # settings that do not change the expert leave the key alone
    assert _key(base, data) == _key(base, data, merge={"methods": "all"}, eval_batch_size=8)
    assert _key(base, data) == _key(base, data, lora={"r": 4})  # not a LoRA expert
    assert _key(base, data, "lora") == _key(base, data, "lora", full={"lr": 0.5})


@pytest.mark.parametrize(
    "over",
    [
        {"full": {"lr": 5e-5}},
        {"training": {"epochs": 3}},
        {"training": {"seed": 1}},
        {"training": {"max_length": 32}},
        {"training": {"head_lr": 1e-3}},
        {"data": {"split_seed": 1}},
        {"data": {"train_per_class": 10}},
        {"precision": "bfloat16"},
    ],
)
def test_changes_with_settings(setup, over):
    _, data, _, base = setup
    plain = _key(base, data, precision="float32")
    assert _key(base, data, **{"precision": "float32", **over}) != plain


def test_changes_with_kind_lora_settings_data_and_model(setup):
    tmp, data, model, base = setup
    key = _key(base, data, "lora")
    assert key != _key(base, data, "full")
    assert key != _key(base, data, "lora", lora={"r": 4})
    assert key != _key(base, data, "lora", lora={"target_modules": ["query"]})
    rows = [(f"text number {i}", "yes" if i % 2 else "no") for i in range(101)]
    other = _csv(tmp / "t2.csv", rows)
    assert _key(base, other, "lora") != key  # different data
    (model / "model.safetensors").write_bytes(b"weights-v2")  # same size, new content
    changed = Base("m", model, "k", model_identity(model), "classifier", None, 0)
    assert _key(changed, data, "lora") != key


def test_model_identity_hashes_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "README.md").write_text("not a weight file")
    ident = model_identity(tmp_path)
    assert [w["name"] for w in ident["weights"]] == ["model.safetensors"]
    assert ident["weights"][0]["size"] == 3
    assert ident["weights"][0]["sha256"].startswith("ba7816bf")  # sha256("abc")


def test_content_key_is_canonical():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 1.5})


def test_per_class_caps():
    cfg = parse_bench_config({"tasks": ["a.csv", "b.csv"]})
    assert per_class_caps(cfg.data, 2) == {"train": 200, "validation": 100, "test": 100}
    assert per_class_caps(cfg.data, 26) == {"train": 47, "validation": 8, "test": 20}


def test_cache_folder(tmp_path):
    final = tmp_path / "x" / "done"
    with cache_folder(final) as tmp:
        (tmp / "f").write_text("1")
        assert not final.exists()
    assert (final / "f").read_text() == "1"
    with pytest.raises(RuntimeError), cache_folder(tmp_path / "y") as tmp:
        raise RuntimeError("boom")
    assert not (tmp_path / "y").exists()
    assert [p.name for p in (tmp_path).iterdir() if p.name.startswith(".")] == []
    # a finished folder of the same key is kept
    with cache_folder(final) as tmp:
        (tmp / "f").write_text("2")
    assert (final / "f").read_text() == "1"
    assert json.dumps(sorted(p.name for p in final.parent.iterdir())) == '["done"]'
