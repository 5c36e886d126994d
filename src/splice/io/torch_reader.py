"""A reader for PyTorch pickled checkpoints (`.bin`, `.pt`, `.pth`), loaded safely.

Only `torch.load(path, weights_only=True, mmap=True, map_location="cpu")` is ever called: the
restricted unpickler rebuilds tensors and plain containers and refuses any other object, so a
file that pickles a class, a function or an `os.system` reduce is a CheckpointError and its
payload never runs. With `mmap=True` the tensors are views on the mapped file, so opening is
cheap and `read` copies only the tensor asked for. Files in the legacy (pre-zip, torch < 1.6)
format cannot be mapped; they are loaded fully into memory instead, still with
`weights_only=True`.

Accepted content (the rule, stated): a dict mapping string names to tensors; or a dict whose
only key is "state_dict" holding such a dict. Anything else is a CheckpointError naming the
first offending key.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any

import torch

from splice.errors import CheckpointError
from splice.io.base import InMemoryReader
from splice.io.safe_paths import require_regular, shown


class TorchReader(InMemoryReader):
    """Tensors of a weights-only pickled state dict, mapped from disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        require_regular(self.path)  # torch opens it: refuse a FIFO or device before that
        obj = _safe_load(self.path)
        self._tensors = _state_dict_of(self.path, obj)


def _safe_load(path: str) -> Any:
    try:
        try:
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            # Legacy (non-zip) format: cannot be memory-mapped.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise unpickling_error(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: not a valid PyTorch checkpoint ({_first_line(e)})"
        ) from None
    except Exception as e:  # torch's legacy unpickler raises many types on garbage input
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint (corrupt or truncated?): {_first_line(e)}"
        ) from None


def unpickling_error(path: str, e: pickle.UnpicklingError) -> CheckpointError:
    """The one-line error for a pickle torch would not load (with ``weights_only=True``:
    refused objects, which could run code) or could not parse. Also used when transformers
    loads a ``.bin`` model (`splice.train.models`)."""
    if "weights only" in str(e).lower() or "weights_only" in str(e):
        return CheckpointError(
            f"{path}: refuses to unpickle: the file holds objects other than tensors and "
            f"plain containers, which could run code when loaded ({_unsafe_detail(e)}). "
            "Convert it to safetensors from a trusted environment."
        )
    return CheckpointError(f"{path}: not a valid PyTorch checkpoint ({_first_line(e)})")


def _first_line(e: Exception) -> str:
    """The first line of torch's message, without the bytes some messages quote.

    ("invalid load key, 'r'." quotes the file's first byte; the key is dropped.)
    """
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"load key, .*", "load key", line)
    return line if len(line) <= 200 else line[:200] + "..."


_REFUSED = re.compile(
    r"unsupported global: GLOBAL [\w.]{1,200}|unsupported GLOBAL [\w.]{1,200}|unsupported operand",
    re.I,
)


def _unsafe_detail(e: Exception) -> str:
    """The part of torch's long message that names what was refused.

    The global's dotted name is kept (it says what the file tried to load); an opcode's byte
    value is not (it is a byte of the file).
    """
    m = _REFUSED.search(str(e))
    return m.group(0) if m else "unsupported object"


def _state_dict_of(path: str, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and list(obj) == ["state_dict"]:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict "
            "(a dict of name to tensor)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {shown(key)} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {shown(key)} is a {type(value).__name__}, not a tensor; only flat "
                "state dicts (or {'state_dict': ...}) are accepted"
            )
        out[key] = value
    return out
