"""Merge recipes: the YAML schema, parsed strictly with pydantic.

Two dialects share one schema and are told apart by one key:

- ``merge_method: NAME`` — mergekit's format, accepted as is. Methods take mergekit's
  defaults (e.g. TIES trims per tensor), so a mergekit recipe gives mergekit's tensors.
- ``method: NAME`` — splice's native form: the same keys, splice's defaults (e.g. TIES trims
  over the whole task vector as in the paper), plus native extras.

Keys (both dialects unless marked):
    merge_method | method   the merge method (exactly one of the two)
    base_model              base checkpoint reference (folder, file, or PATH+LORA_ADAPTER)
    models                  list of {model, parameters}; (splice) data-aware methods read
                            `statistics:` (a file) or `data:` (collected at merge time)
    slices                  list of {sources: [{model, layer_range, parameters}],
                            base_model, parameters}  (layer stacking / per-slice merges)
    parameters              global parameter settings
    dtype                   compute dtype (default float32; mergekit dialect: the inputs'
                            promoted dtype, as mergekit; float16/bfloat16 there use mergekit's
                            arithmetic in that dtype, see merge.methods._mergekit_precision)
    out_dtype               output dtype (default: dtype if given, else each input's dtype;
                            mergekit dialect: the inputs' promoted dtype)
    tokenizer_source        "base" or a model reference to copy tokenizer files from
    seed                    (splice) seed of random methods, default 0
    on_missing              (splice) a tensor of the reference model that some input lacks:
                            "error" (default) | "base" (copy the reference's tensor) | "drop"
    name                    (splice) free-form label stored with the output
    lines                   (splice) LiNeS post-step {alpha, beta}: the merged task vector
                            (merged − base) of a base-using method is scaled by
                            α + β·l/(L−1) in layer l (α outside layers); see merge/methods/lines.py

A parameter setting is a scalar, a gradient (list of numbers interpolated over the layer
index, as mergekit), or a list of ``{filter, value}`` where ``filter`` is a substring of the
tensor name (mergekit) or ``re:REGEX`` (splice; ``re.search``); ``*`` or no filter matches
all. Unknown keys anywhere are an error naming the key's path and the closest valid key;
so is a number that is not finite (YAML's ``.nan`` / ``.inf``), anywhere, and each method's
parameter ranges are checked when the recipe is planned, before any tensor is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from splice.config_errors import did_you_mean
from splice.errors import RecipeError
from splice.io.textfile import parse_yaml, read_text
from splice.numbers import FINITE

Scalar = bool | int | float | str
# Every recipe model: unknown keys are errors, and so is a NaN / ±inf number anywhere
# (YAML's .nan / .inf, or an overflowing literal such as 1e400): it would make every
# merged value NaN / inf.
_STRICT = ConfigDict(extra="forbid", **FINITE)


class ConditionalSetting(BaseModel):
    model_config = _STRICT
    filter: str | None = None
    value: Scalar | list[Scalar]

    @field_validator("filter")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        """A ``re:`` filter must compile (checked here, so the error names its key path)."""
        if v is not None and v.startswith("re:"):
            try:
                re.compile(v[3:])
            except re.error as e:
                raise ValueError(f"invalid regular expression {v[3:]!r}: {e.msg}") from None
        return v


ParameterSetting = Scalar | list[Scalar] | list[ConditionalSetting] | ConditionalSetting
Parameters = dict[str, ParameterSetting]


def _check_ref(value: Any) -> Any:
    if isinstance(value, dict):
        raise ValueError(
            "model references are strings here: write 'PATH' or 'PATH+LORA_ADAPTER_PATH'"
        )
    return value


class StatsData(BaseModel):
    """Data to collect a model's statistics on when the merge runs (`splice stats`'
    options): a built-in task or a .csv/.tsv/.jsonl file, and how much of it."""

    model_config = _STRICT
    source: str
    split: Literal["all", "train", "validation", "test"] | None = None
    seed: int = 0
    max_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(128, ge=2)
    per_example: bool = True  # fisher: each example's own gradient (False: per batch)


class ModelEntry(BaseModel):
    model_config = _STRICT
    model: str
    parameters: Parameters | None = None
    # This model's data statistics (a safetensors file from
    # `splice.merge.data_stats.save_statistics`), for the data-aware methods.
    statistics: str | None = None
    # ... or the data to collect them on when the merge runs (engine.data_inputs); a string is
    # the source alone
    data: StatsData | None = None
    # This model names the base's tensor N `tensor_prefix + N` (e.g. `bert.`: a
    # BertForSequenceClassification merged onto a bare BertModel base); the output keeps the
    # base's names. Needs `base_model`.
    tensor_prefix: str | None = Field(None, min_length=1)

    _ref = field_validator("model", mode="before")(_check_ref)

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if self.statistics is not None and self.data is not None:
            raise ValueError("give `statistics:` (a file) or `data:` (collected now), not both")
        if self.tensor_prefix is not None and (self.statistics or self.data):
            raise ValueError(
                "tensor_prefix cannot be combined with `statistics:` / `data:` (statistics "
                "are named by the model's own tensor names)"
            )
        return self


class SliceSource(BaseModel):
    model_config = _STRICT
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    _ref = field_validator("model", mode="before")(_check_ref)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {v}")
        return v


class OutputSlice(BaseModel):
    model_config = _STRICT
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None

    _ref = field_validator("base_model", mode="before")(_check_ref)

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[SliceSource]) -> list[SliceSource]:
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers: {v}")
        return v


class LinesStep(BaseModel):
    """LiNeS as a post-step of any base-using method (`lines:` in a recipe)."""

    model_config = _STRICT
    alpha: float
    beta: float


DTYPES = ("float32", "float16", "bfloat16", "float64")


class Recipe(BaseModel):
    model_config = _STRICT

    merge_method: str | None = None
    method: str | None = None
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    on_missing: Literal["error", "base", "drop"] = "error"
    name: str | None = None
    lines: LinesStep | None = None

    _ref = field_validator("base_model", mode="before")(_check_ref)

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if (self.merge_method is None) == (self.method is None):
            raise ValueError("give exactly one of 'method' (splice) or 'merge_method' (mergekit)")
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices', non-empty")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source 'union' (vocabulary merging) is not supported yet")
        prefixes: dict[str, str | None] = {}
        for i, e in enumerate(self.models or []):
            if e.tensor_prefix is None:
                continue
            if not self.base_model or e.model == self.base_model:
                raise ValueError(
                    f"models[{i}].tensor_prefix: names the base's tensors in this model; it "
                    "needs a base_model other than the model"
                )
            if prefixes.setdefault(e.model, e.tensor_prefix) != e.tensor_prefix:
                raise ValueError(f"models[{i}]: {e.model} is given two tensor_prefix values")
        return self

    def tensor_prefixes(self) -> dict[str, str]:
        """The `tensor_prefix` of each model reference that has one."""
        return {e.model: e.tensor_prefix for e in self.models or [] if e.tensor_prefix}

    @property
    def method_name(self) -> str:
        return self.method or self.merge_method  # type: ignore[return-value]

    def model_references(self) -> list[str]:
        """Every model reference the recipe names (base, models, slice sources), in order,
        each once."""
        refs: list[str] = [self.base_model] if self.base_model else []
        refs += [e.model for e in self.models or []]
        for s in self.slices or []:
            refs += [s.base_model] if s.base_model else []
            refs += [src.model for src in s.sources]
        return list(dict.fromkeys(refs))

    @property
    def dialect(self) -> Literal["splice", "mergekit"]:
        return "mergekit" if self.merge_method is not None else "splice"


# ---------------------------------------------------------------------------------------
# Parsing with helpful errors


_MODELS_AT = {
    (): Recipe,
    ("models",): ModelEntry,
    ("slices",): OutputSlice,
    ("slices", "sources"): SliceSource,
}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    key = tuple(p for p in loc[:-1] if isinstance(p, str))
    if "parameters" in key:
        return ConditionalSetting if key and key[-1] != "parameters" else None
    return _MODELS_AT.get(key)


_SCALAR_BRANCHES = frozenset({"bool", "int", "float", "str"})


def _is_branch(p: Any) -> bool:
    """A union branch name pydantic adds to an error location (``float``, ``list[...]``)."""
    return isinstance(p, str) and ("[" in p or p[:1].isupper() or p in _SCALAR_BRANCHES)


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    # pydantic adds union branch names to the location; drop them for the path shown.
    shown = [str(p) for p in loc if not _is_branch(p)]
    path = ".".join(shown) or "<recipe>"
    if err["type"] == "extra_forbidden":
        model = _model_at(tuple(p for p in loc if isinstance(p, (int, str)) and "[" not in str(p)))
        hint = did_you_mean(str(loc[-1]), model.model_fields) if model is not None else ""
        return f"unknown key '{path}'{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "finite_number":
        msg += f", got {err['input']!r}"
    return msg if path == "<recipe>" else f"{path}: {msg}"


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping (e.g. parsed YAML)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        seen: list[str] = []
        checks: list[str] = []  # this schema's own checks (a bad `re:` filter, ...)
        for err in e.errors():
            # For union-typed parameters pydantic reports every failing branch; the
            # unknown-key errors, then non-finite numbers, then the failed checks, are what
            # the user needs, so show distinct messages of the first kind present only.
            line = _format_error(err)
            if line not in seen:
                seen.append(line)
                if err["type"] == "value_error":
                    checks.append(line)
        nonfinite = [_format_error(err) for err in e.errors() if err["type"] == "finite_number"]
        extra = [s for s in seen if s.startswith("unknown key")]
        shown = extra or list(dict.fromkeys(nonfinite)) or checks or seen
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(shown[:10])) from None


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """Read and validate a recipe file; returns the recipe and its YAML text. Unreadable
    files, undecodable bytes and YAML errors are one-line `RecipeError`s (`splice.io.textfile`)."""
    p = Path(path)
    if not os.path.lexists(p):
        raise RecipeError(f"recipe file {p} does not exist")
    text = read_text(p, RecipeError)  # a regular file (never a FIFO), UTF-8
    return parse_recipe(parse_yaml(text, str(p), RecipeError), str(p)), text
