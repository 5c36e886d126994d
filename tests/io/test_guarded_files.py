"""The read guard at the other entry points: recipe / train / bench config files, model folders
handed to transformers, splice's own folders (continual state, compressed, RMM store), and
garbage named as a PyTorch checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from io_test_util import write_tensors
from test_safe_paths import SECRET, call_with_timeout, hub_cache, secret_file

from splice.bench.config import BenchConfigError, load_bench_config
from splice.compress.packed import Manifest
from splice.engine.continual import load_state
from splice.errors import CheckpointError, RecipeError
from splice.lora_merge.rmm import load_rmm
from splice.recipe.schema import load_recipe
from splice.train.config import TrainConfigError, load_train_config
from splice.train.models import ModelNotFoundError, resolve_model


@pytest.mark.parametrize(
    ("load", "error"),
    [
        (load_recipe, RecipeError),
        (load_train_config, TrainConfigError),
        (load_bench_config, BenchConfigError),
    ],
)
def test_config_files_that_are_fifos_or_devices_fail_promptly(tmp_path, load, error):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    with pytest.raises(error, match="is a FIFO"):
        call_with_timeout(lambda: load(fifo), fifo)
    os.symlink("/dev/zero", tmp_path / "z.yaml")
    with pytest.raises(error, match="is a character device"):
        load(tmp_path / "z.yaml")
    with pytest.raises(error, match="does not exist"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"a: 1\n\xff\xfe")
    with pytest.raises(error, match=r"not valid UTF-8 text \(invalid byte at offset 5"):
        load(tmp_path / "bin.yaml")


def _hf_folder(path):
    path.mkdir()
    (path / "config.json").write_text("{}")
    write_tensors(path / "model.safetensors", {"w": torch.ones(2)})
    return path


def test_model_folder_for_transformers_is_checked_before_loading(tmp_path):
    secret = secret_file(tmp_path)
    good = _hf_folder(tmp_path / "good")
    assert resolve_model(str(good)) == good
    snap = hub_cache(tmp_path, {"config.json": b"{}", "model.safetensors": b"x"})
    assert resolve_model(str(snap)) == snap
    linked = _hf_folder(tmp_path / "linked")
    os.symlink(secret, linked / "tokenizer.json")
    with pytest.raises(ModelNotFoundError, match=r"tokenizer\.json leads outside") as e:
        resolve_model(str(linked))
    assert SECRET not in str(e.value)
    piped = _hf_folder(tmp_path / "piped")
    os.unlink(piped / "config.json")
    os.mkfifo(piped / "config.json")
    with pytest.raises(ModelNotFoundError, match=r"config\.json is a FIFO"):
        call_with_timeout(lambda: resolve_model(str(piped)), piped / "config.json")
    os.mkfifo(tmp_path / "m.gguf")
    with pytest.raises(ModelNotFoundError, match=r"m\.gguf is a FIFO"):
        call_with_timeout(lambda: resolve_model(str(tmp_path / "m.gguf")), tmp_path / "m.gguf")


def test_splice_folders_read_their_json_through_the_guard(tmp_path):
    secret = secret_file(tmp_path, "s.json")
    for loader, name in [
        (load_state, "splice_continual.json"),
        (Manifest.load, "splice_compress.json"),
        (load_rmm, "rmm.json"),
    ]:
        d = tmp_path / name
        d.mkdir()
        os.symlink(secret, d / name)
        write_tensors(d / "rmm.safetensors", {"x": torch.ones(1)})
        with pytest.raises(CheckpointError, match=f"{name} leads outside") as e:
            loader(d)
        assert SECRET not in str(e.value)
        os.unlink(d / name)
        (d / name).write_text('{"format": ' + SECRET)
        with pytest.raises(CheckpointError, match="not valid JSON") as e:
            loader(d)
        assert SECRET not in str(e.value)


def test_rmm_store_weights_must_be_a_regular_file_inside(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    (d / "rmm.json").write_text(json.dumps({"format": "splice-rmm-1"}))
    os.mkfifo(d / "rmm.safetensors")
    # in a subprocess: a library that blocks in open() while holding the GIL (the safetensors
    # package did here) would freeze a thread-based timeout too
    code = "import sys; from splice.lora_merge.rmm import load_rmm; load_rmm(sys.argv[1])"
    r = subprocess.run(
        [sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "rmm.safetensors is a FIFO" in r.stderr


@pytest.mark.parametrize("data", [(SECRET + "\n") * 3, "\x80\x02" + SECRET, "PK\x03\x04" + SECRET])
def test_garbage_named_as_a_torch_checkpoint_is_a_clean_error_without_content(tmp_path, data):
    from splice.reference import open_checkpoint

    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(data.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"PyTorch checkpoint|refuses to unpickle") as e:
        open_checkpoint(p)
    msg = str(e.value)
    assert SECRET not in msg and "load key, '" not in msg and "operand 84" not in msg
