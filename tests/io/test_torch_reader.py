import os

import pytest
import torch

from splice.errors import CheckpointError
from splice.io import TorchReader
from splice.reference import open_checkpoint


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def test_reads_flat_state_dict(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2).half()}
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    r = TorchReader(path)
    assert r.names() == ["a", "b", "h"]
    for k, v in sd.items():
        assert r.info(k).shape == tuple(v.shape) and r.info(k).dtype == v.dtype
        assert torch.equal(r.read(k), v)
    x = r.read("a")
    x += 1
    assert torch.equal(r.read("a"), sd["a"])  # fresh copies


def test_shared_storage_read_apart(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "m.pt"
    torch.save({"emb": w, "head": w}, path)
    r = TorchReader(path)
    e = r.read("emb")
    e.zero_()
    assert torch.equal(r.read("head"), w)


def test_nested_state_dict_key(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, path)
    assert TorchReader(path).names() == ["a"]


def test_non_tensor_entries_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"a": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, not a tensor"):
        TorchReader(path)


def test_legacy_format_loads(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(TorchReader(path).read("a"), torch.ones(2))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    torch.save(
        {"a": torch.ones(2), "b": _Evil(str(marker))},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(CheckpointError, match=r"evil\.bin: refuses to unpickle.*system"):
        TorchReader(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        open_checkpoint(str(path))
    assert not marker.exists()


def test_custom_class_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"a": torch.ones(2), "c": _Custom()}, path)
    with pytest.raises(CheckpointError, match=r"refuses to unpickle.*_Custom"):
        TorchReader(path)


def test_corrupt_and_missing(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(1000)}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"trunc\.pt: not a valid PyTorch checkpoint"):
        TorchReader(trunc)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.bin"):
        TorchReader(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        TorchReader(tmp_path / "nope.bin")
