"""The one registry of merge methods.

A merge method is a pure function of tensors and parameters. Its *signature is its
parameter schema*:

    @merge_method("task_arithmetic", needs_base=True)
    def task_arithmetic(
        base: Tensor,
        tensors: Sequence[Tensor],
        *,
        weight: PerModel[float] = 1.0,      # one value per input model (a list at call time)
        lambda_: float = 1.0,               # one global value ("lambda" in recipes)
        normalize: bool = False,
        ctx: MergeContext,                  # optional: seed, tensor name, dialect, model stats
    ) -> Tensor: ...

Conventions
- Positional arguments: ``base`` (a Tensor, or None when the method does not need one) and
  ``tensors`` (the non-base inputs, in recipe order). All arrive in the compute dtype
  (the recipe's ``dtype``; without one float32, or in the mergekit dialect the inputs'
  promoted dtype, as mergekit) and may be modified in place by the method. In the splice
  dialect methods run their own kernels in that dtype (selections and statistics in
  float32); in the mergekit dialect with float16 / bfloat16 they repeat mergekit's
  arithmetic op for op (`splice.merge.methods._mergekit_precision`).
- Keyword-only arguments are parameters. ``PerModel[T]`` marks a per-model parameter: the
  method receives a ``list[T]`` aligned with ``tensors``. Anything else is global. Types may
  carry pydantic constraints (``Annotated[float, Field(ge=0, le=1)]``); ``Literal`` lists
  the allowed choices; NaN and ±inf are never valid. A trailing underscore is dropped in
  recipes (``lambda_`` -> ``lambda``).
- ``ctx: MergeContext`` (if declared) is injected by the engine and is not a parameter.
- The return value is the merged tensor, same shape as the inputs, any float dtype; the
  engine casts to the output dtype.
- ``representation`` says what a method takes and returns: "dense" (tensors, the default)
  or "low_rank" (`splice.delta.LowRank` factors of one module in, one merged `LowRank` out;
  ``base`` is None). Names are unique per representation: dense `ties` and low-rank `ties`
  are two methods, and a recipe picks by its inputs (all PEFT LoRA adapter folders: the
  low-rank one; `splice.lora_merge.recipe`). ``lora:NAME`` always names the low-rank one.
  Low-rank methods live in `splice.lora_merge.methods` and register when `splice.lora_merge`
  is imported.

- ``data_statistics`` names the statistics collected on data that a data-aware method reads
  per tensor (``["fisher"]``, ``["gram"]``; `splice.merge.data_stats`), answered in
  ``ctx.model_stats`` under `DataStatistic(kind)`; the engine (recipe ``statistics:``) and
  `splice.merge.data_merge` supply them.

Methods never open files, know about YAML or print.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import torch
from pydantic import TypeAdapter, ValidationError

from splice.config_errors import did_you_mean
from splice.errors import MergeValidationError
from splice.merge.stats import DataKind, DataStatistic, DepthScale, StatRequest
from splice.numbers import FINITE

Dialect = Literal["splice", "mergekit"]
Representation = Literal["dense", "low_rank"]
# `MergeMethod.row_chunks`: (job parameters, dialect, tensor dimensions) -> chunkable
RowChunks = Callable[[Mapping[str, Any], Dialect, int], bool]
# `MergeMethod.row_partials`: (base, tensors, ctx, job parameters) -> float64 [rows, k]
RowPartialsFn = Callable[
    [torch.Tensor | None, list[torch.Tensor], "MergeContext", Mapping[str, Any]], torch.Tensor
]
LOW_RANK_PREFIX = "lora:"  # "lora:ties" names the low-rank ties


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PerModel"


_PER_MODEL = _PerModelMarker()


class _PerModelFactory:
    """``PerModel[float]`` -> ``Annotated[list[float], PER_MODEL]``."""

    def __getitem__(self, item: Any) -> Any:
        return Annotated[list[item], _PER_MODEL]


PerModel = _PerModelFactory()


@dataclass
class MergeContext:
    """Per-tensor context injected into methods that declare ``ctx``."""

    tensor_name: str = ""
    seed: int = 0
    dialect: Dialect = "splice"
    # The engine's answers to the method's whole-model requests, for this tensor.
    # (`KeepRule` per `TopKThreshold`, `DataStats` per `DataStatistic`).
    model_stats: Mapping[StatRequest, Any] = field(default_factory=dict)
    # Layer position of this tensor (from its name, e.g. ``model.layers.3.mlp...`` -> 3) and
    # the model's layer count; None for tensors outside layers / models without layers.
    layer_index: int | None = None
    num_layers: int | None = None
    # The flat (row-major) index in the whole tensor of the first entry of the inputs: 0,
    # or the first row's times the row's entries for a row chunk (`splice.engine.chunks`),
    # where a random method's draws continue the whole tensor's stream (DARE).
    flat_offset: int = 0

    def stat(self, request: StatRequest) -> Any:
        """The answer to a declared statistic request (`splice.merge.stats`)."""
        if isinstance(request, DepthScale):
            return request.at(self.layer_index, self.num_layers)
        if request not in self.model_stats and isinstance(request, DataStatistic):
            raise MergeValidationError(
                f"tensor '{self.tensor_name}': this method needs {request.kind} statistics "
                "collected on data (splice.merge.data_stats); give them per model (recipe "
                "`statistics:`, or splice.merge.data_merge.merge_with_statistics)"
            )
        if request not in self.model_stats:
            raise MergeValidationError(
                f"tensor '{self.tensor_name}': the engine did not answer {request} "
                "(a whole-model statistic: run through the engine, or use scope 'tensor')"
            )
        return self.model_stats[request]

    def generator_seed(self, index: int) -> int:
        """The seed of `generator(index)`: from (seed, tensor name, index), below 2^63."""
        digest = hashlib.sha256(f"{self.seed}:{self.tensor_name}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def generator(self, index: int) -> torch.Generator:
        """A CPU generator seeded from (seed, tensor name, index): deterministic and
        independent of execution order and threads."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.generator_seed(index))
        return g


