"""Adapters: inject, train, save, load and fold parameter-efficient adapters on any
`torch.nn.Module` (Hugging Face models first). See `splice.adapters.model.AdapterModel`."""

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdaptedLayer, AdapterModule, AdapterStateError
from splice.adapters.model import AdapterModel
from splice.adapters.model_adapter import ModelAdapter
from splice.adapters.peft_format import (
    adapter_state,
    load_adapter,
    load_adapter_model,
    read_adapter_config,
    save_adapter,
)
from splice.adapters.registry import (
    adapter_method,
    all_adapter_methods,
    get_adapter_method,
    make_config,
)

# helpers living in method modules, imported on first use (a method module loads them all)
_LAZY = {
    "loraplus_param_groups": "splice.adapters.methods.loraplus",
    "save_as_lora": "splice.adapters.methods.lora_init",
}


def __getattr__(
    name: str,
):  # config classes of the built-in methods, e.g. splice.adapters.LoraConfig
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    for m in all_adapter_methods():
        if m.config_cls.__name__ == name:
            return m.config_cls
    raise AttributeError(name)


__all__ = [
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterModel",
    "AdapterModule",
    "AdapterStateError",
    "ModelAdapter",
    "adapter_method",
    "adapter_state",
    "all_adapter_methods",
    "get_adapter_method",
    "load_adapter",
    "load_adapter_model",
    "loraplus_param_groups",
    "make_config",
    "read_adapter_config",
    "save_adapter",
    "save_as_lora",
]
