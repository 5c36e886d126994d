"""`splice bench` configuration: a small strict YAML (unknown keys are errors, and so are
NaN / inf numbers anywhere, including ``merge.params`` / ``merge.grids``).

    model: minilm                 # packaged name, or an HF folder of an encoder classifier
    tasks: [tweet_sentiment, bbc_news, spam, wordnet_supersense]   # built-in names or files
    kinds: [full, lora]           # the expert pools: full fine-tunes and LoRA fine-tunes
    data:
      split_seed: 0               # seeded stratified 80/10/10 split (splice.data.make_splits)
      train_per_class: 200        # each cap is per class, and the per-task maximum divides
      train_max: 1200             #   over the classes: min(per_class, ceil(max / classes))
      validation_per_class: 100
      validation_max: 200
      test_per_class: 100
      test_max: 500
    training:                     # shared by every expert and the multi-task baseline
      epochs: 2
      batch_size: 16
      max_length: 64              # tokens per example (truncation)
      warmup_ratio: 0.06          # linear warm-up, then linear decay to 0
      weight_decay: 0.0
      grad_clip: 1.0
      head_lr: 2.0e-3             # the new classification head's learning rate
      seed: 0                     # torch seed: head init, dropout, batch order
    full:
      lr: 1.0e-4                  # backbone learning rate of full fine-tuning
    lora:
      lr: 4.0e-3
      r: 8
      alpha: 16
      dropout: 0.0
      target_modules: [query, value]
    baselines:
      probe: true                 # frozen pretrained backbone, head trained (linear probe)
      multitask: true             # one backbone fine-tuned on the union, one head per task
    merge:
      methods: core               # core | all (incl. lora:NAME) | a list of method names
                                  #   (a list may name adamerging, adamerging++: bench.adamerging;
                                  #   fisher, regmean, regmean++, fisher_graft, fw_merging:
                                  #   bench.stat_merging)
      sweep: true                 # validation sweep of each method's main coefficient
      params: {}                  # per-method parameter overrides: {ties: {density: 0.3}}
      grids: {}                   # per-method sweep overrides: {ties: {lambda: [0.8, 1.0]}}
      seed: 0                     # seed of random methods (DARE, DELLA)
    search:                       # coefficient-search rows "METHOD+search" (bench.search)
      methods: []                 # e.g. [task_arithmetic, ties]; [] = none
      budget: 30                  # merges per (kind, method)
      patience: null              # early stop: generations without improvement
      seed: 0
      layer_groups: 0             # 0: a weight per expert; G: per block of layers + rest
      bounds: [0.0, 1.0]
      objective: accuracy         # accuracy | loss (validation, mean over tasks)
    compose: [oracle, retrieval]  # composition rows on the LoRA experts (null: these two when
                                  #   lora is a kind, none otherwise; []: none); see bench.routing
    retrieval:
      k: 2                        # adapters per example, softmax(cos / temperature) over them
      temperature: 0.1
    lorahub:                      # compose: [..., lorahub] (not a default: a search per task)
      examples: 16                # validation examples per task (a seeded sample)
      budget: 40                  # CMA-ES objective evaluations per task
      seed: 0
    twin:                         # compose: [..., twin_merging] (every kind; bench.twin)
      shared: task_arithmetic     # the merge holding the shared knowledge
      shared_params: {lambda: 0.3}  # its parameters (the paper: TA, λ = 0.29)
      fraction: 0.1               # exclusive rank per matrix: ⌊min(m, n) · fraction⌋
      rank: null                  # or a fixed rank (instead of fraction)
      epochs: 50                  # router MLP on the validation splits (AdamW, lr, batch)
      lr: 5.0e-4
      batch_size: 64
      seed: 0
      top_k: null                 # null: dense softmax weights (the paper); k: top-k renormalized
      router_split: train         # the router's data: train | validation
      router_features: last       # its input: last (the paper's) | layers (every layer's)
    gate:                         # compose: [..., gate]: a trained gate over the frozen LoRA
      levels: [sequence]          #   experts (bench.gating); a row per level: sequence | token
      top_k: 2                    # experts kept per routing position (null: dense)
      balance_coef: 0.01          # load-balancing loss weight
      lr: null                    # null: training.head_lr
      epochs: null                # null: training.epochs
    fusion:                       # compose: [..., fusion]: AdapterFusion per task (bench.fusing)
      lr: 5.0e-5                  # the fusion layers' learning rate
      head_lr: null               # the task head's (null: training.head_lr)
      epochs: null                # null: training.epochs
      regularization: 0.01        # weight of sum ||I - V||^2 in the loss
    lm:                           # causal-LM pools only (model: smollm2; bench.lm_run)
      max_new_tokens: 8           # greedy tokens generated per exact-match prompt
    eval_batch_size: 64
    precision: auto               # auto | float32 | bfloat16 (autocast; see bench.precision)
    threads: null                 # torch CPU threads (null: torch's default)

Choices: the caps keep every split class-balanced as far as the data allows, so chance
accuracy is 1/classes; the test split is the seeded split's test part, never seen in
training or in the sweep (which uses validation only).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from splice.config_errors import StrictConfig as _Strict
from splice.config_errors import parse_config
from splice.errors import SpliceError
from splice.io.textfile import load_yaml
from splice.numbers import first_nonfinite


def _finite_values(cls: type, v: dict[str, Any]) -> dict[str, Any]:
    """A validator of a mapping of numbers typed ``Any``: every value finite."""
    found = first_nonfinite(v)
    if found:
        raise ValueError(f"{found[0]} = {found[1]!r} must be a finite number")
    return v


class BenchConfigError(SpliceError):
    """A bench config is invalid."""


class DataSizes(_Strict):
    split_seed: int = 0
    train_per_class: int = Field(200, gt=0)
    train_max: int = Field(1200, gt=0)
    validation_per_class: int = Field(100, gt=0)
    validation_max: int = Field(200, gt=0)
    test_per_class: int = Field(100, gt=0)
    test_max: int = Field(500, gt=0)


class TrainingSettings(_Strict):
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, gt=0)
    max_length: int = Field(64, gt=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    head_lr: float = Field(2e-3, gt=0)
    seed: int = 0


class FullSettings(_Strict):
    lr: float = Field(1e-4, gt=0)


class LoraSettings(_Strict):
    lr: float = Field(4e-3, gt=0)
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)


class Baselines(_Strict):
    probe: bool = True
    multitask: bool = True


class MergeSettings(_Strict):
    methods: Literal["core", "all"] | list[str] = "core"
    sweep: bool = True
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _nonempty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty method list (use core, all, or name methods)")
        return v

    # Values are typed Any (each method declares its own), so pydantic's allow_inf_nan does
    # not reach them; the method's own ranges are checked when the bench starts.
    _finite = field_validator("params", "grids")(classmethod(_finite_values))

    @field_validator("grids")
    @classmethod
    def _one_param(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, grid in v.items():
            if len(grid) != 1:
                raise ValueError(f"grids.{method}: sweep exactly one parameter, got {list(grid)}")
            values = next(iter(grid.values()))
            if not values:
                raise ValueError(f"grids.{method}: an empty grid")
        return v


class SearchSettings(_Strict):
    """Coefficient-search rows ("ties+search"): see `splice.bench.search`."""

    methods: list[str] = Field(default_factory=list)
    budget: int = Field(30, gt=0)
    patience: int | None = Field(None, gt=0)
    seed: int = 0
    layer_groups: int = Field(0, ge=0)
    bounds: tuple[float, float] = (0.0, 1.0)
    objective: Literal["accuracy", "loss"] = "accuracy"

    @field_validator("bounds")
    @classmethod
    def _box(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError(f"bounds must be finite with lower < upper, got {list(v)}")
        return v

    @field_validator("methods")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must be distinct, got {v}")
        return v


ComposeRow = Literal["oracle", "retrieval", "lorahub", "gate", "fusion", "twin_merging"]
TWIN_ROW = "twin_merging"  # a row of every kind's table; the others route LoRA adapters
DEFAULT_COMPOSE: list[str] = ["oracle", "retrieval"]  # the rows that need no extra training


class RetrievalSettings(_Strict):
    k: int = Field(2, gt=0)
    temperature: float = Field(0.1, gt=0)


class LoraHubSettings(_Strict):
    examples: int = Field(16, gt=0)
    budget: int = Field(40, gt=0)
    seed: int = 0


class TwinSettings(_Strict):
    """The ``twin_merging`` rows (`splice.bench.twin`)."""

    shared: str = "task_arithmetic"
    shared_params: dict[str, Any] = Field(default_factory=lambda: {"lambda": 0.3})
    fraction: float | None = Field(0.1, gt=0, le=1)
    rank: int | None = Field(None, gt=0)
    epochs: int = Field(50, gt=0)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(64, gt=1)
    seed: int = 0
    top_k: int | None = Field(None, gt=0)
    router_split: Literal["train", "validation"] = "train"
    router_features: Literal["last", "layers"] = "last"

    _finite = field_validator("shared_params")(classmethod(_finite_values))


class GateSettings(_Strict):
    """The ``gate`` row (`splice.bench.gating`). Defaults: top-2 and a 0.01 balance loss are
    MixLoRA's router defaults (TUDB-Labs/MixLoRA: top_k 2, router_aux_loss_coef 0.01);
    ``sequence`` and the head's learning rate are the bench's choice (a task is a property
    of the whole example; the gate, like a head, starts from scratch)."""

    levels: list[Literal["sequence", "token"]] = Field(
        default_factory=lambda: ["sequence"], min_length=1
    )
    top_k: int | None = Field(2, ge=1)
    balance_coef: float = Field(0.01, ge=0)
    lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)

    @field_validator("levels")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"levels must be distinct, got {v}")
        return v


class FusionSettings(_Strict):
    """The ``fusion`` rows (`splice.bench.fusing`). Defaults: learning rate 5e-5 and the
    0.01 ‖I − V‖² regularization are Pfeiffer et al. 2021's (§4.2) / AdapterHub's "dynamic"
    fusion; the head's learning rate and the epochs are the bench's, as for the experts."""

    lr: float = Field(5e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    regularization: float = Field(0.01, ge=0)


class LMSettings(_Strict):
    """A causal-LM pool's settings (`splice.bench.lm_run`; docs/bench-lm.md)."""

    max_new_tokens: int = Field(8, gt=0)


