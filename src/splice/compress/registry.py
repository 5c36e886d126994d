"""The one registry of compression methods, in the merge registry's shape.

A compression method is registered by name with its *signature as its parameter schema*
(the rule of `splice.merge.registry`, with the same `ParamSpec`s, pydantic checks and
``PerModel`` marker; NaN and ±inf are never valid). The function takes only keyword
parameters and returns the method's per-tensor kernel (`splice.compress.stream.Kernel`):

    @compression_method("tall")
    def tall(*, lambda_: PerModel[Annotated[float, Field(ge=0, description="...")]] = 0.4):
        '''TALL masks over the task-arithmetic vector.'''
        return TallKernel(lambda_)

A method that compresses one PEFT LoRA adapter (``inputs="lora_adapter"``, ComPEFT) returns
a function of one tensor instead, and runs as `splice lora NAME`.

The first docstring line is the method's summary (`splice compress --list`, `splice
methods`); a ``Field(description=...)`` is its flag's help. `splice compress METHOD` has one
flag per parameter (``--lambda``), `compress` validates every parameter before any tensor is
read, and the manifest records the method and its resolved parameters, by which `restore`
finds the method again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from splice.compress.stream import DEFAULT_SHARD_BYTES, CompressReport, write_compressed
from splice.config_errors import did_you_mean
from splice.errors import MergeValidationError
from splice.merge.registry import ParamSpec, keyword_params, resolve_params

# What a method compresses, and the command that runs it: N fine-tuned checkpoints of one
# base (a kernel, `splice.compress.stream.Kernel`), or one PEFT LoRA adapter (a function of
# one tensor, `splice.compress.compeft`).
Inputs = Literal["checkpoints", "lora_adapter"]
COMMANDS: dict[Inputs, str] = {"checkpoints": "splice compress", "lora_adapter": "splice lora"}


@dataclass(frozen=True)
class CompressionMethod:
    name: str
    make_kernel: Callable[..., Any]
    params: tuple[ParamSpec, ...]
    summary: str
    inputs: Inputs = "checkpoints"

    def resolve(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Every parameter validated, by its recipe name (`resolve_params`)."""
        return resolve_params(self.params, params, n_models, f"compression method '{self.name}'")

    def kernel(self, values: Mapping[str, Any]) -> Any:
        """The kernel for resolved parameters (`resolve`)."""
        return self.make_kernel(**{p.arg: values[p.name] for p in self.params})


_REGISTRY: dict[str, CompressionMethod] = {}


def compression_method(
    name: str, inputs: Inputs = "checkpoints"
) -> Callable[[Callable[..., Any]], CompressionMethod]:
    """Register a compression method under ``name`` (a name taken twice is an error)."""

    def wrap(fn: Callable[..., Any]) -> CompressionMethod:
        if name in _REGISTRY:
            raise ValueError(f"compression method '{name}' is already registered")
        if any(p.kind != p.KEYWORD_ONLY for p in inspect.signature(fn).parameters.values()):
            raise TypeError(f"{fn.__name__}: a compression method takes keyword parameters only")
        params, wants_ctx = keyword_params(fn)
        if wants_ctx:
            raise TypeError(f"{fn.__name__}: a compression method has no ctx")
        doc = inspect.getdoc(fn) or ""
        method = CompressionMethod(name, fn, params, doc.splitlines()[0] if doc else "", inputs)
        _REGISTRY[name] = method
        return method

    return wrap


def get_compression_method(name: str, inputs: Inputs | None = None) -> CompressionMethod:
    """The method ``name``; with ``inputs``, one that compresses those inputs."""
    _load_builtin_methods()
    names = [n for n, m in _REGISTRY.items() if inputs in (None, m.inputs)]
    if name not in names:
        if name in _REGISTRY:
            command = COMMANDS[_REGISTRY[name].inputs]
            raise MergeValidationError(f"compression method '{name}' runs as `{command} {name}`")
        raise MergeValidationError(
            f"unknown compression method '{name}'{did_you_mean(name, names)}; "
            f"available: {', '.join(sorted(names))}"
        )
    return _REGISTRY[name]


def all_compression_methods() -> list[CompressionMethod]:
    _load_builtin_methods()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def param_help(p: ParamSpec) -> str:
    """A parameter's description (its ``Field(description=...)``), or its type."""
    t = p.value_type
    while get_origin(t) is Annotated:
        for meta in get_args(t)[1:]:
            if getattr(meta, "description", None):
                return meta.description
        t = get_args(t)[0]
    return p.describe_type()


def compress(
    method: str,
    base: str,
    models: Sequence[str],
    out_dir: str | Path,
    *,
    params: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> CompressReport:
    """Compress fine-tuned ``models`` of ``base`` into ``out_dir`` with ``method`` and its
    recipe-named ``params`` (e.g. ``{"lambda": 0.5}``), all checked before any tensor is
    read. See `splice.compress.stream.write_compressed` for the rest."""
    m = get_compression_method(method, "checkpoints")
    values = m.resolve(params or {}, len(models))
    return write_compressed(
        base,
        models,
        out_dir,
        m.kernel(values),
        method=m.name,
        params=values,
        names=names,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )


def _load_builtin_methods() -> None:
    # Importing the method files registers them.
    import splice.compress.compeft
    import splice.compress.emr
    import splice.compress.tall  # noqa: F401
