"""A base checkpoint with a PEFT LoRA adapter folded in, tensor by tensor, without a model.

`LoraFoldedReader(base, adapter_dir, model_dir)` yields, for every tensor of `base`, what PEFT's
`PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()` would hold:

- a LoRA-adapted weight W becomes W + scale · B @ A (transposed when the config says
  fan_in_fan_out, as for GPT-2's Conv1D; reshaped to out×in×kh×kw for a Conv2d); an
  embedding becomes W + scale · (B @ A)ᵀ from lora_embedding_A/B; with lora_bias the bias
  gains scale · lora_B.bias;
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
the base dtype. So here: the adapter's typed deltas (`lora_reader.LoraFolder`: LowRank, Folded
DoRA, Dense lora_bias) in its compute dtype, float32 (float64 if the adapter is float64), go
through `splice.delta.apply_delta` with that dtype: (W in the promoted dtype + ΔW) cast to W's
dtype, DoRA's W' computed directly. Output dtypes and shapes are the base's.

Module-to-tensor mapping rule: the adapter module key K (saved key minus `base_model.model.`
and the LoRA suffix) names the module tensor `K.weight`, found among the base's names as
loading renames them (`checkpoint_keys.CheckpointKeys`: transformers' renamings when
``model_dir`` has a config.json, then prefix differences). No match, an ambiguous match, two
modules landing on one tensor, an adapted module PEFT's target_modules would not select, or a
shape that does not fit is a CheckpointError at open, before any tensor data is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from splice.delta import Delta, apply_delta
from splice.errors import CheckpointError
from splice.io.base import CheckpointReader, TensorInfo
from splice.peft.checkpoint_keys import CheckpointKeys
from splice.peft.lora_reader import LoraFolder, compute_dtype


class LoraFoldedReader:
    """`base_reader` with the LoRA adapter in `adapter_dir` merged in, lazily."""

    def __init__(
        self,
        base_reader: CheckpointReader,
        adapter_dir: str | os.PathLike[str],
        model_dir: Path | None = None,
    ) -> None:
        self.base = base_reader
        self.adapter_dir = Path(adapter_dir)
        self.path = f"{base_reader.path}+{self.adapter_dir}"
        self.adapter = LoraFolder.open(self.adapter_dir)
        self.config = self.adapter.config
        try:
            # base tensor -> (module, "weight" | "bias"); base tensor -> saved full tensor
            self._folds, self._replaced = self._plan(model_dir)
        except BaseException:
            self.adapter.close()
            raise

    def _plan(self, model_dir: Path | None) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
        weights = self.adapter.weights
        where = weights.path
        keys_of = CheckpointKeys.of(self.base.names(), model_dir)
        replaced_by: dict[str, str] = {}
        folded_by: dict[str, str] = {}

        def resolve(wanted: str, key: str, owner: dict[str, str]) -> str:
            try:
                name = keys_of.resolve(wanted)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: key '{key}': {e}") from None
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
        for name, key in self.adapter.full.items():
            target = resolve(name, key, replaced_by)
            self._check_shape(key, weights.info(key).shape, target)
            replaced[target] = key

        folds: dict[str, tuple[str, str]] = {}
        for module, keys in self.adapter.modules.items():
            assert keys.a is not None and keys.b is not None
            if not self.config.targets(module):
                raise CheckpointError(
                    f"{where}: has LoRA weights for module '{module}', which the adapter's "
                    f"target_modules {self.config.target_modules!r} do not select; PEFT would "
                    "ignore them, so the adapter is inconsistent"
                )
            out_shape = self.adapter.delta_shape(module)
            transpose = self.adapter.transposed(module)
            weight = resolve(module + ".weight", keys.a, folded_by)
            self._check_shape(keys.a, out_shape, weight, delta=True)
            if keys.magnitude is not None:
                if not self.config.use_dora:
                    raise CheckpointError(
                        f"{where}: module '{module}' has a DoRA magnitude vector but the config "
                        "does not set use_dora"
                    )
                features = out_shape[1] if transpose else out_shape[0]
                m_shape = tuple(weights.info(keys.magnitude).shape)
                # PEFT saves a convolution's magnitude as 1×out×1×… (Conv2d: 1×out×1×1)
                want = (
                    (1, features, *[1] * (len(out_shape) - 2))
                    if len(out_shape) > 2
                    else (features,)
                )
                if m_shape != want:
                    raise CheckpointError(
                        f"{where}: module '{module}': DoRA magnitude of shape {list(m_shape)}, "
                        f"expected {list(want)}"
                    )
            elif self.config.use_dora:
                raise CheckpointError(
                    f"{where}: use_dora is set but module '{module}' has no lora_magnitude_vector"
                )
            folds[weight] = (module, "weight")
            if keys.b_bias is not None:
                bias = resolve(module + ".bias", keys.b_bias, folded_by)
                self._check_shape(keys.b_bias, weights.info(keys.b_bias).shape, bias)
                folds[bias] = (module, "bias")
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
                f"{self.adapter.weights.path}: shape mismatch for base tensor '{target}': "
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
            weight = self.adapter.weights.read(self._replaced[name]).to(info.dtype)
        else:
            weight = self.base.read(name)
        fold = self._folds.get(name)
        if fold is None:
            return weight
        module, part = fold
        delta: Delta | None = (
            self.adapter.delta(module) if part == "weight" else self.adapter.bias_delta(module)
        )
        assert delta is not None
        return apply_delta(weight, delta, compute_dtype(*delta.tensors().values()))

    def close(self) -> None:
        """Close the adapter and the base."""
        self.adapter.close()
        self.base.close()
