"""Recipes over LoRA adapters: which representation a recipe merges in, and the low-rank run.

A *bare adapter* is a model reference naming a PEFT adapter folder (adapter_config.json
inside, no `BASE+` in front). `route(recipe)` decides, before anything is read:

- **low_rank**: every model is a bare LoRA adapter and a low-rank method of the recipe's
  name is registered (`splice methods` lists them; `lora:NAME` asks for one explicitly).
  The method merges each module's factors and the output is a PEFT LoRA adapter folder
  (`merge_low_rank_recipe`). So `method: ties` over adapter folders is the low-rank `ties`
  (TIES on each module's ΔW, re-factorized to rank r), over checkpoints the dense `ties`.
- **dense**: otherwise. Each bare adapter is folded into the base, its reference rewritten
  to `BASE+ADAPTER` (the slice's base_model, else the recipe's), and the engine merges
  checkpoints as for any recipe: a LoRA next to a full fine-tune, or a method without a
  low-rank form (`linear`, `della`, ...) over adapters, gives a dense checkpoint.
  `BASE+ADAPTER` written by hand always folds.

Errors: `lora:NAME` with a model that is not a bare LoRA adapter; a low-rank-only method
(`svd`, `concat`, ...) over checkpoints; bare adapters with no base to fold them into.

The low-rank run takes the recipe's keys as the engine does: `parameters` (global) and each
model's `parameters` (per-model values), scalars or `{filter, value}` lists matched against
`<module>.weight` (the name of the tensor the module's delta lands on); `seed`; the output
dtype is `out_dtype`, else `dtype`, else float32 (factors are computed in float32; float64
adapters stay float64). `base_model`, when given, is recorded but not read. Keys that only
make sense for checkpoints (slices, lines, tokenizer_source, on_missing, layer gradients)
are refused with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from splice.config_errors import did_you_mean
from splice.errors import MergeValidationError
from splice.io.dtypes import DTYPE_BY_NAME
from splice.lora_merge.merge import LoraMergeReport, merge_adapters
from splice.merge.registry import (
    LOW_RANK_PREFIX,
    MergeMethod,
    ParamSpec,
    Representation,
    all_methods,
    get_method,
)
from splice.peft.files import peft_type
from splice.recipe.schema import ConditionalSetting, Parameters, Recipe
from splice.recipe.settings import MISSING, resolve


@dataclass(frozen=True)
class RoutedRecipe:
    recipe: Recipe  # with bare adapters rewritten to BASE+ADAPTER on the dense route
    representation: Representation  # of the output
    folded: list[str] = field(default_factory=list)  # adapters folded into a base


def _low_rank_names() -> list[str]:
    return [m.name for m in all_methods("low_rank")]


def route(recipe: Recipe) -> RoutedRecipe:
    """The representation ``recipe`` merges in (rules in the module docstring)."""
    name = recipe.method_name
    plain = name.removeprefix(LOW_RANK_PREFIX)
    refs = [e.model for e in recipe.models or []]
    refs += [src.model for s in recipe.slices or [] for src in s.sources]
    kinds = {ref: peft_type(ref) for ref in refs}
    low_rank_only = plain not in {m.name for m in all_methods()}
    all_lora = bool(recipe.models) and all(kinds[r] == "LORA" for r in refs)
    if name.startswith(LOW_RANK_PREFIX) or (
        plain in _low_rank_names() and (low_rank_only or all_lora)
    ):
        get_method(plain, "low_rank")  # unknown: an error listing the low-rank methods
        if recipe.slices:
            raise MergeValidationError(f"method '{name}' takes `models`, not `slices`")
        other = [r for r in refs if kinds[r] != "LORA"]
        if other:
            raise MergeValidationError(
                f"method '{name}' merges PEFT LoRA adapter folders only; {other[0]} is not "
                "one (to fold adapters into a base, use a dense method: `splice methods`)"
            )
        return RoutedRecipe(recipe, "low_rank")
    if not any(kinds.values()):
        return RoutedRecipe(recipe, "dense")
    return _fold(recipe, kinds)


def _fold(recipe: Recipe, kinds: dict[str, str | None]) -> RoutedRecipe:
    """The recipe with each bare adapter folded into its base (`BASE+ADAPTER`)."""
    folded: list[str] = []

    def ref(model: str, base: str | None, where: str) -> str:
        if kinds.get(model) is None:
            return model
        if base is None:
            raise MergeValidationError(
                f"{where}: {model} is a PEFT adapter folder; folding it needs a base_model "
                f"(or merge adapters only, with a low-rank method: {', '.join(_low_rank_names())})"
            )
        folded.append(model)
        return f"{base}+{model}"

    data = recipe.model_dump(exclude_unset=True)
    for i, e in enumerate(data.get("models") or []):
        e["model"] = ref(e["model"], recipe.base_model, f"models[{i}]")
    for si, s in enumerate(data.get("slices") or []):
        base = s.get("base_model") or recipe.base_model
        for j, src in enumerate(s["sources"]):
            src["model"] = ref(src["model"], base, f"slices[{si}].sources[{j}]")
    return RoutedRecipe(Recipe.model_validate(data), "dense", list(dict.fromkeys(folded)))


# -- the low-rank run ---------------------------------------------------------------------


def _refuse_checkpoint_keys(recipe: Recipe, method: MergeMethod) -> None:
    given = [k for k in ("slices", "lines", "tokenizer_source") if getattr(recipe, k) is not None]
    given += ["on_missing"] if recipe.on_missing != "error" else []
    given += [
        f"models[{i}].tensor_prefix" for i, e in enumerate(recipe.models or []) if e.tensor_prefix
    ]
    if given:
        raise MergeValidationError(
            f"'{given[0]}' applies to checkpoint merges; method '{method.label}' merges LoRA "
            "adapters module by module (every adapter must adapt the same modules)"
        )


def _is_gradient(setting: Any) -> bool:
    """A list of values interpolated over the layer index (at any level of a setting)."""
    if isinstance(setting, ConditionalSetting):
        return isinstance(setting.value, list)
    if isinstance(setting, list):
        conditions = [v for v in setting if isinstance(v, ConditionalSetting)]
        return len(conditions) < len(setting) or any(map(_is_gradient, conditions))
    return False


def _check_params(
    params: Parameters | None, method: MergeMethod, where: str, per_model: bool
) -> None:
    known = {p.name: p for p in method.params}
    for key, setting in (params or {}).items():
        if key not in known:
            raise MergeValidationError(
                f"{where}: method '{method.label}' has no parameter '{key}'"
                f"{did_you_mean(key, known)}; its parameters: {sorted(known) or 'none'}"
            )
        if per_model and not known[key].per_model:
            raise MergeValidationError(
                f"{where}: '{key}' is a global parameter of '{method.label}'; "
                "set it under the top-level 'parameters'"
            )
        if _is_gradient(setting):
            raise MergeValidationError(
                f"{where}: '{key}' is a layer gradient; LoRA-native merges take scalars or "
                "{filter, value} lists (a gradient needs the base model's layer count)"
            )
        spec = known[key]
        conditions = setting if isinstance(setting, list) else [setting]
        for c in conditions:  # every value checked before any adapter is read
            value = c.value if isinstance(c, ConditionalSetting) else c
            spec.validate([value] if spec.per_model else value, where)


def _value(p: ParamSpec, method: MergeMethod, scopes: Iterable[Parameters | None], name: str):
    """The setting's value for tensor ``name`` (narrowest scope first), else the default."""
    v = resolve(p.name, scopes, name, 0.0)
    if v is not MISSING:
        return v
    if p.required:
        raise MergeValidationError(
            f"module '{name.removesuffix('.weight')}': method '{method.label}' needs "
            f"parameter '{p.name}'"
        )
    return p.default


