"""What `splice merge` / `inspect` read, end to end: links out of a model folder, index entries
leaving it, side files, adapters, FIFOs and devices, and header limits (issue 9, classes 4-5)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from io_test_util import write_raw, write_tensors
from test_safe_paths import SECRET, call_with_timeout, hub_cache, secret_file

from splice.cli import main
from splice.errors import CheckpointError
from splice.io import SafetensorsReader, ShardedReader, sharded_reader
from splice.io import safetensors_reader as st_reader
from splice.reference import open_checkpoint

A = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[4.0, 5.0]])}
B = {"w": torch.tensor([3.0, 4.0, 5.0]), "b": torch.tensor([[6.0, 7.0]])}


def model_folder(path: Path, tensors: dict[str, torch.Tensor], tokenizer: bool = True) -> Path:
    path.mkdir(parents=True)
    write_tensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    if tokenizer:
        (path / "tokenizer.json").write_text('{"version": "1.0"}')
    return path


def sharded_folder(path: Path, shard_names=("s1.safetensors", "s2.safetensors")) -> Path:
    """A folder with an index: 'w' in the first shard name, 'b' in the second."""
    path.mkdir(parents=True)
    write_tensors(path / "s1.safetensors", {"w": A["w"]})
    write_tensors(path / "s2.safetensors", {"b": A["b"]})
    index = {"weight_map": {"w": shard_names[0], "b": shard_names[1]}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def merge(tmp_path: Path, *refs: Path | str, out: str = "out") -> int:
    recipe = tmp_path / f"{out}.yaml"
    models = [{"model": str(r)} for r in refs]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    return main(["merge", str(recipe), "--out", str(tmp_path / out)])


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`splice ARGS` in a subprocess: a regression that blocks fails by timeout, never hangs."""
    return subprocess.run(
        [sys.executable, "-m", "splice.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )


# -- links out of the named folder -----------------------------------------------------------


def test_shard_linked_outside_the_folder_is_refused_by_merge_and_inspect(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_tensors(outside / "stolen.safetensors", {"b": torch.tensor([[9.0, 9.0]])})
    m = sharded_folder(tmp_path / "m")
    os.unlink(m / "s2.safetensors")
    os.symlink(outside / "stolen.safetensors", m / "s2.safetensors")
    with pytest.raises(CheckpointError, match=r"s2\.safetensors leads outside .*/m "):
        open_checkpoint(m)
    assert main(["inspect", str(m)]) == 1
    assert "s2.safetensors leads outside" in capsys.readouterr().err
    assert merge(tmp_path, m, model_folder(tmp_path / "other", B)) == 1
    assert "leads outside" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_single_file_model_linked_outside_is_refused_in_a_folder_but_fine_when_named(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_tensors(outside / "real.safetensors", A)
    m = tmp_path / "m"
    m.mkdir()
    os.symlink(outside / "real.safetensors", m / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors leads outside"):
        open_checkpoint(m)
    r = open_checkpoint(m / "model.safetensors")  # the user named the link itself
    assert torch.equal(r.read("w"), A["w"])
    r.close()


def test_links_that_stay_inside_the_folder_are_followed(tmp_path):
    m = sharded_folder(tmp_path / "m", ("w-link.safetensors", "sub-link.safetensors"))
    (m / "sub").mkdir()
    os.rename(m / "s2.safetensors", m / "sub" / "s2.safetensors")
    os.symlink("s1.safetensors", m / "w-link.safetensors")
    os.symlink("sub/s2.safetensors", m / "sub-link.safetensors")
    r = open_checkpoint(m)
    assert torch.equal(r.read("w"), A["w"]) and torch.equal(r.read("b"), A["b"])
    r.close()


def _hub_model(tmp_path: Path, tensors: dict[str, torch.Tensor], tokenizer: bytes) -> Path:
    src = tmp_path / "src.safetensors"
    write_tensors(src, tensors)
    return hub_cache(
        tmp_path,
        {
            "model.safetensors": src.read_bytes(),
            "config.json": b'{"model_type": "tiny"}',
            "tokenizer.json": tokenizer,
        },
    )


def test_hub_cache_snapshot_links_into_blobs_are_allowed(tmp_path, capsys):
    snap = _hub_model(tmp_path, A, b'{"hub": true}')
    assert (snap / "model.safetensors").is_symlink()
    r = open_checkpoint(snap)
    assert torch.equal(r.read("b"), A["b"])
    r.close()
    assert main(["inspect", str(snap)]) == 0
    assert merge(tmp_path, snap, model_folder(tmp_path / "other", B)) == 0
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == b'{"hub": true}'  # copied from the blob
    assert not (out / "tokenizer.json").is_symlink()
    r = open_checkpoint(out)
    assert torch.equal(r.read("w"), (A["w"] + B["w"]) / 2)
    r.close()


def test_hub_snapshot_link_out_of_the_repo_is_refused(tmp_path):
    secret = secret_file(tmp_path)
    snap = _hub_model(tmp_path, A, b"{}")
    os.unlink(snap / "tokenizer.json")
    os.symlink(secret, snap / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json leads outside .*models--org--name"):
        from splice.io.safe_paths import side_files

        side_files(snap, ["tokenizer.json"])


@pytest.mark.parametrize("entry", ["../../elsewhere/secret.txt", "/ABS/secret.txt", "../m2/x"])
def test_index_entries_leaving_the_folder_are_refused_without_content(tmp_path, entry):
    secret = secret_file(tmp_path)
    entry = entry.replace("/ABS", str(secret.parent))
    m = sharded_folder(tmp_path / "m", ("s1.safetensors", entry))
    with pytest.raises(CheckpointError, match="is not a plain file name") as e:
        open_checkpoint(m)
    assert SECRET not in str(e.value)


def test_index_entry_linked_to_a_secret_file_leaks_nothing(tmp_path, capsys):
    """The reported case: a shard resolving to /etc/passwd printed its first bytes."""
    secret = secret_file(tmp_path)
    m = sharded_folder(tmp_path / "m")
    os.unlink(m / "s2.safetensors")
    os.symlink(secret, m / "s2.safetensors")
    with pytest.raises(CheckpointError, match="leads outside") as e:
        ShardedReader(m / "model.safetensors.index.json")
    assert SECRET not in str(e.value) and str(secret) not in str(e.value)
    os.unlink(m / "s2.safetensors")
    os.symlink("/etc/passwd", m / "s2.safetensors")
    assert main(["inspect", str(m)]) == 1
    err = capsys.readouterr().err
    assert "leads outside" in err and "root:" not in err


def test_a_named_non_safetensors_file_gives_no_bytes_back(tmp_path, capsys):
    """Even a file the user names directly: its first 8 bytes are not printed as a number."""
    secret = secret_file(tmp_path)
    leaked = str(int.from_bytes(SECRET.encode()[:8], "little"))
    os.symlink(secret, tmp_path / "x.safetensors")
    for path in (secret, tmp_path / "x.safetensors"):
        with pytest.raises(CheckpointError, match="header size is not plausible") as e:
            SafetensorsReader(path)
        assert leaked not in str(e.value) and SECRET[:8] not in str(e.value)
    body = b'{"w": {"dtype": "' + SECRET.encode() * 10 + b'", "shape": [1]}}'
    write_raw(tmp_path / "bad.safetensors", body)
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "lacks ['data_offsets']" in err and SECRET not in err


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json"])
def test_side_file_linked_outside_fails_the_merge_before_any_output(tmp_path, capsys, name):
    secret = secret_file(tmp_path, "secret.json")
    m = model_folder(tmp_path / "m", A)
    os.unlink(m / name)
    os.symlink(secret, m / name)
    assert merge(tmp_path, m, model_folder(tmp_path / "other", B)) == 1
    err = capsys.readouterr().err
    assert f"{name} leads outside" in err and SECRET not in err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.splice-partial").exists()


def test_side_file_that_is_a_fifo_fails_the_merge_promptly(tmp_path, capsys):
    m = model_folder(tmp_path / "m", A)
    os.unlink(m / "tokenizer.json")
    os.mkfifo(m / "tokenizer.json")
    other = model_folder(tmp_path / "other", B)
    code = call_with_timeout(lambda: merge(tmp_path, m, other), m / "tokenizer.json")
    assert code == 1
    assert "tokenizer.json is a FIFO" in capsys.readouterr().err


# -- adapters --------------------------------------------------------------------------------


def _adapter(path: Path) -> Path:
    path.mkdir()
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    write_tensors(
        path / "adapter_model.safetensors",
        {
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
        },
    )
    return path


def test_adapter_files_linked_outside_are_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    write_tensors(base / "model.safetensors", {"m.q.weight": torch.zeros(3, 2)})
    good = _adapter(tmp_path / "ad")
    r = open_checkpoint(f"{base}+{good}")
    assert torch.equal(r.read("m.q.weight"), torch.full((3, 2), 2.0))
    r.close()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        bad = _adapter(tmp_path / f"bad-{name}")
        outside = tmp_path / f"outside-{name}"
        os.rename(bad / name, outside)
        os.symlink(outside, bad / name)
        with pytest.raises(CheckpointError, match=f"{name} leads outside"):
            open_checkpoint(f"{base}+{bad}")
    # an adapter folder reached through a link is fine: its root is the link's target
    os.symlink(good, tmp_path / "ad-alias")
    open_checkpoint(f"{base}+{tmp_path / 'ad-alias'}").close()


# -- FIFOs, devices, folders -----------------------------------------------------------------


def test_fifo_named_safetensors_fails_inspect_and_merge_promptly(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    other = model_folder(tmp_path / "other", B)
    r = cli("inspect", str(fifo))
    assert r.returncode == 1 and "is a FIFO (named pipe), not a regular file" in r.stderr
    assert "Traceback" not in r.stderr
    recipe = tmp_path / "r.yaml"
    models = [{"model": str(fifo)}, {"model": str(other)}]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    r = cli("merge", str(recipe), "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "FIFO" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "x.gguf", "i.json"])
def test_fifo_in_place_of_any_input_file_is_refused(tmp_path, name):
    m = tmp_path / "m"
    m.mkdir()
    fifo = m / name
    os.mkfifo(fifo)
    ref = m / "model.safetensors.index.json" if name == "i.json" else fifo
    if name == "i.json":
        os.symlink("i.json", ref)
    with pytest.raises(CheckpointError, match="FIFO"):
        call_with_timeout(lambda: open_checkpoint(ref), fifo)
    if name != "x.gguf":  # a folder is looked at for its standard names only
        with pytest.raises(CheckpointError, match="FIFO"):
            call_with_timeout(lambda: open_checkpoint(m), fifo)


def test_dev_zero_and_folders_named_like_checkpoints(tmp_path, capsys):
    os.symlink("/dev/zero", tmp_path / "x.safetensors")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 1
    assert "is a character device, not a regular file" in capsys.readouterr().err
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a regular file"):
        SafetensorsReader(tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path / "d.safetensors")
    m = tmp_path / "m"
    (m / "model.safetensors").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a folder"):
        open_checkpoint(m)


# -- header and index limits -----------------------------------------------------------------


def test_half_a_million_empty_tensors_open_in_one_linear_pass(tmp_path):
    n = 500_000
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    header["real"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    p = write_raw(tmp_path / "many.safetensors", header, struct.pack("<2f", 1.5, -2.0))
    with SafetensorsReader(p) as r:
        names = r.names()
        assert len(names) == n + 1 and names[0] == "real" and names[1] == "t0"
        assert r.read("t123456").shape == (0,)
        assert r.read("real").tolist() == [1.5, -2.0]


def test_header_over_the_size_limit(tmp_path, monkeypatch):
    p = write_tensors(tmp_path / "m.safetensors", A)
    header_len = struct.unpack("<Q", p.read_bytes()[:8])[0]
    monkeypatch.setattr(st_reader, "MAX_HEADER_BYTES", header_len - 1)
    with pytest.raises(
        CheckpointError, match=rf"header size is not plausible .*1\.\.{header_len - 1}"
    ):
        SafetensorsReader(p)
    monkeypatch.setattr(st_reader, "MAX_HEADER_BYTES", header_len)
    SafetensorsReader(p).close()
    data = bytearray(p.read_bytes())
    data[0:8] = struct.pack("<Q", 2**63)
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not plausible") as e:
        SafetensorsReader(p)
    assert str(2**63) not in str(e.value)


def test_tensor_count_over_the_limit(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.ones(1) for i in range(11)}
    p = write_tensors(tmp_path / "m.safetensors", tensors)
    monkeypatch.setattr(st_reader, "MAX_TENSORS", 10)
    with pytest.raises(CheckpointError, match="lists 11 tensors; at most 10"):
        SafetensorsReader(p)
    monkeypatch.setattr(st_reader, "MAX_TENSORS", 11)
    with SafetensorsReader(p) as r:
        assert len(r.names()) == 11
    m = sharded_folder(tmp_path / "sh")
    monkeypatch.setattr(sharded_reader, "MAX_TENSORS", 1)
    with pytest.raises(CheckpointError, match="weight_map lists 2 tensors; at most 1"):
        open_checkpoint(m)


def test_overlap_check_is_still_exact(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},  # empty: may sit anywhere
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    with SafetensorsReader(write_raw(tmp_path / "ok.safetensors", header, bytes(12))) as r:
        assert r.names() == ["a", "e", "b"]
    header["c"] = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    with pytest.raises(CheckpointError, match="tensors 'a' and 'c' have overlapping"):
        SafetensorsReader(write_raw(tmp_path / "bad.safetensors", header, bytes(12)))


def test_names_from_a_header_are_escaped_in_errors(tmp_path):
    name = "\x1b[31m" + "n" * 500
    header = {name: {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="hold 4 bytes") as e:
        SafetensorsReader(write_raw(tmp_path / "m.safetensors", header, bytes(4)))
    assert "\x1b" not in str(e.value) and len(str(e.value)) < 400
    header = {"w": {"dtype": ["F32"] * 10**5, "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(CheckpointError, match="unknown dtype") as e:
        SafetensorsReader(write_raw(tmp_path / "m2.safetensors", header, bytes(4)))
    assert len(str(e.value)) < 400
