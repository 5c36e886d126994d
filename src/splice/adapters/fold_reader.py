"""`BASE+ADAPTER` for every foldable adapter type: a lazy checkpoint reader that returns the
base tensors with the adapter's delta added (DESIGN.md: adapters are deltas, so the merge
engine merges adapters and full fine-tunes alike).

PEFT LoRA / DoRA adapters are folded by `splice.peft.fold` (pure tensor arithmetic, bit
for bit PEFT's ``merge_and_unload``). Every other type (IA3, VeRA, LoHa, LoKr, OFT, HRA,
LN tuning, BitFit, and LoRA too if asked) goes through the adapter's own ``delta`` here:

1. The base's ``config.json`` gives the architecture; the model is built on the ``meta``
   device (no memory), with the class the adapter was trained on (its ``task_type``:
   causal LM, sequence classification, ...), and the adapter is injected into it, so
   targets resolve exactly as at training time.
2. Reading a tensor the adapter changes materializes only that layer: the base layer's
   tensors from the checkpoint (found by `splice.peft.checkpoint_keys`, as transformers
   renames them at load) and the adapter's from the adapter file, then ``base + delta``
   (`splice.delta.apply_delta`, float32), cast to the base dtype.

Activation-space adapters (bottleneck, prompt / prefix tuning) have no weight delta: they
are refused with a clear error.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from splice.delta import apply_delta
from splice.errors import CheckpointError
from splice.io.base import CheckpointReader, TensorInfo
from splice.io.safe_paths import member
from splice.peft.checkpoint_keys import CheckpointKeys, meta_model
from splice.peft.files import SAVED_PREFIX, read_weights, saved_key

_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
_NAME = "fold"


class AdapterFoldedReader:
    """``base_reader`` with the adapter at ``adapter_dir`` folded in, lazily."""

    def __init__(
        self,
        base_reader: CheckpointReader,
        adapter_dir: str | os.PathLike[str],
        model_dir: Path | None,
    ) -> None:
        from splice.adapters.model import AdapterModel
        from splice.adapters.peft_format import read_adapter_config

        self.base = base_reader
        self.adapter_dir = Path(adapter_dir)
        self.path = f"{base_reader.path}+{self.adapter_dir}"
        method, raw = read_adapter_config(self.adapter_dir)
        if method.kind == "model":
            raise CheckpointError(
                f"{self.adapter_dir}: a {method.name} adapter acts on the model's inputs and "
                "has no weight delta to fold"
            )
        config = method.config_cls.from_peft(raw, where=str(self.adapter_dir))
        if getattr(config, "save_projection", True) is False:
            raise CheckpointError(
                f"{self.adapter_dir}: this {method.name} adapter was saved without its shared "
                "projections (save_projection: false); load it with splice.adapters and fold "
                "it there (AdapterModel.merge_and_unload), or save it with save_projection: true"
            )
        if model_dir is None or member(model_dir, "config.json") is None:
            raise CheckpointError(
                f"{self.path}: folding a {method.name} adapter needs the base model's "
                "config.json next to its weights"
            )
        weights = read_weights(self.adapter_dir)
        num_labels = None
        for name in config.modules_to_save or []:  # a classification head's saved size
            for k, v in weights.items():
                if (
                    k.startswith(SAVED_PREFIX)
                    and f".{name}." in f".{k.removeprefix(SAVED_PREFIX)}"
                    and v.ndim == 2
                ):
                    num_labels = v.shape[0]
        try:
            task = _TASK_CLASSES.get(raw.get("task_type") or "")
            skeleton = meta_model(model_dir, task, num_labels)
            self._am = AdapterModel(skeleton)
            self._am.add_adapter(_NAME, config)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot rebuild the adapted model: {e}") from None
        self._weights = weights
        keys_of = CheckpointKeys.of(self.base.names(), model_dir, skeleton)
        # checkpoint tensor name -> (layer path, parameter name in the layer)
        self._targets: dict[str, tuple[str, str]] = {}
        # layer path -> {parameter name: checkpoint tensor name}
        self._layer_names: dict[str, dict[str, str]] = {}
        expected: set[str] = set()
        for path, module in self._am.named_adapter_modules(_NAME):
            layer = self._am.model.get_submodule(path)
            if not module.foldable:
                raise CheckpointError(
                    f"{self.adapter_dir}: a {method.name} adapter acts on activations and "
                    "has no weight delta to fold"
                )
            for key in module.peft_state():
                expected.add(saved_key(path, key))
            expected.update(module.shared_state())
            for pname, _ in layer.base_layer.named_parameters():
                name = keys_of.resolve(f"{path}.{pname}")
                if not name:
                    raise CheckpointError(
                        f"{self.path}: the base has no tensor for '{path}.{pname}'"
                        + (" (ambiguous)" if name == "" else "")
                    )
                self._targets[name] = (path, pname)
                self._layer_names.setdefault(path, {})[pname] = name
        unexpected = sorted(set(weights) - expected)
        missing = sorted(expected - set(weights))
        if unexpected or missing:
            raise CheckpointError(
                f"{self.adapter_dir}: adapter tensors do not match the model: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def is_modified(self, name: str) -> bool:
        return name in self._targets

    def read(self, name: str) -> torch.Tensor:
        weight = self.base.read(name)
        target = self._targets.get(name)
        if target is None:
            return weight
        path, pname = target
        layer = self._am.model.get_submodule(path)
        base = copy.deepcopy(layer.base_layer).to_empty(device="cpu")
        with torch.no_grad():
            params = dict(base.named_parameters())
            for p, tensor_name in self._layer_names[path].items():
                params[p].copy_(self.base.read(tensor_name).to(params[p].dtype))
        # the adapter's structure from the skeleton; every tensor comes from the file
        adapter = copy.deepcopy(layer.adapters[_NAME]).to_empty(device="cpu")
        prefix = saved_key(path, "")
        own = set(adapter.peft_state())
        state = {k[len(prefix) :]: v for k, v in self._weights.items() if k.startswith(prefix)}
        adapter.load_peft_state({k: v for k, v in state.items() if k in own}, str(self.adapter_dir))
        shared = set(adapter.shared_state())
        if shared:
            adapter.load_shared_state(
                {k: v for k, v in self._weights.items() if k in shared}, str(self.adapter_dir)
            )
        with torch.no_grad():
            delta = adapter.delta(base).get(pname)
        if delta is None:  # the adapter leaves this parameter of the layer alone
            return weight
        return apply_delta(weight, delta)

    def close(self) -> None:
        self.base.close()