def merge_low_rank_recipe(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> LoraMergeReport:
    """Run a recipe `route` sends to low_rank: a PEFT LoRA adapter folder at ``out_dir``."""
    method = get_method(recipe.method_name.removeprefix(LOW_RANK_PREFIX), "low_rank")
    assert recipe.models is not None
    _refuse_checkpoint_keys(recipe, method)
    _check_params(recipe.parameters, method, "parameters", False)
    for i, e in enumerate(recipe.models):
        _check_params(e.parameters, method, f"models[{i}] ({e.model})", True)

    def params_for(module: str) -> dict[str, Any]:
        name, where = f"{module}.weight", f"module '{module}'"
        out: dict[str, Any] = {}
        for p in method.params:
            if p.per_model:
                scopes = [(e.parameters, recipe.parameters) for e in recipe.models or []]
                out[p.name] = p.validate([_value(p, method, s, name) for s in scopes], where)
            else:
                out[p.name] = p.validate(_value(p, method, [recipe.parameters], name), where)
        return out

    return merge_adapters(
        [e.model for e in recipe.models],
        method,
        out_dir,
        params_for,
        seed=recipe.seed,
        dtype=DTYPE_BY_NAME[recipe.out_dtype or recipe.dtype or "float32"],
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        info=recipe.model_dump(mode="json", exclude_none=True),  # the recipe that ran
    )
