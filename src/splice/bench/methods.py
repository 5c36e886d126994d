"""Which registered merge methods the bench runs, with which defaults and sweep grids.

One table, `TABLE`: per method, the parameters the bench sets on top of splice's own
defaults (only where splice has no default, or where splice's default is not the paper's
recommended setting) and the main coefficient swept on validation data (where the paper
tunes one). Every choice carries its source. A method not in the table runs with splice's
defaults and no sweep; one that cannot run on N experts is skipped with the reason:

- it takes a fixed number of models (slerp, passthrough: one besides the base);
- it needs a parameter that has no default (lines: alpha, beta; metrics_weighted: each
  model's metric, i.e. data); a config's ``merge.params`` can supply it.

AdaMerging (``adamerging``, ``adamerging++``; `splice.bench.adamerging`) is not a
registered per-tensor method: it learns its coefficients on the unlabeled test inputs,
runs only when named in a list, and its ``merge.params`` entry holds its settings. The
methods that run each expert on its training data (``fisher``, ``regmean``, ``regmean++``,
``fisher_graft``, ``fw_merging``; `splice.bench.stat_merging`) likewise run only when named.

LoRA-native (low-rank) methods are rows of the LoRA experts' table only, named by their
label (`lora:svd`, `lora:ties`): they merge the experts' PEFT adapters (saved beside each
LoRA expert) into one LoRA, which is folded into the base for evaluation. ``all`` includes
them; a selection may name them.

Grids share their points across methods (0.3 / 0.5 / 0.7 / 1.0 for task-vector sums, 0.6 /
1.0 / 1.4 / 1.8 for disjoint means) so the plot compares like with like; four points per
method keeps the 4-task run inside its time budget.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import splice.lora_merge  # noqa: F401  (registers the low-rank methods: lora:NAME)
from splice.bench.adamerging import DATA_AWARE, parse_settings
from splice.bench.stat_merging import STAT_METHODS, plan_stat_method
from splice.config_errors import did_you_mean
from splice.errors import SpliceError
from splice.merge import all_methods, get_method

SUM_GRID = [0.3, 0.5, 0.7, 1.0]  # task-vector sums: Task Arithmetic's λ range
MEAN_GRID = [0.6, 1.0, 1.4, 1.8]  # disjoint means (TIES family): brackets λ = 1
# Isotropic spectra: the flattened spectrum's mean is well below the top singular values
# of a full fine-tune's summed task vector, so validation favours α > 1 (on MiniLM the
# first grid, 0.5-2.0, peaked at its upper end); the grid starts at the default α = 1.
ISO_GRID = [1.0, 1.5, 2.0, 3.0]


@dataclass(frozen=True)
class MethodSpec:
    defaults: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[str, list[Any]] | None = None


TABLE: dict[str, MethodSpec] = {
    # Weight averaging (model soups, Wortsman et al. 2022): no coefficient.
    "linear": MethodSpec(),
    # Task Arithmetic (Ilharco et al. 2023): λ picked on validation from {0, 0.05, …, 1};
    # splice's default λ = 1 is the plain sum.
    "task_arithmetic": MethodSpec(sweep=("lambda", SUM_GRID)),
    # TIES (Yadav et al. 2023): keep the top k = 20% (splice's default density 1.0 trims
    # nothing); the paper's recommendation without validation is k = 20%, λ = 1, and it
    # tunes λ on validation otherwise.
    "ties": MethodSpec({"density": 0.2}, ("lambda", MEAN_GRID)),
    # DARE (Yu et al. 2024) on TIES / on Task Arithmetic: drop rate 0.5 as FusionBench's
    # dare/ties_merging.yaml and dare/task_arithmetic.yaml (sparsity_ratio 0.5); the paper
    # sweeps the drop rate and the merge's own coefficient.
    "dare_ties": MethodSpec({"density": 0.5}, ("lambda", MEAN_GRID)),
    "dare_linear": MethodSpec({"density": 0.5}, ("lambda", SUM_GRID)),
    # Model Breadcrumbs (Davari & Belilovsky 2023): density 0.9 / gamma 0.01 as mergekit's
    # documented example (drop the top 1% and the bottom 9% per row); λ tuned as TA.
    "breadcrumbs": MethodSpec({"density": 0.9, "gamma": 0.01}, ("lambda", SUM_GRID)),
    "breadcrumbs_ties": MethodSpec({"density": 0.9, "gamma": 0.01}, ("lambda", MEAN_GRID)),
    # Consensus / TALL masks (Wang et al. 2024): k = 2, λ_tall 0.4 (splice's defaults, the
    # middle of the paper's grid); the task-arithmetic λ is tuned on validation.
    "consensus": MethodSpec(sweep=("lambda", SUM_GRID)),
    # TSV-M (Gargiulo et al. 2025): α = 1, used without validation in the paper.
    "tsv": MethodSpec(),
    # Iso-C / Iso-CTS (Marczak et al. 2025): α tuned on validation.
    "iso_c": MethodSpec(sweep=("lambda", ISO_GRID)),
    "iso_cts": MethodSpec(sweep=("lambda", ISO_GRID)),
    # MagMax (Marczak et al. 2024): λ = 0.5 is splice's default (the released code's).
    "magmax": MethodSpec(sweep=("lambda", SUM_GRID)),
    # PCB (Du et al. 2024): ratio 0.1 (splice's default); λ tuned on validation.
    "pcb": MethodSpec(sweep=("lambda", MEAN_GRID)),
    # DELLA (Deep et al. 2024): drop 0.5 as DARE above, ε 0.15 (splice's default).
    "della": MethodSpec({"density": 0.5}, ("lambda", MEAN_GRID)),
    "della_linear": MethodSpec({"density": 0.5}, ("lambda", SUM_GRID)),
    # Magnitude pruning of each task vector to TIES's k = 20%, then TA.
    "magnitude_prune": MethodSpec({"density": 0.2}, ("lambda", SUM_GRID)),
    # Multi-SLERP: equal weights (the barycentre), no coefficient.
    "multislerp": MethodSpec({"weight": 1.0}),
    # LoRA-native rows (LoRA experts only). concat is Task Arithmetic kept in factor form
    # (exact, rank Σ r_i) and svd its best rank-r approximation (r = the experts' rank):
    # λ tuned as TA. ties / dare / dare_ties: the dense twins' settings above, so the rows
    # differ only in the re-factorization to rank r. KnOTS (Stoica et al. 2025): TIES / DARE
    # in the joint SVD basis with the same density as those twins; λ tuned as TIES.
    "lora:concat": MethodSpec(sweep=("lambda", SUM_GRID)),
    "lora:svd": MethodSpec(sweep=("lambda", SUM_GRID)),
    "lora:ties": MethodSpec({"density": 0.2}, ("lambda", MEAN_GRID)),
    "lora:dare": MethodSpec({"density": 0.5}, ("lambda", SUM_GRID)),
    "lora:dare_ties": MethodSpec({"density": 0.5}, ("lambda", MEAN_GRID)),
    "lora:knots": MethodSpec({"density": 0.2}, ("lambda", MEAN_GRID)),
    "lora:knots_dare": MethodSpec({"density": 0.5}, ("lambda", MEAN_GRID)),
}

# The quick, widely compared methods: the 4-task run and the demo use these.
CORE = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "consensus",
    "tsv",
    "iso_c",
    "iso_cts",
    "magmax",
    "pcb",
    "model_stock",
]


@dataclass(frozen=True)
class PlannedMethod:
    """A method to run: the parameters of its default row and its sweep, if any."""

    name: str  # the method's label: `ties`, `lora:ties`
    params: dict[str, Any]
    sweep: tuple[str, list[Any]] | None
    random: bool
    low_rank: bool = False  # merges the LoRA experts' adapters (LoRA experts only)
    # learns its coefficients on the unlabeled test inputs (`bench.adamerging`): ``params``
    # are its settings, one row per granularity
    data_aware: bool = False
    # runs the experts on their train data (`bench.stat_merging`): the data settings
    statistics: dict[str, Any] | None = None

    def applies_to(self, kind: str) -> bool:
        """Whether the method has a row in ``kind``'s table: a low-rank method (``lora:NAME``)
        merges the LoRA experts' adapters, so only in the LoRA table."""
        return kind == "lora" or not self.low_rank

    def default_setting(self) -> tuple[str, Any, dict[str, Any]]:
        """(swept parameter, its default value, the default row's parameters) of a swept
        method: the configured value when ``params`` names the parameter, else the method's
        registered default."""
        assert self.sweep is not None
        param = self.sweep[0]
        if param in self.params:  # (a data-aware method's label is no registered method)
            value = self.params[param]
        else:
            value = get_method(self.name).param(param).default
        return param, value, {**self.params, param: value}


