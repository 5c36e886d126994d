"""A base checkpoint with a PEFT LoRA adapter folded in, tensor by tensor, without a model.

`LoraFoldedReader(base, adapter_dir)` yields, for every tensor of `base`, what PEFT's
`PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()` would hold:

- a LoRA-adapted weight W becomes W + scale · B @ A (transposed when the config says
  fan_in_fan_out, as for GPT-2's Conv1D); an embedding becomes W + scale · (B @ A)ᵀ from
  lora_embedding_A/B; with lora_bias the bias gains scale · lora_B.bias;
- a DoRA-adapted weight (use_dora, a saved ``lora_magnitude_vector`` m) becomes
  W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature (the norm over the input dimension: rows
  of W for a linear layer, columns of an embedding, rows of Wᵀ for a Conv1D), ΔW as above —
  PEFT's DoRA merge; the bias is not rescaled;
- a full tensor saved in the adapter (modules_to_save, trained biases, an embedding's saved
  base layer) replaces the base tensor, cast to the base dtype, as loading it would;
- every other tensor is the base tensor unchanged.

Arithmetic (what PEFT does with its defaults): PEFT upcasts fp16/bf16 adapter weights to
float32 at load (`autocast_adapter_dtype=True`), computes the delta in that dtype, and adds it
in place to the base weight, which PyTorch computes in the promoted dtype and rounds once to
the base dtype. So here: delta = (B.float() @ A.float()) [ᵀ] · scale in float32 (float64 if the
adapter is float64), result = (W in the promoted dtype + delta) cast to W's dtype. Output dtypes
and shapes are the base's.

Module-to-tensor mapping rule: the adapter module key K (saved key minus `base_model.model.`
and the LoRA suffix) names the base tensor `K.weight`. When the base checkpoint spells names
differently, the first of these that exists is used: `K.weight` itself; `K.weight` with leading
dotted components removed one at a time (adapter trained on `LlamaForCausalLM`, base saved as
`LlamaModel` without `model.`); the unique base name ending in `.K.weight` (the reverse). No
match, an ambiguous match, two modules landing on one tensor, an adapted module PEFT's
target_modules would not select, or a shape that does not fit is a CheckpointError at open,
before any tensor data is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.delta.folded import dora_factor
from splice.errors import CheckpointError
from splice.io.base import CheckpointReader, TensorInfo
from splice.io.peft_adapter import (
    LoraAdapterConfig,
    LoraModuleKeys,
    classify_keys,
    load_lora_config,
    open_adapter_weights,
)


@dataclass(frozen=True)
class _Fold:
    """How to compute one output tensor: base plus a LoRA delta, or a bias delta."""

    keys: LoraModuleKeys
    scale: float
    transpose: bool
    bias: bool = False
    dora: bool = False


class LoraFoldedReader:
    """`base_reader` with the LoRA adapter in `adapter_dir` merged in, lazily."""

    def __init__(self, base_reader: CheckpointReader, adapter_dir: str | os.PathLike[str]) -> None:
        self.base = base_reader
        self.adapter_dir = Path(adapter_dir)
        self.path = f"{base_reader.path}+{self.adapter_dir}"
        self.config: LoraAdapterConfig = load_lora_config(self.adapter_dir)
        self.adapter = open_adapter_weights(self.adapter_dir)
        try:
            self._folds, self._replaced = self._plan()
        except BaseException:
            self.adapter.close()
            raise

    def _plan(self) -> tuple[dict[str, _Fold], dict[str, str]]:
        where = self.adapter.path
        modules, full = classify_keys(where, self.adapter.names())
        base_names = self.base.names()
        base_set = set(base_names)
        replaced_by: dict[str, str] = {}
        folded_by: dict[str, str] = {}

        def resolve(wanted: str, key: str, owner: dict[str, str]) -> str:
            name = resolve_tensor_name(wanted, base_set, base_names)
            if name is None:
                raise CheckpointError(
                    f"{where}: key '{key}' matches no tensor of the base {self.base.path} "
                    f"(looked for '{wanted}')"
                )
            if name == "":
                raise CheckpointError(
                    f"{where}: key '{key}' matches several base tensors ending in '{wanted}'"
                )
            if name in owner:
                raise CheckpointError(
                    f"{where}: keys '{owner[name]}' and '{key}' both map to base tensor '{name}'"
                )
            owner[name] = key
            return name

        replaced: dict[str, str] = {}
        for name, key in full.items():
            target = resolve(name, key, replaced_by)
            self._check_shape(key, self.adapter.info(key).shape, target)
            replaced[target] = key

        folds: dict[str, _Fold] = {}
        for module, keys in modules.items():
            assert keys.a is not None and keys.b is not None
            if not self.config.targets(module):
                raise CheckpointError(
                    f"{where}: has LoRA weights for module '{module}', which the adapter's "
                    f"target_modules {self.config.target_modules!r} do not select; PEFT would "
                    "ignore them, so the adapter is inconsistent"
                )
            a, b = self.adapter.info(keys.a), self.adapter.info(keys.b)
            r = self.config.rank_for(module)
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise CheckpointError(
                    f"{where}: module '{module}': LoRA factors of shapes {list(a.shape)} and "
                    f"{list(b.shape)}; only linear and embedding LoRA (2-D factors) fold yet"
                )
            if a.shape[0] != r or b.shape[1] != r:
                raise CheckpointError(
                    f"{where}: module '{module}': LoRA shapes A {list(a.shape)}, B "
                    f"{list(b.shape)} do not have the configured rank r={r}"
                )
            transpose = keys.embedding or self.config.fan_in_fan_out
            out_shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            weight = resolve(module + ".weight", keys.a, folded_by)
            self._check_shape(keys.a, out_shape, weight, delta=True)
            scale = self.config.scale_for(module)
            if keys.magnitude is not None:
                if not self.config.use_dora:
                    raise CheckpointError(
                        f"{where}: module '{module}' has a DoRA magnitude vector but the config "
                        "does not set use_dora"
                    )
                features = out_shape[1] if transpose else out_shape[0]
                m_shape = tuple(self.adapter.info(keys.magnitude).shape)
                if m_shape != (features,):
                    raise CheckpointError(
                        f"{where}: module '{module}': DoRA magnitude of shape {list(m_shape)}, "
                        f"expected [{features}]"
                    )
            elif self.config.use_dora:
                raise CheckpointError(
                    f"{where}: use_dora is set but module '{module}' has no lora_magnitude_vector"
                )
            folds[weight] = _Fold(keys, scale, transpose, dora=keys.magnitude is not None)
            if keys.b_bias is not None:
                bias = resolve(module + ".bias", keys.b_bias, folded_by)
                self._check_shape(keys.b_bias, self.adapter.info(keys.b_bias).shape, bias)
                folds[bias] = _Fold(keys, scale, False, bias=True)
        return folds, replaced

    def _check_shape(
        self, key: str, shape: tuple[int, ...], target: str, delta: bool = False
    ) -> None:
        base_shape = self.base.info(target).shape
        if tuple(shape) != tuple(base_shape):
            what = "the LoRA delta B@A" if delta else "the saved tensor"
            hint = ""
            if delta and tuple(reversed(shape)) == tuple(base_shape):
                hint = " (transposed: is fan_in_fan_out set right in adapter_config.json?)"
            raise CheckpointError(
                f"{self.adapter.path}: shape mismatch for base tensor '{target}': "
                f"{what} of '{key}' is {list(shape)}, the base has {list(base_shape)}{hint}"
            )

    def names(self) -> list[str]:
        """The base checkpoint's tensor names."""
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        """The base tensor's info (folding changes values, never shapes or dtypes)."""
        return self.base.info(name)

    def is_modified(self, name: str) -> bool:
        """Whether the adapter changes this tensor."""
        return name in self._folds or name in self._replaced

    def read(self, name: str) -> torch.Tensor:
        """The folded tensor, in the base dtype."""
        info = self.base.info(name)
        if name in self._replaced:
            weight = self.adapter.read(self._replaced[name]).to(info.dtype)
        else:
            weight = self.base.read(name)
        fold = self._folds.get(name)
        if fold is None:
            return weight
        if fold.bias:
            assert fold.keys.b_bias is not None
            delta = _compute(self.adapter.read(fold.keys.b_bias)) * fold.scale
        else:
            assert fold.keys.a is not None and fold.keys.b is not None
            a = _compute(self.adapter.read(fold.keys.a))
            b = _compute(self.adapter.read(fold.keys.b))
            product = b @ a
            delta = (product.T if fold.transpose else product) * fold.scale
        dtype = torch.promote_types(weight.dtype, delta.dtype)
        if fold.dora:
            assert fold.keys.magnitude is not None
            magnitude = _compute(self.adapter.read(fold.keys.magnitude))
            return _dora(weight.to(dtype), delta, magnitude, fold.transpose).to(info.dtype)
        return (weight.to(dtype) + delta).to(info.dtype)

    def close(self) -> None:
        """Close the adapter and the base."""
        self.adapter.close()
        self.base.close()


def _dora(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature: rows of W, or of Wᵀ when ``transpose``
    (Conv1D's in×out storage, embeddings), as PEFT's DoRA merge."""
    merged = weight + delta
    if transpose:
        return dora_factor(magnitude, weight.T, delta.T).view(1, -1) * merged
    return dora_factor(magnitude, weight, delta).view(-1, 1) * merged


def _compute(t: torch.Tensor) -> torch.Tensor:
    """PEFT's compute dtype for adapter weights: half precisions upcast to float32."""
    if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
        return t.float()
    return t


def resolve_tensor_name(wanted: str, base_set: set[str], base_names: list[str]) -> str | None:
    """The base tensor name for adapter name `wanted`; None if none, "" if ambiguous."""
    if wanted in base_set:
        return wanted
    parts = wanted.split(".")
    for i in range(1, len(parts) - 1):
        shorter = ".".join(parts[i:])
        if shorter in base_set:
            return shorter
    longer = [n for n in base_names if n.endswith("." + wanted)]
    if len(longer) == 1:
        return longer[0]
    return "" if longer else None
