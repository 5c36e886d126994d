"""Which base-checkpoint tensor an adapter's module path names.

An adapter's keys follow the module names of the model it was trained on; a checkpoint's keys
are what `save_pretrained` wrote, and recent transformers renames between the two (ViT's
``encoder.layer.0.attention.attention.query`` on disk is the module
``layers.0.attention.q_proj``; old checkpoints spell LayerNorm ``gamma`` / ``beta``). So the
base names are first renamed the way loading renames them, then the adapter's names are
looked up among the renamed ones:

1. Renaming (`CheckpointKeys.of(names, model_dir)`): with the base's ``config.json`` next to
   its weights, the model class is built on the ``meta`` device and transformers' own
   load-time renaming is applied to every checkpoint key: transformers ≥ 5 the
   ``WeightRenaming`` transforms of ``conversion_mapping.get_model_conversion_mapping`` (in
   order, scoped to their sub-models, legacy renamings included, as ``from_pretrained``);
   older versions the class's ``_checkpoint_conversion_mapping`` (the first regex that
   matches). A key that a ``WeightConverter`` transforms (fused, split or permuted tensors,
   e.g. MoE experts) has no one-to-one module parameter: adapting it is refused. Without a
   config.json (a bare checkpoint file) or a model transformers does not know, names are
   taken as they are.
2. Lookup (`resolve`): the module tensor name K itself; K with leading dotted components
   removed one at a time (an adapter trained on ``LlamaForCausalLM``, a base saved as
   ``LlamaModel`` without ``model.``); the unique name ending in ``.K`` (the reverse). The
   checkpoint key of the name found is returned; None when none matches, "" when several do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.io.safe_paths import member


@dataclass(frozen=True)
class CheckpointKeys:
    """The base checkpoint's names as the model's modules spell them."""

    by_module_name: dict[str, str]  # module tensor name -> checkpoint key ("" when converted)

    @classmethod
    def of(
        cls, names: list[str], model_dir: Path | None, model: torch.nn.Module | None = None
    ) -> CheckpointKeys:
        """Rename `names` (the base's keys) as loading the model in `model_dir` would;
        `model`: that model already built (on the meta device), else it is built here."""
        by_module: dict[str, str] = {}
        renamed = _load_time_names(names, model_dir, model)
        for key, (module_name, converted) in zip(names, renamed):
            # a converted tensor, or two keys landing on one name: no one-to-one key ("")
            by_module[module_name] = "" if converted or module_name in by_module else key
        return cls(by_module)

    def resolve(self, wanted: str) -> str | None:
        """The checkpoint key for module tensor name `wanted`; None if none, "" if ambiguous.
        CheckpointError when transformers converts (not just renames) that tensor."""
        name = _lookup(wanted, self.by_module_name)
        if not name:
            return name
        key = self.by_module_name[name]
        if not key:
            raise CheckpointError(
                f"module tensor '{name}' is built by transformers from several checkpoint "
                "tensors (fused, split or permuted at load); an adapter on it cannot be folded "
                "tensor by tensor"
            )
        return key


def _lookup(wanted: str, names: dict[str, str]) -> str | None:
    if wanted in names:
        return wanted
    parts = wanted.split(".")
    for i in range(1, len(parts) - 1):
        shorter = ".".join(parts[i:])
        if shorter in names:
            return shorter
    longer = [n for n in names if n.endswith("." + wanted)]
    if len(longer) == 1:
        return longer[0]
    return "" if longer else None


def _load_time_names(
    names: list[str], model_dir: Path | None, model: torch.nn.Module | None
) -> list[tuple[str, bool]]:
    """(module tensor name, converted?) for each checkpoint key, as `from_pretrained` renames."""
    if model is None:
        if model_dir is None or member(model_dir, "config.json") is None:
            return [(n, False) for n in names]
        try:
            model = meta_model(model_dir)
        except Exception:  # an unknown or custom architecture: names are taken as they are
            return [(n, False) for n in names]
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: one regex table on the class
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        return [(_first_sub(mapping, n), False) for n in names]
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out = []
    for name in names:
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        converted = False
        for converter in converters:
            name, pattern = converter.rename_source_key(name)
            if pattern is not None:
                converted = True
                break
        out.append((name, converted))
    return out


def _first_sub(mapping: dict[str, str], key: str) -> str:
    for pattern, replacement in mapping.items():
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def meta_model(
    model_dir: Path, auto_class: str | None = None, num_labels: int | None = None
) -> torch.nn.Module:
    """The model of ``model_dir/config.json`` built on the meta device (no memory): with
    `auto_class` (e.g. "AutoModelForCausalLM") that class, else the config's first
    architecture, else AutoModel; `num_labels` overrides the config's."""
    import transformers
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config checks warn about fields the weights don't need
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        if num_labels:
            config.num_labels = num_labels
        auto = getattr(transformers, auto_class or "", None)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        with torch.device("meta"):
            if auto is not None:
                return auto.from_config(config)
            if cls is None:
                return transformers.AutoModel.from_config(config)
            return cls._from_config(config)
    finally:
        hf_logging.set_verbosity(level)