def best_point(scores: list[float | None]) -> int | None:
    """The sweep's rule for the tuned row: the index of the highest validation score, the
    first one on a tie (grid order), points without a score skipped; None when none has one.
    Every runner (local, Ray, causal-LM) picks with this."""
    best: int | None = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):  # type: ignore[operator]
            best = i
    return best


@dataclass(frozen=True)
class SkippedMethod:
    name: str
    reason: str


def _names(selection: str | list[str]) -> list[str]:
    known = [m.label for m in [*all_methods(), *all_methods("low_rank")]]
    if selection == "all":
        return known
    if selection == "core":
        return list(CORE)
    for name in selection:
        if name not in DATA_AWARE and name not in STAT_METHODS:
            get_method(name)  # unknown: an error naming the closest
    return list(selection)


def check_overrides(
    params: dict[str, dict[str, Any]], grids: dict[str, dict[str, list[Any]]]
) -> None:
    """Unknown methods or parameters in ``merge.params`` / ``merge.grids`` are errors, and
    so is a scalar value (a grid point) outside the parameter's declared type and range:
    found here, before any expert is trained, not at merge time."""
    for where, table in (("merge.params", params), ("merge.grids", grids)):
        for method, values in table.items():
            if method in DATA_AWARE:
                if where == "merge.grids":
                    raise SpliceError(
                        f"merge.grids.{method}: {method} learns its coefficients; it has "
                        "no sweep (set its settings in merge.params)"
                    )
                parse_settings(method, values)
                continue
            if method in STAT_METHODS:  # its settings and sweep (bench.stat_merging)
                plan_stat_method(method, params.get(method, {}), grids.get(method), True)
                continue
            m = get_method(method)
            names = [p.name for p in m.params]
            for key, value in values.items():
                if key not in names:
                    hint = did_you_mean(key, names)
                    raise SpliceError(
                        f"{where}.{method}: '{key}' is not a parameter of {method}{hint}; "
                        f"its parameters: {names or 'none'}"
                    )
                spec = m.param(key)
                points = value if where == "merge.grids" else [value]
                for v in points:
                    if not isinstance(v, list | dict):  # gradients, filters: checked per tensor
                        spec.validate([v] if spec.per_model else v, f"{where}.{method}")


