"""The one registry of LoRA-native merge methods.

A LoRA merge method is a pure function of one target's factors:

    fn(loras: list[LowRank], weights: list[float], opts: LoraMergeOptions,
       ctx: MergeContext) -> LowRank

`loras[i]` is adapter i's (B_i, A_i, s_i) for this module, `weights[i]` its weight w_i, and
the result is the merged (B, A, scale). `ctx` carries the module name and the seed (random
methods draw from `ctx.generator(i)`, so results are reproducible and order-independent).
Methods live one per file in `splice.lora_merge.methods` and register with
`@lora_merge_method(...)`; importing the package registers them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from splice.delta import LowRank
from splice.errors import MergeValidationError
from splice.merge.registry import MergeContext
from splice.numbers import check_number, check_numbers


@dataclass(frozen=True)
class LoraMergeOptions:
    """Global parameters; None means "the method's default" (stated in each method)."""

    rank: int | None = None
    density: float | None = None
    lambda_: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Ranges: rank >= 1, density in [0, 1], lambda finite (no NaN / inf anywhere)."""
        if self.rank is not None:
            check_number(self.rank, "rank", ge=1, integer=True)
        if self.density is not None:
            check_number(self.density, "density", ge=0, le=1)
        check_number(self.lambda_, "lambda")


LoraMergeFn = Callable[[list[LowRank], list[float], LoraMergeOptions, MergeContext], LowRank]


@dataclass(frozen=True)
class LoraMergeMethod:
    name: str
    fn: LoraMergeFn
    uses_rank: bool
    uses_density: bool
    needs_density: bool
    dense: bool  # forms the out×in delta (one tensor at a time)
    summary: str

    def __call__(
        self,
        loras: list[LowRank],
        weights: list[float] | None = None,
        opts: LoraMergeOptions | None = None,
        ctx: MergeContext | None = None,
    ) -> LowRank:
        opts = opts or LoraMergeOptions()
        weights = [1.0] * len(loras) if weights is None else list(weights)
        self.validate(opts, len(loras), weights)
        return self.fn(loras, weights, opts, ctx or MergeContext(seed=opts.seed))

    def validate(self, opts: LoraMergeOptions, n_models: int, weights: list[float]) -> None:
        """MergeValidationError for options this method does not take or lacks, and for
        weights that are not one finite number per adapter."""
        opts.check()
        if n_models < 1:
            raise MergeValidationError(f"method '{self.name}' needs at least one adapter")
        if len(weights) != n_models:
            raise MergeValidationError(
                f"{len(weights)} weights for {n_models} adapters; give one weight per adapter"
            )
        check_numbers(weights, "weights")
        if opts.rank is not None and not self.uses_rank:
            raise MergeValidationError(f"method '{self.name}' takes no rank (it is exact)")
        if opts.density is not None and not self.uses_density:
            raise MergeValidationError(f"method '{self.name}' takes no density")
        if opts.density is None and self.needs_density:
            raise MergeValidationError(f"method '{self.name}' needs a density")


_REGISTRY: dict[str, LoraMergeMethod] = {}


def lora_merge_method(
    name: str,
    *,
    uses_rank: bool,
    uses_density: bool = False,
    needs_density: bool = False,
    dense: bool = False,
) -> Callable[[LoraMergeFn], LoraMergeMethod]:
    """Register a LoRA merge method under `name` (duplicate names are errors)."""

    def wrap(fn: LoraMergeFn) -> LoraMergeMethod:
        if name in _REGISTRY:
            raise ValueError(f"LoRA merge method '{name}' is already registered")
        doc = (fn.__doc__ or "").strip()
        method = LoraMergeMethod(
            name,
            fn,
            uses_rank,
            uses_density,
            needs_density,
            dense,
            doc.splitlines()[0] if doc else "",
        )
        _REGISTRY[name] = method
        return method

    return wrap


def get_lora_method(name: str) -> LoraMergeMethod:
    """The registered method; MergeValidationError listing the choices otherwise."""
    import splice.lora_merge.methods  # noqa: F401  (registers the built-in methods)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeValidationError(
            f"unknown LoRA merge method '{name}'; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_lora_methods() -> list[LoraMergeMethod]:
    import splice.lora_merge.methods  # noqa: F401

    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def default_rank(loras: list[LowRank], opts: LoraMergeOptions) -> int:
    """opts.rank, else the largest input rank (PEFT's default for its *_svd combinations)."""
    return opts.rank if opts.rank is not None else max(f.rank for f in loras)
