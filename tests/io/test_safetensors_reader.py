import json

import pytest
import torch
from io_test_util import DTYPES, bit_equal, sample, write_raw, write_tensors
from safetensors.torch import save_file

from splice.errors import CheckpointError
from splice.io import SafetensorsReader, TensorInfo


def test_reads_every_dtype_bit_exact(tmp_path):
    tensors = {f"t{i}": sample((3, 5), dt, seed=i) for i, dt in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.empty(0, 4, dtype=torch.bfloat16)
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsReader(path) as r:
        assert sorted(r.names()) == sorted(tensors)
        assert r.metadata == {"format": "pt"}
        for name, t in tensors.items():
            assert r.info(name) == TensorInfo(name, tuple(t.shape), t.dtype)
            got = r.read(name)
            assert bit_equal(got, t), name


def test_read_returns_fresh_writable_tensor(tmp_path):
    path = write_tensors(tmp_path / "m.safetensors", {"a": torch.arange(6.0).reshape(2, 3)})
    r = SafetensorsReader(path)
    x = r.read("a")
    x += 1
    assert torch.equal(r.read("a"), torch.arange(6.0).reshape(2, 3))
    r.close()
    with pytest.raises(CheckpointError, match="after close"):
        r.read("a")


def test_names_are_in_file_order(tmp_path):
    path = write_tensors(
        tmp_path / "m.safetensors", {"z": torch.ones(2), "a": torch.ones(3), "m": torch.ones(1)}
    )
    assert SafetensorsReader(path).names() == ["z", "a", "m"]


def test_read_touches_only_the_requested_bytes(tmp_path, monkeypatch):
    a, b = torch.randn(100), torch.randn(50)
    path = write_tensors(tmp_path / "m.safetensors", {"a": a, "b": b})
    r = SafetensorsReader(path)
    begin, end = r.byte_range("b")
    calls = []
    real = __import__("os").preadv

    def spy(fd, bufs, offset):
        calls.append((offset, sum(len(x) for x in bufs)))
        return real(fd, bufs, offset)

    monkeypatch.setattr("splice.io.safetensors_reader.os.preadv", spy)
    assert torch.equal(r.read("b"), b)
    assert calls == [(begin, end - begin)]
    assert end - begin == 50 * 4


def test_unknown_name_is_key_error(tmp_path):
    r = SafetensorsReader(write_tensors(tmp_path / "m.safetensors", {"a": torch.ones(1)}))
    with pytest.raises(KeyError):
        r.info("nope")


# --- corrupt inputs: each one a CheckpointError at open, naming the file -----------------


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SafetensorsReader(tmp_path / "nope.safetensors")


def test_truncated_data(tmp_path):
    path = write_tensors(tmp_path / "m.safetensors", {"a": torch.randn(10), "b": torch.randn(10)})
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'b'.*truncated"):
        SafetensorsReader(path)


def test_file_shorter_than_size_prefix(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsReader(path)


def test_header_size_larger_than_file(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry()}, b"\0" * 8, header_size=10_000)
    with pytest.raises(CheckpointError, match="header size 10000 is larger than the file"):
        SafetensorsReader(path)


def test_absurd_header_size(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", b"{}", header_size=2**62)
    with pytest.raises(CheckpointError, match="not plausible"):
        SafetensorsReader(path)


def test_invalid_json_header(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", b'{"a": {"dtype": "F32",', b"\0" * 8)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsReader(path)


def test_header_not_an_object(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", b"[1, 2]")
    with pytest.raises(CheckpointError, match="expected an object"):
        SafetensorsReader(path)


def test_unknown_dtype(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry(dtype="F7")}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'a': unknown dtype 'F7'"):
        SafetensorsReader(path)


def test_offsets_beyond_file(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry(offsets=(8, 16))}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'a' data_offsets \[8, 16\] run past the end"):
        SafetensorsReader(path)


def test_offsets_inconsistent_with_shape(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry(shape=(3,))}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"hold 8 bytes, but shape \[3\] of F32 needs 12"):
        SafetensorsReader(path)


def test_overlapping_offsets(tmp_path):
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}
    path = write_raw(tmp_path / "m.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match="'a' and 'b' have overlapping data_offsets"):
        SafetensorsReader(path)


def test_reversed_offsets(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry(offsets=(8, 0))}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="begin <= end"):
        SafetensorsReader(path)


def test_bad_shape(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": _entry(shape=(-1,))}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="non-negative integers"):
        SafetensorsReader(path)


def test_bad_metadata(tmp_path):
    header = {"__metadata__": {"k": 1}, "a": _entry()}
    path = write_raw(tmp_path / "m.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="__metadata__"):
        SafetensorsReader(path)


def test_entry_missing_fields(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"a": {"dtype": "F32"}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"lacks \['data_offsets', 'shape'\]"):
        SafetensorsReader(path)


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsReader(tmp_path)


def test_padded_header_is_accepted(tmp_path):
    body = json.dumps({"a": _entry()}).encode()
    body += b" " * (-len(body) % 8)
    path = write_raw(tmp_path / "m.safetensors", body, torch.ones(2).numpy().tobytes())
    assert torch.equal(SafetensorsReader(path).read("a"), torch.ones(2))