@dataclass(frozen=True)
class ParamSpec:
    name: str  # recipe name (no trailing underscore)
    arg: str  # python argument name
    per_model: bool
    value_type: Any  # type of one value
    default: Any  # inspect.Parameter.empty when required
    adapter: TypeAdapter

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def validate(self, value: Any, where: str) -> Any:
        try:
            return self.adapter.validate_python(value, strict=False)
        except ValidationError as e:
            msg = "; ".join(err["msg"] for err in e.errors())
            raise MergeValidationError(
                f"{where}: parameter '{self.name}' = {value!r} is invalid: {msg}"
            ) from None

    def describe_type(self) -> str:
        return _describe(self.value_type)


def _describe(t: Any) -> str:
    """A short human name for a parameter type: float, bool, 'a' / 'b', float or none."""
    import types
    import typing

    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    origin = get_origin(t)
    if origin is Literal:
        return " / ".join(repr(a) for a in get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _describe(a) for a in get_args(t))
    return getattr(t, "__name__", str(t))


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    random: bool
    wants_ctx: bool
    summary: str
    # Defaults that differ when a recipe is written in mergekit's dialect (`merge_method:`).
    mergekit_defaults: Mapping[str, Any]
    # Given the resolved global + per-model parameters, the whole-model statistics needed.
    model_stats: Callable[[Mapping[str, Any]], list[StatRequest]] | None
    # Parameters mergekit accepts for this method but that change nothing (e.g. int8_mask):
    # accepted and ignored in the mergekit dialect so existing recipes run unchanged.
    mergekit_ignored: frozenset[str] = frozenset()
    # What the method takes and returns: tensors ("dense") or LowRank factors ("low_rank").
    representation: Representation = "dense"
    # Statistics collected on data that every tensor's merge reads (`DataStatistic(kind)` in
    # `MergeContext.model_stats`): "fisher", "gram". Empty for data-free methods.
    data_statistics: tuple[DataKind, ...] = ()
    # Given a job's parameters, the recipe's dialect and the tensor's number of dimensions,
    # whether the method's result on a slice of rows is those rows of its result on the
    # whole tensor, when its statistic answers (`KeepRule`, `TensorGram`) are those of the
    # slice and ``ctx.flat_offset`` the slice's first flat entry (`splice.engine.chunks`):
    # elementwise methods, a magnitude trim followed by an elementwise combine, DARE's
    # seeded drop (its stream from that entry), SLERP and Model Stock given the whole
    # tensor's Gram matrix. None: never merged in row chunks.
    row_chunks: RowChunks | None = None
    # The per-row partials of the method's `RowPartials` requests, for the engine's
    # pre-pass over row chunks: (base, tensors, ctx, job parameters) -> float64 [rows, k]
    # (the inputs are the chunk's rows in the compute dtype, and may be modified).
    row_partials: RowPartialsFn | None = None

    @property
    def label(self) -> str:
        """The name that says the representation: `ties` (dense), `lora:ties` (low-rank)."""
        return self.name if self.representation == "dense" else LOW_RANK_PREFIX + self.name

    @property
    def needs_data(self) -> bool:
        """Whether the method needs statistics collected on data (`DataStatistic`)."""
        return bool(self.data_statistics)

    def accepts(self, n: int) -> bool:
        """Whether the method takes ``n`` input models (besides the base, if it needs one)."""
        return self.min_models <= n and (self.max_models is None or n <= self.max_models)

    def model_count(self) -> str:
        """How many input models the method takes, in words ("at least 1", "exactly 1")."""
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        at_most = f" and at most {self.max_models}" if self.max_models else ""
        return f"at least {self.min_models}{at_most}"

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def default(self, p: ParamSpec, dialect: Dialect) -> Any:
        if dialect == "mergekit" and p.name in self.mergekit_defaults:
            return self.mergekit_defaults[p.name]
        return p.default

    def __call__(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        ctx: MergeContext | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Call with recipe-named parameters; missing ones take their defaults.

        A scalar given for a per-model parameter is broadcast to every model. This is the
        convenient entry point for tests and library users; the engine resolves and
        validates parameters itself and calls the same path.
        """
        ctx = ctx or MergeContext()
        where, dialect = f"method '{self.name}'", ctx.dialect
        values = resolve_params(
            self.params, params, len(tensors), where, lambda p: self.default(p, dialect)
        )
        kwargs: dict[str, Any] = {p.arg: values[p.name] for p in self.params}
        if self.wants_ctx:
            kwargs["ctx"] = ctx
        return self.fn(base, list(tensors), **kwargs)


def resolve_params(
    specs: Sequence[ParamSpec],
    given: Mapping[str, Any],
    n_models: int,
    where: str,
    default: Callable[[ParamSpec], Any] = lambda p: p.default,
) -> dict[str, Any]:
    """Every parameter of ``specs`` validated, by its recipe name: missing ones take
    ``default(p)``, a single value of a per-model parameter applies to all ``n_models``."""
    names = [p.name for p in specs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise MergeValidationError(
            f"{where} has no parameter(s) {unknown}{did_you_mean(unknown[0], names)}; "
            f"it takes {names}"
        )
    values: dict[str, Any] = {}
    for p in specs:
        value = given.get(p.name, default(p))
        if value is inspect.Parameter.empty:
            raise MergeValidationError(f"{where} needs parameter '{p.name}'")
        if p.per_model and not isinstance(value, (list, tuple)):
            value = [value] * n_models
        if p.per_model and len(value) != n_models:
            raise MergeValidationError(
                f"{where}: {len(value)} values of '{p.name}' for {n_models} models; "
                "give one per model"
            )
        values[p.name] = p.validate(value, where)
    return values


_REGISTRY: dict[tuple[Representation, str], MergeMethod] = {}


def _param_specs(fn: Callable[..., Any]) -> tuple[tuple[ParamSpec, ...], bool]:
    sig = inspect.signature(fn)
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if [p.name for p in positional] != ["base", "tensors"]:
        raise TypeError(f"{fn.__name__}: positional arguments must be (base, tensors)")
    return keyword_params(fn)


def keyword_params(fn: Callable[..., Any]) -> tuple[tuple[ParamSpec, ...], bool]:
    """The schema of ``fn``'s keyword-only parameters (``ctx`` excluded), and whether it
    declares ``ctx``: the signature-as-schema rule, shared by every registry."""
    sig = inspect.signature(fn)
    hints = get_type_hints(fn, include_extras=True)
    specs = []
    wants_ctx = False
    for p in sig.parameters.values():
        if p.kind != p.KEYWORD_ONLY:
            continue
        if p.name == "ctx":
            wants_ctx = True
            continue
        ann = hints.get(p.name)
        if ann is None:
            raise TypeError(f"{fn.__name__}: parameter {p.name} needs a type annotation")
        per_model = get_origin(ann) is Annotated and _PER_MODEL in get_args(ann)[1:]
        value_type = get_args(get_args(ann)[0])[0] if per_model else ann
        adapter_type = list[value_type] if per_model else value_type
        specs.append(
            ParamSpec(
                name=p.name.rstrip("_"),
                arg=p.name,
                per_model=per_model,
                value_type=value_type,
                default=p.default,
                # NaN / ±inf are refused, also when given as strings ("nan", "1e400").
                adapter=TypeAdapter(adapter_type, config=FINITE),
            )
        )
    return tuple(specs), wants_ctx


def merge_method(
    name: str,
    *,
    needs_base: bool,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    mergekit_defaults: Mapping[str, Any] | None = None,
    model_stats: Callable[[Mapping[str, Any]], list[StatRequest]] | None = None,
    mergekit_ignored: frozenset[str] | set[str] = frozenset(),
    representation: Representation = "dense",
    data_statistics: Sequence[DataKind] = (),
    row_chunks: RowChunks | None = None,
    row_partials: RowPartialsFn | None = None,
) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Register a merge method under ``name`` (one registry; a name taken twice in one
    representation is an error)."""

    def wrap(fn: Callable[..., torch.Tensor]) -> MergeMethod:
        if (representation, name) in _REGISTRY:
            raise ValueError(f"{representation} merge method '{name}' is already registered")
        params, wants_ctx = _param_specs(fn)
        known = {p.name for p in params}
        for key in mergekit_defaults or {}:
            if key not in known:
                raise TypeError(f"{name}: mergekit default for unknown parameter {key}")
        doc = inspect.getdoc(fn) or ""
        method = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            wants_ctx=wants_ctx,
            summary=doc.splitlines()[0] if doc else "",
            mergekit_defaults=dict(mergekit_defaults or {}),
            model_stats=model_stats,
            mergekit_ignored=frozenset(mergekit_ignored),
            representation=representation,
            data_statistics=tuple(data_statistics),
            row_chunks=row_chunks,
            row_partials=row_partials,
        )
        _REGISTRY[(representation, name)] = method
        return method

    return wrap


def get_method(name: str, representation: Representation = "dense") -> MergeMethod:
    """The method ``name`` of ``representation``; ``lora:NAME`` is the low-rank NAME."""
    _load_builtin_methods()
    if name.startswith(LOW_RANK_PREFIX):
        name, representation = name.removeprefix(LOW_RANK_PREFIX), "low_rank"
    try:
        return _REGISTRY[(representation, name)]
    except KeyError:
        names = [n for r, n in _REGISTRY if r == representation]
        hint = did_you_mean(name, names)
        kind = "merge method" if representation == "dense" else "low-rank (LoRA) merge method"
        raise MergeValidationError(
            f"unknown {kind} '{name}'{hint}; available: {', '.join(sorted(names))}"
        ) from None


def all_methods(representation: Representation = "dense") -> list[MergeMethod]:
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY) if k[0] == representation]


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method file.
    import splice.merge.methods  # noqa: F401
