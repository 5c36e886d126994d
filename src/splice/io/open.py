r"""Model references on disk: `open_path` (a plain path as a `CheckpointReader`, the reader
chosen by what is on disk), `split_reference` (`PATH` or `BASE+ADAPTER`) and `model_dir_of`.
Folding an adapter into its base is `splice.reference.open_checkpoint`, above this package.
`open_path` dispatch:

- a file by suffix: `.safetensors`; `.bin` / `.pt` / `.pth` (weights-only pickle); `.gguf`;
- a folder, first match wins: `model.safetensors.index.json`, `model.safetensors`,
  `pytorch_model.bin.index.json`, `pytorch_model.bin` (safetensors preferred when both exist).

What is read (`splice.io.safe_paths`): the path named is opened even if it is a link; files
found in a named folder (and shards an index names) must lie inside that folder's allowed root
once links are followed, and be regular files; FIFOs and devices are refused, never opened.

`BASE+ADAPTER` and paths that contain `+` (`split_reference`, the one parser of references):

1. a reference that exists as a path is that path (`models/a+b` naming a real folder);
2. otherwise, without a backslash, it is split at the one `+` where both sides exist; when
   several splits work it is ambiguous and refused;
3. the unambiguous form escapes every `+` that belongs to a path as `\+` (and a backslash
   as `\\`): then the single unescaped `+`, if any, is the split, e.g.
   `models/base\+v2+adapters/lora\+x` is base `models/base+v2` with adapter
   `adapters/lora+x`. In YAML write it plain or single-quoted (`'a\+b+c'`); in a shell,
   quote it.
"""

from __future__ import annotations

import os
from pathlib import Path

from splice.errors import CheckpointError
from splice.io.base import CheckpointReader
from splice.io.gguf_reader import GgufReader
from splice.io.safe_paths import allowed_root, member, side_files
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
    """(base path, adapter path or None) for a reference (rules in the module docstring);
    CheckpointError when a part does not exist or the reference is ambiguous."""
    ref = os.fspath(ref)
    if os.path.exists(ref):
        return ref, None
    if "\\" in ref:
        return _split_escaped(ref)
    splits = [
        (ref[:i], ref[i + 1 :])
        for i, ch in enumerate(ref)
        if ch == "+" and os.path.exists(ref[:i]) and os.path.exists(ref[i + 1 :])
    ]
    if len(splits) == 1:
        return splits[0]
    if len(splits) > 1:
        ways = " or ".join(f"'{b}' + '{a}'" for b, a in splits[:3])
        raise CheckpointError(
            f"model reference '{ref}' is ambiguous: it splits at '+' as {ways}; write each "
            "'+' that belongs to a path as '\\+' (e.g. 'base\\+v2+adapter')"
        )
    if "+" in ref:
        base, _, adapter = ref.partition("+")
        missing = base if not os.path.exists(base) else adapter
        raise CheckpointError(f"{missing} does not exist (in model reference '{ref}')")
    raise CheckpointError(f"{ref} does not exist")


def _split_escaped(ref: str) -> tuple[str, str | None]:
    """The escaped form: `\\+` and `\\\\` are literal, an unescaped `+` splits (at most one)."""
    parts, cur, i = [], [], 0
    while i < len(ref):
        ch = ref[i]
        if ch == "\\":
            nxt = ref[i + 1 : i + 2]
            if nxt not in ("+", "\\"):
                raise CheckpointError(
                    f"model reference '{ref}': a backslash must be followed by '+' or '\\' "
                    "(write '\\+' for a '+' in a path, '\\\\' for a backslash)"
                )
            cur.append(nxt)
            i += 2
            continue
        if ch == "+":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    if len(parts) > 2:
        raise CheckpointError(
            f"model reference '{ref}' has {len(parts) - 1} unescaped '+'; use one to join "
            "BASE+ADAPTER and write a '+' in a path as '\\+'"
        )
    for p in parts:
        if not p:
            raise CheckpointError(f"model reference '{ref}' has an empty part around '+'")
        if not os.path.exists(p):
            raise CheckpointError(f"{p} does not exist (in model reference '{ref}')")
    return parts[0], parts[1] if len(parts) == 2 else None


def open_path(path: Path) -> CheckpointReader:
    """A lazy reader for a plain checkpoint path (a file by suffix, or a folder)."""
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
    if (folder / "adapter_config.json").is_file():  # splice.peft.CONFIG_NAME (a layer above)
        raise CheckpointError(
            f"{folder} is a PEFT adapter folder, not a model; fold it into its base with "
            f"BASE+{folder}"
        )
    raise CheckpointError(
        f"{folder}: no checkpoint found (looked for {SAFETENSORS_INDEX}, model.safetensors, "
        f"{BIN_INDEX}, pytorch_model.bin)"
    )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""The side files every output copies from its model folder (the merge engine, continual
merging, compress / restore); `config.json` is added by the callers that copy it verbatim."""


def model_side_files(
    ref: str | os.PathLike[str], names: tuple[str, ...] = TOKENIZER_FILES
) -> list[Path]:
    """The files of `names` in the model folder of `ref` (none without one), each checked by
    `safe_paths.side_files` (inside the allowed root, a readable regular file) before any
    output is written."""
    folder = model_dir_of(ref)
    return [] if folder is None else side_files(folder, names)


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
