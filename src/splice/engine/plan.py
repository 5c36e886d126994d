"""Plan a recipe into per-tensor jobs, validating everything before any heavy work.

Planning opens every input lazily (headers only), maps output tensor names to input tensor
names (layer stacking for ``slices``), checks names, shapes and dtypes, resolves and
validates every parameter for every tensor, and lays out the output. Nothing is read or
written; any problem is a `SpliceError` before the first byte of output exists.

Layers are found by name (`splice.engine.layers`). A layer's gradient position is
t = offset / (layers_in_slice − 1) (1 for a one-layer slice); tensors outside layers get
t = 0, as in mergekit. With ``slices``, tensors outside layers come from the first slice's
sources if their name looks like an input embedding (``embed``, ``wte``, ``wpe``,
``word_embeddings``), else from the last slice's sources.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from splice.config_errors import did_you_mean
from splice.engine.data_inputs import DataCollector, DataInputs, load_data_inputs
from splice.engine.layers import layer_index, rename_layer
from splice.engine.topk import topk_requests
from splice.errors import MergeValidationError
from splice.io import CheckpointReader, TensorInfo
from splice.io.dtypes import DTYPE_BY_NAME
from splice.merge import MergeMethod, TopKThreshold, get_method
from splice.recipe.schema import OutputSlice, Parameters, Recipe
from splice.recipe.settings import MISSING, resolve
from splice.reference import open_checkpoint

_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings")


@dataclass(frozen=True)
class Source:
    ref: str  # model reference as written in the recipe
    name: str  # tensor name inside that model


@dataclass
class TensorJob:
    out: TensorInfo  # output name, shape, dtype
    kind: Literal["merge", "copy"]
    base: Source | None
    inputs: list[Source]
    params: dict[str, Any] = field(default_factory=dict)  # validated; per-model as lists

    @property
    def sources(self) -> list[Source]:
        return ([self.base] if self.base else []) + self.inputs


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    jobs: list[TensorJob]
    readers: dict[str, CheckpointReader]
    compute_dtype: torch.dtype
    reference: str  # the model whose config and tokenizer the output takes
    num_layers_out: int | None  # set for slices: the output's layer count
    stat_requests: list[TopKThreshold] = field(default_factory=list)  # whole-model top-k
    allow_nonfinite: bool = False  # NaN / ±inf may pass in the inputs and the output
    data: DataInputs | None = None  # the statistics of a data-aware method

    def job_compute_dtype(self, job: TensorJob) -> torch.dtype:
        """The dtype a job's arithmetic runs in: the recipe's ``dtype``; without one, float32
        (splice dialect) or, as mergekit does, the promoted dtype of the job's inputs
        (mergekit dialect: bfloat16 models merge in bfloat16)."""
        if self.recipe.dtype is not None or self.recipe.dialect != "mergekit":
            return self.compute_dtype
        return promoted_dtype([self.readers[s.ref].info(s.name).dtype for s in job.sources])

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    @property
    def input_bytes(self) -> int:
        return sum(self.readers[s.ref].info(s.name).nbytes for j in self.jobs for s in j.sources)

    @property
    def output_bytes(self) -> int:
        return sum(j.out.nbytes for j in self.jobs)


def promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """torch's type promotion over ``dtypes`` (mergekit's dtype for a group of inputs)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


@dataclass
class _Group:
    """The inputs for a run of output tensors: one slice, or the whole `models` list."""

    base: str | None
    inputs: list[str]
    input_params: list[Parameters | None]
    slice_params: Parameters | None


