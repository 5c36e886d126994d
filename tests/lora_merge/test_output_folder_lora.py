"""`splice lora ...` outputs go through the output-folder helper: lock, overwrite rule,
permissions, bad locations and a full disk."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from lora_test_util import make_adapter

import splice.peft.files as peft_files
from splice.cli import main
from splice.io.output_folder import MARKER_NAME, OutputFolder, lock_file_of, partial_dir_of
from splice.peft import read_lora_adapters


@pytest.fixture
def adapters(tmp_path):
    return [make_adapter(tmp_path / "a1", seed=1), make_adapter(tmp_path / "a2", seed=2)]


def lora_merge(adapters, out, *extra) -> int:
    args = ["lora", "merge", "--method", "concat", *map(str, adapters), "--out", str(out)]
    return main([*args, *extra])


def test_overwrite_rule(adapters, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert lora_merge(adapters, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "not written by splice" in err and "--overwrite twice" in err
    assert (out / "notes.txt").read_text() == "mine"
    assert lora_merge(adapters, out, "--overwrite", "--overwrite") == 0
    assert not (out / "notes.txt").exists() and (out / MARKER_NAME).is_file()
    assert lora_merge(adapters, out) == 1
    assert "already exists" in capsys.readouterr().err
    assert lora_merge(adapters, out, "--overwrite") == 0  # its own previous output
    assert lora_merge(adapters, adapters[0], "--overwrite") == 1  # an input
    assert "holds an input of this run" in capsys.readouterr().err
    assert read_lora_adapters([adapters[0]])  # untouched


def test_locked_output_is_refused(adapters, tmp_path, capsys):
    out = tmp_path / "m"
    held = OutputFolder(out).acquire()
    try:
        assert lora_merge(adapters, out) == 1
        assert f"(pid {os.getpid()})" in capsys.readouterr().err
        assert not out.exists()
    finally:
        held.release()
    assert lora_merge(adapters, out) == 0


def test_private_adapters_give_private_output(adapters, tmp_path):
    for a in adapters:
        for f in a.iterdir():
            f.chmod(0o600)
    out = tmp_path / "m"
    assert lora_merge(adapters, out) == 0
    assert out.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o600}


def test_full_disk_while_writing_the_adapter(adapters, tmp_path, monkeypatch, capsys):
    real = peft_files.write_bytes

    def full(path, data):
        if path.name == "adapter_config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(peft_files, "write_bytes", full)
    out = tmp_path / "m"
    assert lora_merge(adapters, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("splice: error: ") and "No space left" in err and "Traceback" not in err
    assert not out.exists() and not partial_dir_of(out).exists()
    assert not lock_file_of(out).exists()


@pytest.mark.parametrize("command", ["merge", "rmm", "compeft", "extract"])
def test_bad_location_before_any_work(command, adapters, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    bad = str(tmp_path / "f" / "out")
    a1, a2 = map(str, adapters)
    args = {
        "merge": ["lora", "merge", "--method", "svd", a1, a2, "--out", bad],
        "rmm": ["lora", "rmm", a1, a2, "--k", "1", "--out", bad],
        "compeft": ["lora", "compeft", a1, "--density", "0.5", "--out", bad],
        "extract": ["lora", "extract", "--base", a1, "--model", a2, "--rank", "1", "--out", bad],
    }[command]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("splice: error: ") and "is a file, not a folder" in err
    assert "Traceback" not in err


def test_rmm_store_and_recovered_adapter_are_splice_outputs(adapters, tmp_path):
    store, rec = tmp_path / "store", tmp_path / "rec"
    assert main(["lora", "rmm", *map(str, adapters), "--k", "2", "--out", str(store)]) == 0
    assert main(["lora", "rmm-recover", str(store), "--task", "1", "--out", str(rec)]) == 0
    assert (store / MARKER_NAME).is_file() and (rec / MARKER_NAME).is_file()
    got, want = read_lora_adapters([rec])[0], read_lora_adapters([adapters[1]])[0]
    for m, f in want.modules.items():
        torch.testing.assert_close(got.modules[m].to_dense(), f.to_dense(), atol=1e-5, rtol=0)
    # the recovered adapter sits inside no input; the store is an input of rmm-recover
    args = ["lora", "rmm-recover", str(store), "--task", "0", "--out", str(store)]
    assert main([*args, "--overwrite"]) == 1
