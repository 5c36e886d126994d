"""Tiny Llama-shaped HF folders on disk for engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from splice.io import ShardedWriter, TensorInfo, plan_shards

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "vocab_size": 16,
}


def tiny_tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g) * scale}
    for i in range(3):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g) * scale
        out[p + "mlp.up_proj.weight"] = torch.randn(12, 8, generator=g) * scale
        out[p + "input_layernorm.weight"] = torch.randn(8, generator=g) * scale
    out["model.norm.weight"] = torch.randn(8, generator=g) * scale
    out["lm_head.weight"] = torch.randn(16, 8, generator=g) * scale
    return out


def write_folder(
    path: Path,
    tensors: dict[str, torch.Tensor],
    shard_bytes: int = 10**9,
    config: dict | None = None,
    tokenizer: bool = True,
) -> str:
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedWriter(path, plan_shards(infos, shard_bytes), {"format": "pt"})
    for n, t in tensors.items():
        w.write(n, t.contiguous())
    w.finalize(extra_files={"config.json": json.dumps(config or CONFIG).encode()}, copy_files=[])
    if tokenizer:
        (path / "tokenizer.json").write_text('{"version": "1.0"}')
    return str(path)


def bf16_finetunes(tmp_path: Path) -> dict[str, str]:
    """A bf16 base (`tiny_tensors(0)`) and three bf16 fine-tunes (base +
    `tiny_tensors(100 + i, 0.1)`, sharded at 600 bytes), written under ``tmp_path``:
    {"base", "ft0", "ft1", "ft2"} -> folder."""
    base = {n: t.to(torch.bfloat16) for n, t in tiny_tensors(0).items()}
    paths = {"base": write_folder(tmp_path / "base", base)}
    for i in range(3):
        d = tiny_tensors(100 + i, scale=0.1)
        ft = {n: (base[n].float() + d[n]).to(torch.bfloat16) for n in base}
        paths[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft, shard_bytes=600)
    return paths
