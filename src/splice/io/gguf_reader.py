"""A reader for GGUF files (llama.cpp), through the optional `transformers` and `gguf` packages.

NOT LAZY: the GGUF is converted with transformers' `load_gguf_checkpoint`, which dequantizes
every tensor (quantized types become float32 arrays) and renames them to Hugging Face names
when the file is opened. The whole model therefore sits in memory, dequantized, for as long
as the reader lives; `read(name)` returns a copy. Use GGUF inputs for models that fit in RAM.

Names come out as the Hugging Face model class expects them (e.g. `model.layers.0...`), and
the transformations transformers applies (such as undoing llama.cpp's q/k permutation for
Llama) are applied. The model class is taken from the file's architecture
(`architectures` in the converted config when present, else the causal-LM class for its
`model_type`, else the base model class), instantiated on the meta device only to learn the
name mapping: no weights are allocated for it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from splice.errors import CheckpointError
from splice.io.base import InMemoryReader
from splice.io.safe_paths import require_regular

_MISSING_DEPS = (
    "{path}: reading GGUF files needs the optional packages 'transformers' and 'gguf' "
    "(pip install 'splice[hf]'): {error}"
)


class GgufReader(InMemoryReader):
    """All tensors of a GGUF file, dequantized at open (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        require_regular(self.path)  # the gguf package opens it: refuse a FIFO or device first
        try:
            import gguf  # noqa: F401
            import transformers
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        except ImportError as e:
            raise CheckpointError(_MISSING_DEPS.format(path=self.path, error=e)) from None

        try:
            parsed = load_gguf_checkpoint(self.path, return_tensors=False)
            model = _meta_model(transformers, parsed["config"])
            parsed = load_gguf_checkpoint(self.path, return_tensors=True, model_to_load=model)
        except ImportError as e:
            raise CheckpointError(_MISSING_DEPS.format(path=self.path, error=e)) from None
        except CheckpointError:
            raise
        except Exception as e:  # the gguf parser raises many types on corrupt input
            raise CheckpointError(
                f"{self.path}: cannot read as GGUF ({type(e).__name__}: {e})"
            ) from None
        self.config: dict[str, Any] = dict(parsed["config"])
        self._tensors: dict[str, torch.Tensor] = dict(parsed["tensors"])
        if not self._tensors:
            raise CheckpointError(f"{self.path}: no tensor of this GGUF maps to a model parameter")


def _meta_model(transformers: Any, config: dict[str, Any]) -> torch.nn.Module:
    """An empty (meta-device) model of the GGUF's architecture, for the name mapping only."""
    cfg = transformers.AutoConfig.for_model(**config)
    classes = []
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            classes.append(cls)
    classes += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    last: Exception | None = None
    with torch.device("meta"):
        for build in classes:
            try:
                return build(cfg)
            except (ValueError, KeyError, TypeError) as e:
                last = e
    raise CheckpointError(f"no transformers model class fits this GGUF's config ({last})")
