"""The bench's typed results: table rows, sweeps, experts, timing (`BenchResults`).

`BenchResults.to_json()` is what results.json holds, with the keys in the order the files
have always had (config, machine, precision, tasks, experts, tables, sweeps, methods,
skipped, failed, timing; the multi-task model under ``experts.multitask``), so files written
before and after read the same. A row's optional fields (params, variant, merge_seconds,
validation, same_as_default, its score) appear only when set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from splice.bench.methods import PlannedMethod, SkippedMethod


@dataclass(frozen=True)
class Score:
    """A row against its section's experts: average and normalized accuracy (report.py)."""

    avg: float
    normalized: dict[str, float]
    avg_normalized: float


@dataclass(frozen=True)
class Row:
    """One model of a table: its test accuracy per task and how it was made."""

    kind: str  # an expert kind, or "shared" (a baseline shown in every section)
    group: str  # "baseline", "merged" or "composed" (experts kept apart, routed per example)
    method: str
    test: dict[str, float]
    params: dict[str, Any] | None = None
    variant: str | None = None  # a merge's "default" or "tuned" setting
    merge_seconds: float | None = None
    validation: dict[str, float] | None = None
    same_as_default: bool = False  # a tuned row whose best grid point is the default
    score: Score | None = None  # set by `report.section_rows`
    # forward time relative to the pretrained (= merged) model's, measured (bench.routing)
    inference_cost: float | None = None
    routing: dict[str, float] | None = None  # per task: share routed top-1 to its own expert
    weights: dict[str, dict[str, float]] | None = None  # LoraHub: per task, each expert's
    note: str | None = None  # how the row was made, in words (AdaMerging: protocol, time)
    peak_memory_mb: float | None = None  # the merge's peak RSS growth (bench.memory)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "group": self.group,
            "method": self.method,
            "test": self.test,
        }
        for key in (
            "params",
            "variant",
            "merge_seconds",
            "validation",
            "inference_cost",
            "routing",
            "weights",
            "note",
            "peak_memory_mb",
        ):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.same_as_default:
            out["same_as_default"] = True
        if self.score is not None:
            out.update(dataclasses.asdict(self.score))
        return out


@dataclass(frozen=True)
class SweepPoint:
    value: Any
    avg: float  # average validation accuracy over tasks
    validation: dict[str, float]
    merge_seconds: float


@dataclass(frozen=True)
class Sweep:
    """One method's grid on one kind's experts, scored on validation."""

    kind: str
    method: str
    param: str
    default: Any
    best: Any
    points: list[SweepPoint]

    @property
    def at_grid_edge(self) -> bool:
        """The best point is an end of the grid: the optimum may lie outside it."""
        grid = [p.value for p in self.points]
        return len(grid) > 1 and self.best in (grid[0], grid[-1])

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["points"] = [dataclasses.asdict(p) for p in self.points]
        return {"at_grid_edge": self.at_grid_edge, **fields}


@dataclass(frozen=True)
class ExpertResult:
    """One expert on its own task, and its training record."""

    test: float
    validation: float
    chance: float  # 1 / classes
    cached: bool
    folder: str
    steps: Any = None
    train_seconds: Any = None
    steps_per_second: Any = None

    @property
    def margin_over_chance(self) -> float:
        return self.test - self.chance

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        head = {k: record.pop(k) for k in ("test", "validation", "chance")}
        return {**head, "margin_over_chance": self.margin_over_chance, **record}


@dataclass(frozen=True)
class MultitaskResult:
    """The multi-task model: test accuracy per task and its training record (meta.json)."""

    test: dict[str, float]
    cached: bool
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"test": self.test, "cached": self.cached, **self.meta}


@dataclass(frozen=True)
class TaskSummary:
    classes: int
    sizes: dict[str, int]
    label_names: list[str]


@dataclass(frozen=True)
class Failure:
    """A method that raised on a pool: no row, its error."""

    kind: str
    method: str
    error: str


@dataclass(frozen=True)
class Timing:
    """Wall seconds: the whole run and its phases (rounded to 0.1 s in the JSON)."""

    total_s: float
    prepare_s: float
    train_s: float

    @property
    def baselines_merges_s(self) -> float:
        return self.total_s - self.prepare_s - self.train_s

    def to_json(self) -> dict[str, float]:
        parts = (self.total_s, self.prepare_s, self.train_s, self.baselines_merges_s)
        names = ("total_s", "prepare_s", "train_s", "baselines_merges_s")
        return {n: round(v, 1) for n, v in zip(names, parts)}


@dataclass
class BenchResults:
    """Everything a run measured (the defaults let a test build a partial one)."""

    tasks: dict[str, TaskSummary]
    tables: dict[str, list[Row]]  # per expert kind, scored and ranked (report.section_rows)
    experts: dict[str, dict[str, ExpertResult]] = field(default_factory=dict)
    multitask: MultitaskResult | None = None
    sweeps: list[Sweep] = field(default_factory=list)
    methods: list[PlannedMethod] = field(default_factory=list)
    skipped: list[SkippedMethod] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    timing: Timing | None = None
    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None

    def to_json(self) -> dict[str, Any]:
        experts: dict[str, Any] = {
            kind: {name: e.to_json() for name, e in pool.items()}
            for kind, pool in self.experts.items()
        }
        if self.multitask is not None:
            experts["multitask"] = self.multitask.to_json()
        return {
            "config": self.config,
            "machine": self.machine,
            "precision": self.precision,
            "tasks": {name: dataclasses.asdict(t) for name, t in self.tasks.items()},
            "experts": experts,
            "tables": {k: [r.to_json() for r in rows] for k, rows in self.tables.items()},
            "sweeps": [s.to_json() for s in self.sweeps],
            "methods": [
                {
                    "name": p.name,
                    "params": p.params,
                    "sweep": p.sweep,
                    "lora_experts_only": p.low_rank,
                }
                for p in self.methods
            ],
            "skipped": [{"method": s.name, "reason": s.reason} for s in self.skipped],
            "failed": [dataclasses.asdict(f) for f in self.failed],
            "timing": None if self.timing is None else self.timing.to_json(),
        }