def select_methods(
    selection: str | list[str],
    n_models: int,
    params: dict[str, dict[str, Any]] | None = None,
    grids: dict[str, dict[str, list[Any]]] | None = None,
    sweep: bool = True,
) -> tuple[list[PlannedMethod], list[SkippedMethod]]:
    """The methods of ``selection`` that apply to ``n_models`` experts, and the rest with
    the reason each is skipped."""
    params, grids = params or {}, grids or {}
    check_overrides(params, grids)
    planned: list[PlannedMethod] = []
    skipped: list[SkippedMethod] = []
    for name in _names(selection):
        if name in DATA_AWARE:
            settings = parse_settings(name, params.get(name, {}))
            planned.append(PlannedMethod(name, settings.model_dump(), None, False, data_aware=True))
            continue
        if name in STAT_METHODS and isinstance(selection, list):
            planned.append(plan_stat_method(name, params.get(name, {}), grids.get(name), sweep))
            continue
        m = get_method(name)
        if not m.accepts(n_models):
            skipped.append(
                SkippedMethod(name, f"takes {m.model_count()} model(s), the pool has {n_models}")
            )
            continue
        if m.needs_data:
            skipped.append(
                SkippedMethod(name, "needs statistics collected on data: name it in the list")
            )
            continue
        spec = TABLE.get(name, MethodSpec())
        chosen = {**spec.defaults, **params.get(name, {})}
        missing = [
            p.name
            for p in m.params
            if p.default is inspect.Parameter.empty and p.name not in chosen
        ]
        if missing:
            skipped.append(SkippedMethod(name, f"needs {', '.join(missing)} (no default)"))
            continue
        grid = spec.sweep
        if name in grids:
            grid = next(iter(grids[name].items()))
        low_rank = m.representation == "low_rank"
        planned.append(PlannedMethod(name, chosen, grid if sweep else None, m.random, low_rank))
    return planned, skipped
