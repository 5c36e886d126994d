"""The one registry of adapter methods.

An adapter method is a config class plus a builder:

- a *layer* method (LoRA, IA3, OFT, bottleneck, ...) builds one `AdapterModule` for one
  target layer: ``build(base_layer, config, path) -> AdapterModule | None`` (None: this layer
  type is not supported; the caller reports it);
- a *model* method (prompt / prefix tuning) builds one `ModelAdapter` for the whole model:
  ``build(model, config) -> ModelAdapter``.

Register with the decorator on the builder:

    @adapter_method(LoraConfig, peft_type="LORA")
    def build_lora(base, config, path): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from splice.adapters.config import AdapterConfig, AdapterConfigError

Kind = Literal["layer", "model"]


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    config_cls: type[AdapterConfig]
    build: Callable[..., Any]
    kind: Kind
    peft_type: str  # PEFT's type name, or "SPLICE_<NAME>" for methods PEFT lacks
    in_peft: bool  # PEFT has this method (its adapters load in PEFT)
    folds: bool = True  # the adapter is a weight delta that folds into the base exactly


_METHODS: dict[str, AdapterMethod] = {}
_BY_PEFT_TYPE: dict[str, AdapterMethod] = {}


def adapter_method(
    config_cls: type[AdapterConfig],
    *,
    name: str | None = None,
    peft_type: str | None = None,
    kind: Kind = "layer",
    folds: bool | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``build`` for ``config_cls``. ``name`` defaults to the config's `method`.
    ``peft_type`` None means PEFT lacks the method: splice writes ``SPLICE_<NAME>``.
    ``folds`` (default: ``kind == "layer"``) says whether the adapter is a weight delta that
    folds into the base; activation-space layer adapters (bottleneck) pass ``False``."""

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        method_name = name or config_cls.method
        if not method_name:
            raise ValueError(f"{config_cls.__name__}: no method name")
        if method_name in _METHODS:
            raise ValueError(f"adapter method '{method_name}' registered twice")
        ptype = peft_type or f"SPLICE_{method_name.upper()}"
        config_cls.method = method_name
        config_cls.peft_type = ptype
        m = AdapterMethod(
            method_name,
            config_cls,
            build,
            kind,
            ptype,
            peft_type is not None,
            kind == "layer" if folds is None else folds,
        )
        _METHODS[method_name] = m
        _BY_PEFT_TYPE[ptype] = m
        return build

    return deco


def _load_builtins() -> None:
    import splice.adapters.methods  # noqa: F401  (registers the built-in methods)


def get_adapter_method(name: str) -> AdapterMethod:
    _load_builtins()
    if name not in _METHODS:
        raise AdapterConfigError(
            f"unknown adapter method '{name}'; known: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def method_for_config(config: AdapterConfig) -> AdapterMethod:
    return get_adapter_method(type(config).method)


def method_for_peft_type(peft_type: str) -> AdapterMethod:
    _load_builtins()
    if peft_type not in _BY_PEFT_TYPE:
        raise AdapterConfigError(
            f"adapter type '{peft_type}' is not supported; supported: "
            f"{', '.join(sorted(_BY_PEFT_TYPE))}"
        )
    return _BY_PEFT_TYPE[peft_type]


def all_adapter_methods() -> list[AdapterMethod]:
    _load_builtins()
    return [_METHODS[k] for k in sorted(_METHODS)]


def make_config(method: str, params: dict[str, Any], where: str = "adapter") -> AdapterConfig:
    """A config for ``method`` from a plain dict (a YAML block, CLI flags)."""
    return get_adapter_method(method).config_cls.from_dict(params, where)
