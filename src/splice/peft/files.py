"""The files of a PEFT adapter folder, read and written in one place.

    adapter_config.json          {"peft_type": "LORA", "r": 8, ...} (splice-only methods:
                                  "peft_type": "SPLICE_<NAME>", same layout)
    adapter_model.safetensors    (or the older adapter_model.bin) keys
                                  "base_model.model.<module path>.<suffix>", PEFT's names
                                  with the adapter name removed, e.g.
                                  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight;
                                  tensors shared by all layers under `shared_key` (VeRA's
                                  ``base_model.vera_A``), model-level adapters' their own
                                  (``prompt_embeddings``)

Reading goes through `splice.io.safe_paths` (only regular files inside the folder's allowed
root). Writing goes into an `OutputFolder`'s partial folder (`write_adapter_folder_files`):
the weights as safetensors with metadata ``format: pt`` (what PEFT writes), the config as
sorted, indented JSON; a tensor holding NaN / ±inf is refused before anything is written,
unless allowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from splice.errors import CheckpointError, SpliceError
from splice.io.base import CheckpointReader
from splice.io.finite import check_output
from splice.io.output_folder import write_bytes
from splice.io.safe_paths import allowed_root, member
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.textfile import load_json_object
from splice.io.torch_reader import TorchReader

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHT_NAMES = (WEIGHTS_NAME, "adapter_model.bin")
SAVED_PREFIX = "base_model.model."


def saved_key(module: str, suffix: str) -> str:
    """The saved key of tensor `suffix` of the adapter layer at module path `module`."""
    return f"{SAVED_PREFIX}{module}.{suffix}"


def shared_key(name: str) -> str:
    """The saved key of a tensor shared by all adapted layers (VeRA's ``vera_A``)."""
    return f"base_model.{name}"


def read_config(adapter_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(path, raw dict) of the folder's `adapter_config.json`, which must name a peft_type."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointError(f"adapter folder {d} does not exist")
    path = member(d, CONFIG_NAME)
    if path is None:
        raise CheckpointError(f"{d}: no {CONFIG_NAME}; not a PEFT adapter folder")
    raw = load_json_object(path, CheckpointError)
    if "peft_type" not in raw:
        raise CheckpointError(f"{path}: no 'peft_type'")
    return path, raw


def peft_type(folder: str | os.PathLike[str]) -> str | None:
    """The `peft_type` of a PEFT adapter folder; None when ``folder`` is not a folder holding
    an adapter_config.json (a checkpoint, a `BASE+ADAPTER` reference). A config that cannot be
    read or names no peft_type reads as "LORA": the LoRA reader then says what is wrong."""
    d = Path(folder)
    if not d.is_dir() or not (d / CONFIG_NAME).exists():
        return None
    try:
        return str(read_config(d)[1]["peft_type"])
    except SpliceError:
        return "LORA"


def open_weights(adapter_dir: str | os.PathLike[str]) -> CheckpointReader:
    """A lazy reader of `adapter_model.safetensors`, else `adapter_model.bin` (weights only)."""
    d = Path(adapter_dir)
    root = allowed_root(d)
    for name in WEIGHT_NAMES:
        path = member(d, name, root)
        if path is not None:
            return SafetensorsReader(path) if name.endswith(".safetensors") else TorchReader(path)
    raise CheckpointError(f"{d}: no {' or '.join(WEIGHT_NAMES)}")


def read_weights(adapter_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every saved tensor of the folder, by saved key."""
    reader = open_weights(adapter_dir)
    try:
        return {n: reader.read(n) for n in reader.names()}
    finally:
        reader.close()


def write_adapter_folder_files(
    folder: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, bytes] | None = None,
    allow_nonfinite: bool = True,
) -> None:
    """Write the config and the tensors (detached, contiguous CPU copies) into `folder` (an
    `OutputFolder`'s partial folder), plus `extra_files` by name. Unless ``allow_nonfinite``,
    a tensor holding NaN / ±inf is a NonFiniteError raised before anything is written."""
    state = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    if not allow_nonfinite:
        for name, t in state.items():
            check_output(t, name)
    write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt", **(metadata or {})}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_bytes(folder / CONFIG_NAME, text.encode())
    for name, data in (extra_files or {}).items():
        write_bytes(folder / name, data)
