"""The options of a routed mixture (`splice.compose.mixture`), strict: as ``splice train
--method mixture`` parameters, in YAML, and in a saved mixture's ``mixture_config.json``.

    experts: {sst: out/sst-lora, news: out/news-lora}   # name -> expert adapter folder
    gate: token            # token (per token, per layer) | sequence (one per sequence)
    top_k: 2               # keep the k most probable experts; null: dense
    renormalize: true      # divide the kept probabilities by their sum (false: keep p_i)
    balance_coef: 0.01     # weight of the load-balancing loss in the training loss
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from splice.config_errors import StrictConfig, parse_config
from splice.errors import SpliceError

GateKind = Literal["token", "sequence"]


class MixtureError(SpliceError):
    """A routed mixture's experts, options or saved folder are invalid."""


class MixtureOptions(StrictConfig):
    """How the gate routes (the experts are named separately)."""

    gate: GateKind = "token"
    top_k: int | None = Field(None, ge=1)
    renormalize: bool = True
    balance_coef: float = Field(0.0, ge=0)


class MixtureConfig(MixtureOptions):
    """The options plus the experts: adapter name -> adapter folder (None: already loaded)."""

    experts: dict[str, str | None]


def parse_mixture_config(data: Any, where: str) -> MixtureConfig:
    """`MixtureConfig` from a mapping, or a one-line `MixtureError` naming the key."""
    if isinstance(data, dict) and not data.get("experts"):
        raise MixtureError(f"{where}: name the experts (--expert NAME=PATH, at least two)")
    config = parse_config(MixtureConfig, data, where, MixtureError, list_valid=True)
    n = len(config.experts)
    if n < 2:
        raise MixtureError(f"{where}: a mixture needs at least two experts, got {n}")
    if config.top_k is not None and config.top_k > n:
        raise MixtureError(f"{where}: top_k={config.top_k} but the mixture has {n} experts")
    return config
