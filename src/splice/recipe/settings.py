"""Resolve a parameter setting (scalar, layer gradient, filtered list) for one tensor.

Semantics follow mergekit's so its recipes behave the same:
- a scalar is its value;
- a list of numbers is a gradient: with t in [0, 1] (the layer's position in its slice),
  the value is linearly interpolated between neighbouring entries at t·(len−1); a list of
  non-numbers picks entry int(t·(len−1));
- a list of ``{filter, value}`` takes the first whose filter matches the tensor name
  (substring; ``re:REGEX`` is a regular expression searched in the name; ``*`` or no
  filter matches everything), then resolves its value; no match gives None, so the next,
  broader scope (model -> slice -> global -> method default) is asked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from splice.recipe.schema import ConditionalSetting, ParameterSetting

MISSING = object()


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def filter_matches(flt: str | None, tensor_name: str) -> bool:
    if flt is None or flt == "*":
        return True
    if flt.startswith("re:"):
        return _regex(flt[3:]).search(tensor_name) is not None
    return flt in tensor_name


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """The value a setting gives for ``tensor_name`` at layer position ``t`` (None: no match)."""
    if isinstance(setting, ConditionalSetting):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, ConditionalSetting) for e in setting):
            for cond in setting:
                if filter_matches(cond.filter, tensor_name):
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        if all(_is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def resolve(
    name: str, scopes: Iterable[Mapping[str, ParameterSetting] | None], tensor_name: str, t: float
) -> Any:
    """First non-None value of parameter ``name`` over scopes, narrowest first; else MISSING."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return MISSING
