"""Open a model reference, `PATH` or `BASE+ADAPTER`, as one lazy `CheckpointReader`.

This sits above `splice.io` and `splice.adapters` (it may import both): a plain path opens
with `splice.io.open.open_path`; `BASE+ADAPTER` (split by `splice.io.open.split_reference`,
rules there) folds the adapter into the base tensor by tensor: a PEFT LoRA / DoRA adapter with
`splice.peft.fold.LoraFoldedReader` (PEFT's `merge_and_unload`, bit for bit), any other
weight-space adapter, PEFT's or splice's, through its own delta
(`splice.adapters.fold_reader.AdapterFoldedReader`).
"""

from __future__ import annotations

import os
from pathlib import Path

from splice.io.base import CheckpointReader
from splice.io.finite import FiniteReader
from splice.io.open import model_dir_of, open_path, split_reference
from splice.peft import LoraFoldedReader
from splice.peft.files import peft_type


def open_checkpoint(ref: str | os.PathLike[str], *, check_finite: bool = False) -> CheckpointReader:
    """A lazy reader for `ref` (see the module docstring for the dispatch rules).

    With ``check_finite`` (what every computing command asks for unless given
    ``--allow-nonfinite``) its `read` refuses a floating tensor holding NaN / ±inf, naming
    the tensor and `ref` (`splice.io.finite.FiniteReader`). Without it the reader is the
    format's own (what `splice inspect` shows, non-finite values included).
    """
    reader = _open_reference(ref)
    return FiniteReader(reader, os.fspath(ref)) if check_finite else reader


def _open_reference(ref: str | os.PathLike[str]) -> CheckpointReader:
    base, adapter = split_reference(ref)
    reader = open_path(Path(base))
    if adapter is None:
        return reader
    try:
        if peft_type(adapter) in ("LORA", None):
            return LoraFoldedReader(reader, adapter, model_dir_of(base))
        # imported on use: most references name no adapter
        from splice.adapters.fold_reader import AdapterFoldedReader

        return AdapterFoldedReader(reader, adapter, model_dir_of(base))
    except BaseException:
        reader.close()
        raise