class BenchConfig(_Strict):
    model: str = "minilm"
    tasks: list[str] = Field(min_length=2)
    kinds: list[Literal["full", "lora"]] = Field(
        default_factory=lambda: ["full", "lora"], min_length=1
    )
    data: DataSizes = Field(default_factory=DataSizes)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    full: FullSettings = Field(default_factory=FullSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    baselines: Baselines = Field(default_factory=Baselines)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)  # bench.search
    compose: list[ComposeRow] | None = None
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    lorahub: LoraHubSettings = Field(default_factory=LoraHubSettings)
    twin: TwinSettings = Field(default_factory=TwinSettings)
    gate: GateSettings = Field(default_factory=GateSettings)  # bench.gating
    fusion: FusionSettings = Field(default_factory=FusionSettings)  # bench.fusing
    lm: LMSettings = Field(default_factory=LMSettings)  # causal-LM pools (bench.lm_run)
    eval_batch_size: int = Field(64, gt=0)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    threads: int | None = Field(None, gt=0)

    @field_validator("tasks", "kinds", "compose")
    @classmethod
    def _distinct(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} must be distinct, got {v}")
        return v

    @field_validator("compose")
    @classmethod
    def _compose_needs_lora(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        lora_rows = [r for r in v or [] if r != TWIN_ROW]
        if lora_rows and "lora" not in info.data.get("kinds", ["lora"]):
            raise ValueError(
                f"{lora_rows} compose the LoRA experts and there are none; add lora to kinds "
                "(or drop them from compose)"
            )
        return v

    @field_validator("gate")
    @classmethod
    def _gate_top_k(cls, v: GateSettings, info: ValidationInfo) -> GateSettings:
        n = len(info.data.get("tasks") or [])
        if "gate" in (info.data.get("compose") or []) and v.top_k is not None and v.top_k > n:
            raise ValueError(f"top_k={v.top_k} but there are {n} LoRA experts (one per task)")
        return v

    @property
    def compose_rows(self) -> list[str]:
        """The composition rows to run: ``compose``, or by default the rows that need no
        extra training when there are LoRA experts."""
        if self.compose is None:
            return list(DEFAULT_COMPOSE) if "lora" in self.kinds else []
        return list(self.compose)


def parse_bench_config(data: Any, where: str = "bench config") -> BenchConfig:
    """Validate ``data`` (a mapping); errors name the key's path and the closest valid key."""
    return parse_config(
        BenchConfig,
        data,
        where,
        BenchConfigError,
        list_valid=True,
        messages={"merge.methods": "expected 'core', 'all' or a list of method names"},
    )


def load_bench_config(path: str | Path) -> BenchConfig:
    p = Path(path)
    if not p.exists():
        raise BenchConfigError(f"{p} does not exist")
    data = load_yaml(p, BenchConfigError)  # one-line errors (splice.io.textfile)
    return parse_bench_config(data or {}, where=str(p))
