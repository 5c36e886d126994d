"""Adapter configurations: strict pydantic models, one class per method.

Every config rejects unknown keys (with the closest valid key in the message) and NaN /
±inf numbers (also when read from an adapter_config.json), and is immutable. `to_peft` /
`from_peft` translate to and from PEFT's `adapter_config.json`:
splice's field names are PEFT's where PEFT has the method, so a round trip is the identity.

Targeting fields shared by the layer-wrapping methods (PEFT's semantics):
- ``target_modules``: a list matches a module whose dotted name equals an entry or ends
  with ``.entry``; a string is a regex that must match the whole name; ``"all-linear"``
  selects every ``nn.Linear`` / GPT-2 ``Conv1D`` except the model's output layer.
- ``exclude_modules``: same rules; wins over ``target_modules``.
- ``modules_to_save``: modules trained in full (a copy of each is the adapter), e.g. a
  classification head; saved under the module's own parameter names, as PEFT does.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from splice.config_errors import did_you_mean
from splice.errors import SpliceError
from splice.numbers import FINITE


class AdapterConfigError(SpliceError):
    """An adapter config is invalid or names an unknown option."""


# Bookkeeping keys of PEFT's adapter_config.json that carry no adapter semantics.
PEFT_BOOKKEEPING = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
    }
)


class AdapterConfig(BaseModel):
    """Base of every adapter config."""

    model_config = ConfigDict(extra="forbid", frozen=True, **FINITE)  # NaN / inf: errors

    # Set by the registry: the method name ("lora") and the type name written to PEFT's
    # adapter_config.json ("LORA"; splice-only methods use "SPLICE_<NAME>").
    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    # PEFT keys this config does not model but accepts on load when they hold PEFT's
    # default (a value that changes nothing), e.g. {"megatron_core": "megatron.core"}.
    peft_inert_defaults: ClassVar[dict[str, Any]] = {}

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "adapter config") -> AdapterConfig:
        """Validate a plain dict (from YAML, flags or JSON); unknown keys are errors."""
        unknown = [k for k in data if k not in cls.model_fields]
        if unknown:
            k = unknown[0]
            hint = did_you_mean(k, cls.model_fields)
            raise AdapterConfigError(
                f"{where}: unknown key '{k}' for method '{cls.method}'{hint}; "
                f"valid keys: {', '.join(cls.model_fields)}"
            )
        try:
            return cls(**data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise AdapterConfigError(f"{where}: '{loc}': {err['msg']}") from None

    def for_targets(self, model: Any, targets: list[tuple[str, Any]]) -> AdapterConfig:
        """Hook, called once per `add_adapter` after targeting and before any layer is built,
        with the model and the (path, base layer) targets: a method whose layers depend on
        the model or on all the targets together (IA3's per-architecture
        ``feedforward_modules``, VeRA's shared projections sized to the largest target)
        returns a completed copy here. The default changes nothing."""
        return self

    def to_peft(self) -> dict[str, Any]:
        """The adapter_config.json content (PEFT fills any field it has and we omit)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        out.update(self.model_dump(mode="json"))
        return out

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str = "adapter_config.json") -> AdapterConfig:
        """Read PEFT's adapter_config.json. A PEFT option splice does not model is accepted
        only when it is inert (null, false, empty, or its listed default); otherwise it is a
        clear error rather than a silently different adapter."""
        own: dict[str, Any] = {}
        for k, v in data.items():
            if k in cls.model_fields:
                own[k] = v
            elif (
                k in PEFT_BOOKKEEPING
                or v in (None, False, {}, [], "")
                or (k in cls.peft_inert_defaults and cls.peft_inert_defaults[k] == v)
            ):
                continue
            else:
                raise AdapterConfigError(
                    f"{where}: PEFT option {k}={v!r} is not supported by splice's "
                    f"'{cls.method}' adapter"
                )
        return cls.from_dict(own, where)
