import json
from pathlib import Path

import pytest
import torch
from io_test_util import write_tensors

from splice.errors import CheckpointError
from splice.io import (
    SafetensorsReader,
    ShardedReader,
    TorchReader,
    model_dir_of,
)
from splice.io.open import split_reference
from splice.peft import LoraFoldedReader
from splice.reference import open_checkpoint


def test_missing_path():
    with pytest.raises(CheckpointError, match="/no/such/model does not exist"):
        open_checkpoint("/no/such/model")


def test_file_dispatch(tmp_path):
    st = write_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    assert isinstance(open_checkpoint(str(st)), SafetensorsReader)
    for suffix in (".bin", ".pt", ".pth"):
        torch.save({"x": torch.ones(2)}, tmp_path / f"a{suffix}")
        assert isinstance(open_checkpoint(str(tmp_path / f"a{suffix}")), TorchReader)
    (tmp_path / "a.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format '.ckpt'"):
        open_checkpoint(str(tmp_path / "a.ckpt"))


def test_folder_prefers_safetensors(tmp_path):
    write_tensors(tmp_path / "model.safetensors", {"x": torch.ones(2)})
    torch.save({"y": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    r = open_checkpoint(str(tmp_path))
    assert isinstance(r, SafetensorsReader) and r.names() == ["x"]
    (tmp_path / "model.safetensors").unlink()
    r = open_checkpoint(str(tmp_path))
    assert isinstance(r, TorchReader) and r.names() == ["y"]


def test_folder_with_index_preferred(tmp_path):
    write_tensors(tmp_path / "model-00001-of-00001.safetensors", {"x": torch.ones(2)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00001.safetensors"}})
    )
    assert isinstance(open_checkpoint(str(tmp_path)), ShardedReader)


def test_empty_folder_and_adapter_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a PEFT adapter folder, not a model"):
        open_checkpoint(str(tmp_path))


def test_plus_reference_missing_parts(tmp_path):
    write_tensors(tmp_path / "model.safetensors", {"x": torch.ones(2)})
    with pytest.raises(CheckpointError, match="/nope does not exist"):
        open_checkpoint(f"{tmp_path}+/nope")
    with pytest.raises(CheckpointError, match="/nope does not exist"):
        open_checkpoint(f"/nope+{tmp_path}")


def test_plus_in_a_real_path_is_a_path(tmp_path):
    d = tmp_path / "a+b"
    d.mkdir()
    write_tensors(d / "model.safetensors", {"x": torch.ones(2)})
    assert isinstance(open_checkpoint(str(d)), SafetensorsReader)


def test_plus_reference_with_adapter(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    write_tensors(base / "model.safetensors", {"m.q.weight": torch.zeros(3, 2)})
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q"]})
    )
    write_tensors(
        ad / "adapter_model.safetensors",
        {
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
        },
    )
    r = open_checkpoint(f"{base}+{ad}")
    assert isinstance(r, LoraFoldedReader)
    assert torch.equal(r.read("m.q.weight"), torch.full((3, 2), 2.0))
    assert model_dir_of(f"{base}+{ad}") is None
    (base / "config.json").write_text("{}")
    assert model_dir_of(f"{base}+{ad}") == base


def test_model_dir_of(tmp_path):
    write_tensors(tmp_path / "model.safetensors", {"x": torch.ones(2)})
    assert model_dir_of(str(tmp_path)) is None
    assert model_dir_of(str(tmp_path / "model.safetensors")) is None
    (tmp_path / "tokenizer.json").write_text("{}")
    assert model_dir_of(str(tmp_path)) == tmp_path
    assert model_dir_of(str(tmp_path / "model.safetensors")) == tmp_path
    assert model_dir_of("/no/such/thing") is None


def _plus_tree(tmp_path, monkeypatch):
    """Folders m, m+a, a+b, b (relative to the working folder)."""
    monkeypatch.chdir(tmp_path)
    for d in ("m", "m+a", "a+b", "b", "x\\y"):
        Path(d).mkdir()


@pytest.mark.parametrize(
    "ref, want",
    [
        ("m+a", ("m+a", None)),  # an existing path wins
        ("m\\+a", ("m+a", None)),  # escaped: one path
        ("m+a\\+b", ("m", "a+b")),
        ("m\\+a+b", ("m+a", "b")),
        ("m+b", ("m", "b")),  # the one split where both sides exist
        ("a+b+b", ("a+b", "b")),
        ("x\\\\y+b", ("x\\y", "b")),  # an escaped backslash
    ],
)
def test_split_reference_forms(ref, want, tmp_path, monkeypatch):
    _plus_tree(tmp_path, monkeypatch)
    assert split_reference(ref) == want


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("m+a+b", r"ambiguous: it splits at '\+' as 'm' \+ 'a\+b' or 'm\+a' \+ 'b'.*'\\\+'"),
        ("m\\+a+b+b", "has 2 unescaped"),
        ("m\\a+b", "a backslash must be followed by"),
        ("m\\+a+nope", "nope does not exist"),
        ("\\+b", r"^\+b does not exist"),
        ("m+\\+", r"^\+ does not exist"),
        ("+b\\+", "empty part"),
    ],
)
def test_split_reference_errors(ref, fragment, tmp_path, monkeypatch):
    _plus_tree(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=fragment):
        split_reference(ref)


def test_model_side_files_is_the_one_list_of_copied_files(tmp_path):
    from splice.io.open import TOKENIZER_FILES, model_side_files

    for name in ("config.json", "merges.txt", "vocab.json", "chat_template.jinja", "notes.txt"):
        (tmp_path / name).write_text("{}")
    # in the list's order; config.json only where the caller asks for it; other files never
    assert [p.name for p in model_side_files(tmp_path)] == [
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    ]
    names = [p.name for p in model_side_files(tmp_path, ("config.json", *TOKENIZER_FILES))]
    assert names == ["config.json", "vocab.json", "merges.txt", "chat_template.jinja"]
    assert model_side_files(tmp_path / "missing") == []
