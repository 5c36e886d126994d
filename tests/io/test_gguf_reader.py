"""GgufReader on a tiny Llama GGUF written with the `gguf` package's GGUFWriter."""

import sys

import numpy as np
import pytest
import torch

from splice.errors import CheckpointError
from splice.io import GgufReader
from splice.reference import open_checkpoint
from tiny_hf import tiny_llama

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (what convert_hf_to_gguf.py applies)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_tiny_llama_gguf(path):
    model = tiny_llama(0, max_position_embeddings=128)
    cfg, sd = model.config, model.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(8)
    quantized = "model.layers.0.mlp.up_proj.weight"
    expected = {}
    for name, t in sd.items():
        module, suffix = name.rsplit(".", 1)
        a = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            a = _permute(a, 4)
        if name.endswith("k_proj.weight"):
            a = _permute(a, 2)
        gname = names.get_name(module) + "." + suffix
        if name == quantized:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            expected[name] = torch.from_numpy(np.ascontiguousarray(deq))
        else:
            w.add_tensor(gname, a)
            expected[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected, quantized, sd


def test_reads_tiny_llama_gguf_with_hf_names(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected, quantized, original = _write_tiny_llama_gguf(path)
    r = open_checkpoint(str(path))
    assert isinstance(r, GgufReader)
    assert sorted(r.names()) == sorted(expected)
    for name, t in expected.items():
        got = r.read(name)
        assert r.info(name).shape == tuple(t.shape)
        assert torch.equal(got.float(), t.float()), name
    # the Q8_0 tensor was dequantized, close to the original
    torch.testing.assert_close(r.read(quantized), original[quantized], atol=0.02, rtol=0)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: cannot read as GGUF"):
        GgufReader(path)
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match=r"bad\.gguf: cannot read as GGUF"):
        open_checkpoint(str(path))


def test_missing_optional_packages(tmp_path, monkeypatch):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(
        CheckpointError, match=r"needs the optional packages 'transformers' and 'gguf'"
    ):
        GgufReader(path)
