"""Open a model reference as a `CheckpointReader`, choosing the reader by what is on disk.

A reference is a path, or `BASE+ADAPTER` (a base checkpoint with an adapter folder folded
in: PEFT LoRA/DoRA by `lora_fold`; any other weight-space type, PEFT's or splice's, by
`splice.adapters.fold_reader` through the adapter's own delta). Dispatch:

- a file by suffix: `.safetensors`; `.bin` / `.pt` / `.pth` (weights-only pickle); `.gguf`;
- a folder, first match wins: `model.safetensors.index.json`, `model.safetensors`,
  `pytorch_model.bin.index.json`, `pytorch_model.bin` (safetensors preferred when both exist).

What is read (`splice.io.safe_paths`): the path named is opened even if it is a link; files
found in a named folder (and shards an index names) must lie inside that folder's allowed root
once links are followed, and be regular files; FIFOs and devices are refused, never opened.

A reference containing `+` is taken as a path when that path exists; otherwise it is split at
a `+` such that both sides exist (refused if several splits would work).
"""

from __future__ import annotations

import os
from pathlib import Path

from splice.errors import CheckpointError
from splice.io.base import CheckpointReader
from splice.io.gguf_reader import GgufReader
from splice.io.lora_fold import LoraFoldedReader
from splice.io.peft_adapter import CONFIG_NAME as ADAPTER_CONFIG
from splice.io.safe_paths import allowed_root, member, read_json
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.sharded_reader import BIN_INDEX, SAFETENSORS_INDEX, ShardedReader
from splice.io.torch_reader import TorchReader

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
MODEL_DIR_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
)
"""A folder holding any of these is a model folder for `model_dir_of`."""


def split_reference(ref: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(base path, adapter path or None) for a reference; CheckpointError if nothing exists."""
    ref = os.fspath(ref)
    if os.path.exists(ref):
        return ref, None
    splits = [
        (ref[:i], ref[i + 1 :])
        for i, ch in enumerate(ref)
        if ch == "+" and os.path.exists(ref[:i]) and os.path.exists(ref[i + 1 :])
    ]
    if len(splits) == 1:
        return splits[0]
    if len(splits) > 1:
        raise CheckpointError(
            f"model reference '{ref}' is ambiguous: it can be split at '+' in several ways"
        )
    if "+" in ref:
        base, _, adapter = ref.partition("+")
        missing = base if not os.path.exists(base) else adapter
        raise CheckpointError(f"{missing} does not exist (in model reference '{ref}')")
    raise CheckpointError(f"{ref} does not exist")


def open_checkpoint(ref: str | os.PathLike[str]) -> CheckpointReader:
    """A lazy reader for `ref` (see the module docstring for the dispatch rules)."""
    base, adapter = split_reference(ref)
    reader = _open_path(Path(base))
    if adapter is None:
        return reader
    try:
        if _peft_type(Path(adapter)) == "LORA":
            return LoraFoldedReader(reader, adapter)
        # any other adapter type folds through its own delta (splice.adapters)
        from splice.adapters.fold_reader import AdapterFoldedReader

        return AdapterFoldedReader(reader, adapter, model_dir_of(base))
    except BaseException:
        reader.close()
        raise


def _peft_type(adapter_dir: Path) -> str:
    """The adapter's `peft_type` ("LORA" when unreadable: the LoRA path reports why)."""
    try:
        path = member(adapter_dir, ADAPTER_CONFIG)
        raw = read_json(path, "adapter config") if path is not None else {}
        return str(raw.get("peft_type", "LORA"))
    except (CheckpointError, AttributeError):
        return "LORA"


def _open_path(path: Path) -> CheckpointReader:
    if path.is_dir():
        return _open_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader(path)
    if suffix in TORCH_SUFFIXES:
        return TorchReader(path)
    if suffix == ".gguf":
        return GgufReader(path)
    if path.name.endswith(".index.json"):
        return ShardedReader(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format '{suffix or path.name}' (expected .safetensors, "
        ".bin, .pt, .pth, .gguf, an index .json, or a model folder)"
    )


def _open_folder(folder: Path) -> CheckpointReader:
    root = allowed_root(folder)
    if (path := member(folder, SAFETENSORS_INDEX, root)) is not None:
        return ShardedReader(path)
    if (path := member(folder, "model.safetensors", root)) is not None:
        return SafetensorsReader(path)
    if (path := member(folder, BIN_INDEX, root)) is not None:
        return ShardedReader(path)
    if (path := member(folder, "pytorch_model.bin", root)) is not None:
        return TorchReader(path)
    if (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"{folder} is a PEFT adapter folder, not a model; fold it into its base with "
            f"BASE+{folder}"
        )
    raise CheckpointError(
        f"{folder}: no checkpoint found (looked for {SAFETENSORS_INDEX}, model.safetensors, "
        f"{BIN_INDEX}, pytorch_model.bin)"
    )


def model_dir_of(ref: str | os.PathLike[str]) -> Path | None:
    """The folder with the config / tokenizer files of a reference, or None.

    For `BASE+ADAPTER` it is the base's. A folder reference is its own model folder, a file
    reference its parent, when that folder holds one of `MODEL_DIR_FILES` (any entry of that
    name counts, even a FIFO or a broken link: the file's own check then reports it). Never
    raises.
    """
    try:
        base, _adapter = split_reference(ref)
    except CheckpointError:
        return None
    path = Path(base)
    folder = path if path.is_dir() else path.parent
    if any(os.path.lexists(folder / name) for name in MODEL_DIR_FILES):
        return folder
    return None
