"""`splice train --out` goes through the output-folder helper: checked and locked before any
loading, the overwrite rule, the inputs' permissions, and a full disk."""

from __future__ import annotations

import errno
import os

import pytest

import splice.peft.files as peft_files
import splice.train.models as train_models
from splice.errors import CheckpointError
from splice.io.output_folder import MARKER_NAME, OutputFolder, lock_file_of, partial_dir_of
from splice.train import parse_train_config, run_training


def _cfg(model, data):
    return parse_train_config(
        {
            "model": str(model),
            "task": "seq_cls",
            "data": {"train": str(data)},
            "adapter": {"method": "lora", "r": 2, "target_modules": ["query"]},
            "steps": 2,
            "batch_size": 8,
        }
    )


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(train_models, "load_for_task", refuse)


def test_locked_or_protected_output_is_refused_before_loading(
    tiny_bert_dir, fruit_csv, tmp_path, no_loading
):
    cfg = _cfg(tiny_bert_dir, fruit_csv)
    out = tmp_path / "run"
    held = OutputFolder(out).acquire()
    try:
        with pytest.raises(CheckpointError, match=rf"being written .*\(pid {os.getpid()}\)"):
            run_training(cfg, out, progress=False)
    finally:
        held.release()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not written by splice"):
        run_training(cfg, out, overwrite=1, progress=False)
    with pytest.raises(CheckpointError, match="holds an input"):
        run_training(cfg, tmp_path, overwrite=1, progress=False)  # holds the data file
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        run_training(cfg, fruit_csv / "run", progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_replaces_only_when_allowed_and_keeps_private_data_private(
    tiny_bert_dir, fruit_csv, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fruit_csv.chmod(0o600)
    run_training(_cfg(tiny_bert_dir, fruit_csv), out, overwrite=2, progress=False)
    assert not (out / "notes.txt").exists() and (out / MARKER_NAME).is_file()
    assert out.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o600}
    run_training(_cfg(tiny_bert_dir, fruit_csv), out, overwrite=1, progress=False)  # its own


def test_full_disk_while_saving_the_adapter(tiny_bert_dir, fruit_csv, tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(peft_files, "write_bytes", full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"cannot write the output .*No space left"):
        run_training(_cfg(tiny_bert_dir, fruit_csv), out, progress=False)
    assert not out.exists() and not partial_dir_of(out).exists()
    assert not lock_file_of(out).exists()
