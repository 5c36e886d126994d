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


def __getattr__(
    name: str,
):  # config classes of the built-in methods, e.g. splice.adapters.LoraConfig
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
    "make_config",
    "read_adapter_config",
    "save_adapter",
]