class _Planner:
    def __init__(self, recipe: Recipe, readers: dict[str, CheckpointReader]):
        self.recipe = recipe
        self.readers = readers
        self.method = get_method(recipe.method_name)
        self.dialect = recipe.dialect
        self.compute_dtype = DTYPE_BY_NAME[recipe.dtype or "float32"]
        out_name = recipe.out_dtype or recipe.dtype
        self.out_dtype = DTYPE_BY_NAME[out_name] if out_name else None
        self.known = {p.name for p in self.method.params}
        self._name_cache: dict[str, set[str]] = {}

    # -- groups -------------------------------------------------------------------------
    def group(
        self,
        base: str | None,
        entries: list[tuple[str, Parameters | None]],
        slice_params: Parameters | None,
        where: str,
    ) -> _Group:
        m = self.method
        if m.needs_base and base is None:
            raise MergeValidationError(f"method '{m.name}' needs a base_model ({where})")
        if m.needs_base:
            entries = [(ref, p) for ref, p in entries if ref != base]
        n = len(entries)
        if not m.accepts(n):
            extra = " besides the base" if m.needs_base else ""
            raise MergeValidationError(
                f"method '{m.name}' takes {m.model_count()} input model(s){extra}; {where} has {n}"
            )
        return _Group(
            base=base,
            inputs=[r for r, _ in entries],
            input_params=[p for _, p in entries],
            slice_params=slice_params,
        )

    def check_param_names(
        self, params: Parameters | None, where: str, per_model_scope: bool
    ) -> None:
        for key in params or {}:
            if self.dialect == "mergekit" and key in self.method.mergekit_ignored:
                continue  # accepted for mergekit compatibility, no effect (as in mergekit)
            if key not in self.known:
                hint = did_you_mean(key, self.known)
                raise MergeValidationError(
                    f"{where}: method '{self.method.name}' has no parameter '{key}'{hint}; "
                    f"its parameters: {sorted(self.known) or 'none'}"
                )
            if per_model_scope and not self.method.param(key).per_model:
                raise MergeValidationError(
                    f"{where}: '{key}' is a global parameter of '{self.method.name}'; "
                    "set it under the top-level (or slice) 'parameters'"
                )

    # -- parameters ---------------------------------------------------------------------
    def resolve_params(
        self, g: _Group, out_name: str, in_names: list[str], t: float
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        where = f"tensor '{out_name}'"
        for p in self.method.params:
            if p.per_model:
                values = []
                for i, scope in enumerate(g.input_params):
                    v = resolve(
                        p.name, (scope, g.slice_params, self.recipe.parameters), in_names[i], t
                    )
                    values.append(self._default(p, v, where))
                out[p.name] = p.validate(values, where)
            else:
                v = resolve(p.name, (g.slice_params, self.recipe.parameters), out_name, t)
                out[p.name] = p.validate(self._default(p, v, where), where)
        return out

    def _default(self, p: Any, v: Any, where: str) -> Any:
        if v is not MISSING:
            return v
        d = self.method.default(p, self.dialect)
        if d is inspect.Parameter.empty:
            raise MergeValidationError(
                f"{where}: method '{self.method.name}' needs parameter '{p.name}'"
            )
        return d

    # -- jobs ---------------------------------------------------------------------------
    def job(
        self,
        g: _Group,
        out_name: str,
        in_names: Mapping[str, str],
        t: float,
        jobs: list[TensorJob],
    ) -> None:
        """Plan one output tensor; `in_names` gives each model of `g` its input tensor name."""
        refs = self._refs(g)
        ref_model = refs[0]
        missing = [r for r in refs if in_names[r] not in self._names(r)]
        if missing:
            policy = self.recipe.on_missing
            if policy == "drop":
                return
            if policy == "base" and ref_model not in missing:
                src = Source(ref_model, in_names[ref_model])
                info = self.readers[ref_model].info(src.name)
                jobs.append(
                    TensorJob(
                        out=self._out_info(out_name, info), kind="copy", base=None, inputs=[src]
                    )
                )
                return
            raise MergeValidationError(
                f"tensor '{in_names[missing[0]]}' is missing from {', '.join(missing)} "
                "(set on_missing: base | drop to allow)"
            )
        infos = [self.readers[r].info(in_names[r]) for r in refs]
        if len({i.shape for i in infos}) > 1:
            detail = ", ".join(f"{r}: {list(i.shape)}" for r, i in zip(refs, infos))
            raise MergeValidationError(
                f"shape mismatch for tensor '{in_names[ref_model]}': {detail}"
            )
        first = infos[0]
        if not all(i.dtype.is_floating_point for i in infos):
            # Integer buffers (position ids, masks) are copied from the reference model.
            jobs.append(
                TensorJob(
                    out=TensorInfo(out_name, first.shape, first.dtype),
                    kind="copy",
                    base=None,
                    inputs=[Source(ref_model, in_names[ref_model])],
                )
            )
            return
        params = self.resolve_params(g, out_name, [in_names[r] for r in g.inputs], t)
        if self.dialect == "mergekit" and self.out_dtype is None:
            # mergekit writes what it computed: the inputs' promoted dtype
            first = TensorInfo(first.name, first.shape, promoted_dtype([i.dtype for i in infos]))
        jobs.append(
            TensorJob(
                out=self._out_info(out_name, first),
                kind="merge",
                base=Source(g.base, in_names[g.base]) if g.base else None,
                inputs=[Source(r, in_names[r]) for r in g.inputs],
                params=params,
            )
        )

    @staticmethod
    def _refs(g: _Group) -> list[str]:
        return ([g.base] if g.base else []) + g.inputs

    def _names(self, ref: str) -> set[str]:
        if ref not in self._name_cache:
            self._name_cache[ref] = set(self.readers[ref].names())
        return self._name_cache[ref]

    def _out_info(self, name: str, info: TensorInfo) -> TensorInfo:
        dtype = self.out_dtype if (self.out_dtype and info.dtype.is_floating_point) else info.dtype
        return TensorInfo(name, info.shape, dtype)

    def plan_models(self) -> tuple[list[TensorJob], str]:
        r = self.recipe
        assert r.models is not None
        for i, e in enumerate(r.models):
            self.check_param_names(e.parameters, f"models[{i}] ({e.model})", True)
        g = self.group(
            r.base_model, [(e.model, e.parameters) for e in r.models], None, "the recipe"
        )
        reference = g.base or g.inputs[0]
        names = self.readers[reference].names()
        self._check_extra_names(reference, g)
        num_layers = (
            1 + max((layer_index(n) or 0) for n in names)
            if any(layer_index(n) is not None for n in names)
            else 0
        )
        prefixes = r.tensor_prefixes()
        jobs: list[TensorJob] = []
        for name in names:
            li = layer_index(name)
            t = 0.0 if li is None else (li / (num_layers - 1) if num_layers > 1 else 1.0)
            in_names = {ref: prefixes.get(ref, "") + name for ref in self._refs(g)}
            self.job(g, name, in_names, t, jobs)
        return jobs, reference

    def _check_extra_names(self, reference: str, g: _Group) -> None:
        if self.recipe.on_missing != "error":
            return
        ref_names = self._names(reference)
        prefixes = self.recipe.tensor_prefixes()
        for ref in self._refs(g):
            prefix = prefixes.get(ref, "")
            extra = sorted(self._names(ref) - {prefix + n for n in ref_names})
            if extra:
                raise MergeValidationError(
                    f"{ref} has tensors that {reference} lacks, e.g. {extra[:3]} "
                    f"({len(extra)} in all; set on_missing: drop to ignore them)"
                )

    def plan_slices(self) -> tuple[list[TensorJob], str, int]:
        r = self.recipe
        assert r.slices is not None
        groups: list[_Group] = []
        for si, s in enumerate(r.slices):
            self.check_param_names(s.parameters, f"slices[{si}]", False)
            for j, src in enumerate(s.sources):
                self.check_param_names(src.parameters, f"slices[{si}].sources[{j}]", True)
            groups.append(self._slice_group(s, si))
        reference = groups[0].base or groups[0].inputs[0]
        jobs: list[TensorJob] = []
        outside = [n for n in self.readers[reference].names() if layer_index(n) is None]
        pre = [n for n in outside if _PRE_RE.search(n)]
        post = [n for n in outside if not _PRE_RE.search(n)]
        for name in pre:
            self.job(groups[0], name, dict.fromkeys(self._refs(groups[0]), name), 0.0, jobs)
        out_layer = 0
        for si, (s, g) in enumerate(zip(r.slices, groups)):
            start, end = s.sources[0].layer_range
            count = end - start
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                layer_names = self._layer_names(s, offset, si)
                for in_name in layer_names:
                    self.slice_job(g, s, offset, in_name, out_layer, t, jobs)
                out_layer += 1
        for name in post:
            self.job(groups[-1], name, dict.fromkeys(self._refs(groups[-1]), name), 0.0, jobs)
        return jobs, reference, out_layer

    def _slice_group(self, s: OutputSlice, si: int) -> _Group:
        base = s.base_model or self.recipe.base_model
        return self.group(
            base, [(src.model, src.parameters) for src in s.sources], s.parameters, f"slices[{si}]"
        )

    def _layer_names(self, s: OutputSlice, offset: int, si: int) -> list[str]:
        src = s.sources[0]
        idx = src.layer_range[0] + offset
        names = [n for n in self.readers[src.model].names() if layer_index(n) == idx]
        if not names:
            raise MergeValidationError(
                f"slices[{si}]: {src.model} has no layer {idx} "
                f"(layer_range {list(src.layer_range)})"
            )
        return names

    def slice_job(
        self,
        g: _Group,
        s: OutputSlice,
        offset: int,
        in_name: str,
        out_layer: int,
        t: float,
        jobs: list[TensorJob],
    ) -> None:
        """One layer tensor of a slice; each source reads its own layer index (the base
        reads the first source's)."""
        first = rename_layer(in_name, s.sources[0].layer_range[0] + offset)
        in_names = {g.base: first} if g.base is not None else {}
        in_names.update(
            {src.model: rename_layer(in_name, src.layer_range[0] + offset) for src in s.sources}
        )
        self.job(g, rename_layer(in_name, out_layer), in_names, t, jobs)


def plan_merge(
    recipe: Recipe,
    readers: Mapping[str, CheckpointReader] | None = None,
    *,
    allow_nonfinite: bool = False,
    collect: DataCollector | None = None,
) -> MergePlan:
    """Open inputs (headers only) and plan every output tensor. Raises before any heavy work.
    Inputs it opens, and outputs, refuse NaN / ±inf values unless ``allow_nonfinite``. A
    data-aware recipe's ``data:`` entries are collected here by ``collect``, after every
    other check (`engine.data_inputs`)."""
    opened: dict[str, CheckpointReader] = dict(readers or {})
    try:
        method = get_method(recipe.method_name)  # unknown method: fail before opening files
        if recipe.lines is not None and not method.needs_base:
            raise MergeValidationError(
                f"the LiNeS post-step (`lines:`) scales the merged task vector (merged - base); "
                f"method '{method.name}' takes no base_model, so it has none"
            )
        for ref in recipe.model_references():
            if ref not in opened:
                opened[ref] = open_checkpoint(ref, check_finite=not allow_nonfinite)
        planner = _Planner(recipe, opened)
        planner.check_param_names(recipe.parameters, "parameters", False)
        if recipe.models:
            jobs, reference = planner.plan_models()
            layers = None
        else:
            jobs, reference, layers = planner.plan_slices()
        if not jobs:
            raise MergeValidationError("the recipe selects no tensors to write")
        names = [j.out.name for j in jobs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise MergeValidationError(f"two output tensors would be named '{dup}'")
        requests = topk_requests(planner.method, jobs)
        merged = {j.out.name: j.out.shape for j in jobs if j.kind == "merge"}
        data = load_data_inputs(recipe, planner.method, merged, collect=collect)
    except BaseException:
        for r in opened.values():
            r.close()
        raise
    return MergePlan(
        recipe=recipe,
        method=planner.method,
        jobs=jobs,
        readers=opened,
        compute_dtype=planner.compute_dtype,
        reference=reference,
        num_layers_out=layers,
        stat_requests=requests,
        allow_nonfinite=allow_nonfinite,
        data=data,
    )
