"""AdaMerging of a task-arithmetic recipe's HF sequence classifiers, on the unlabeled texts
its models name, written back as a plain recipe (`splice search --objective adamerging`).

    method: task_arithmetic
    base_model: ./base
    models:
      - {model: ./expert_a, data: bbc_news}                          # a built-in task
      - {model: ./expert_b, data: {source: b.jsonl, max_examples: 256, batch_size: 16}}

Each model is a fine-tuned ``*ForSequenceClassification`` folder; its ``data:`` entry is
read as a recipe's ``data:`` entries are for Fisher / RegMean (`splice.recipe.schema.StatsData`:
``source`` a built-in task or a .csv / .tsv / .jsonl file, ``split``, ``seed``,
``max_examples``, ``batch_size`` (8), ``max_length`` (128); the same split rules as `splice
stats`, `splice.train.statistics`) but only the texts are used: a file's ``text`` column
(``prompt`` + ``completion`` joined), labels ignored. AdaMerging (`splice.train.adamerging`)
then learns λ on those texts, task k's batches through expert k's own head:

    task-wise:   θ = θ0 + Σ_k λ_k τ_k          layer-wise: θ^l = θ0^l + Σ_k λ_k^l τ_k^l

over the **backbone**: the expert tensors under the architecture's ``base_model_prefix``
(``model.`` for Llama, ``bert.`` for BERT); everything else of an expert is its head and is
neither merged nor learned. The backbone names and shapes must be the same in every expert
and in the base.

The learned recipe is the input one without the ``data:`` entries, with ``on_missing: base``
and each model's ``weight``:

- task-wise: λ_k (a scalar), or, when the base shares a head tensor name with the experts,
  ``[{filter: 're:^(?:HEAD NAMES)$', value: 0.0}, {value: λ_k}]``;
- layer-wise: one ``{filter: 're:^NAME$', value: λ_k^l}`` per backbone tensor (``re.escape``
  of its name) and a last ``{value: 0.0}``: the per-tensor form `splice search
  --layer-groups` writes, one filter per tensor instead of per block.

`splice merge` then writes θ0 + Σ_k λ_k τ_k on every backbone tensor (task arithmetic,
λ = 1, no normalization; its order of float operations, so the tensors equal AdaMerging's
own up to float32 rounding) and the base's own tensors everywhere else: weight 0 keeps a
head tensor the base shares with the experts, ``on_missing: base`` copies the base's tensors
the experts lack (an LM head); the folder has the base's config and tokenizer. So the merged
folder holds **no expert head**: it is the base's model with the merged backbone (heads are
per task; to classify task k, load expert k and replace its backbone with the merged one).

AdaMerging++ (``density``, `splice search --objective adamerging++`): λ learned over the
TIES-processed vectors τ̂_k of `splice.train.adamerging.ties_task_vectors` (the bench's code
path: top round(density · N) magnitudes over the whole backbone, sign elected on Σ_k τ̂_k,
the disagreeing entries dropped), and the recipe written is ``method: ties`` with
``parameters: {scope: model, majority: sum, weighted_votes: false, disjoint: sum}`` and each
model's ``density``: `splice merge` trims over the tensors it merges (the backbone: the
base's other tensors are copied, the experts' heads are not in the base), elects the sign
on the unweighted trimmed vectors (TIES's default weighted vote would elect on Σ_k λ_k τ̂_k)
and adds Σ_k λ_k τ̂_k, the same θ0 + Σ_k λ_k τ̂_k up to float32 rounding. Head tensors the
base shares with the experts get density 1 (and weight 0), which keeps them out of the
whole-model trim and its count (`splice.engine.topk.topk_requests`): the base's head is
written as it is.

Everything is checked before any model is loaded: the recipe (``method: task_arithmetic``,
a ``base_model``, ``models:`` that each name ``data:``; no ``parameters``, ``lines``,
``out_dtype``, ``on_missing`` or ``statistics:``, which would change what the written recipe
merges), every model's data (readable, at least one non-empty text), every model a sequence
classifier of the base's ``model_type``, the backbone names and shapes (tensor headers), and
that `splice merge` can plan the recipe to be written. Memory: the K experts loaded (their
heads run the entropy), and AdaMerging's own (the base and the K task vectors in float32,
one merged copy and its graph, one batch's activations): everything in memory. The experts'
backbones are not held a second time: AdaMerging reads them from the files one tensor at a
time (`FileState`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from splice.errors import DataError, MergeValidationError, SpliceError
from splice.recipe.schema import Recipe

REFUSED_KEYS = {
    "parameters": "the weights are what AdaMerging learns; the method's other settings "
    "would change the merge",
    "lines": "a LiNeS post-step would change the learned merge",
    "out_dtype": "the written recipe keeps each tensor's dtype",
    "on_missing": "the written recipe sets on_missing: base",
    "slices": "AdaMerging merges whole models",
}


# The global TIES settings of an AdaMerging++ recipe (`splice.merge.methods.ties`): the
# paper's whole-model trim, sign elected on the unweighted trimmed vectors, disjoint sum.
PLUS_PLUS_PARAMETERS = {
    "scope": "model",
    "majority": "sum",
    "weighted_votes": False,
    "disjoint": "sum",
}


@dataclass(frozen=True)
class AdaMergingTask:
    """One expert of the recipe with its unlabeled texts."""

    model: str  # the recipe's reference
    folder: Path
    texts: list[str]
    batch_size: int
    max_length: int


@dataclass(frozen=True)
class PreparedAdaMerging:
    """A checked recipe: its tasks, the backbone to merge and the raw recipe mapping."""

    raw: dict[str, Any]
    recipe: Recipe
    base: str
    tasks: list[AdaMergingTask]
    backbone: list[str]  # the expert tensors under base_model_prefix, in the base's order
    shared_heads: list[str]  # head tensor names the base has too (weight 0 in the recipe)
    density: float | None = None  # AdaMerging++: the TIES trim density; None: plain
    # what the experts add to the base's tensor names: "" or, for a bare backbone base,
    # the architecture's prefix (`bert.`), written as each model's `tensor_prefix`
    base_prefix: str = ""


@dataclass(frozen=True)
class LearnedRecipe:
    """What AdaMerging learned and the recipe that merges it."""

    recipe: dict[str, Any]
    coefficients: Tensor  # [K] task-wise, [K, L] layer-wise (columns: ``layers``)
    layers: tuple[str, ...]
    models: list[str]
    losses: tuple[float, ...]
    seconds: float
    state: dict[str, Tensor]  # AdaMerging's merged backbone (float32 arithmetic)


def prepare(
    recipe: str | Path | Mapping[str, Any], init: float = 0.3, density: float | None = None
) -> PreparedAdaMerging:
    """Every check of the module docstring, before any model is loaded; the texts read.
    ``density``: AdaMerging++ with that TIES density (in (0, 1]; the paper's 0.2)."""
    from splice.engine.coefficient_search import _load
    from splice.recipe.schema import parse_recipe

    raw = _load(recipe)
    parsed = parse_recipe(raw, str(recipe) if not isinstance(recipe, Mapping) else "recipe")
    _check_recipe(parsed)
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise MergeValidationError(f"AdaMerging++ density must be in (0, 1], got {density!r}")
    assert parsed.models is not None and parsed.base_model is not None
    tasks = [_task(i, e) for i, e in enumerate(parsed.models)]
    base_type = _model_type(parsed.base_model)
    arch = None
    for i, t in enumerate(tasks):
        arch_i, model_type = _classifier(i, t)
        if model_type != base_type:
            raise MergeValidationError(
                f"models[{i}] ({t.model}): model_type {model_type!r}, the base "
                f"{parsed.base_model} {base_type!r}: AdaMerging merges one architecture"
            )
        arch = arch or arch_i
    backbone, heads, added = _backbone(parsed.base_model, tasks, _prefix(arch))
    prepared = PreparedAdaMerging(
        raw, parsed, parsed.base_model, tasks, backbone, heads, density, added
    )
    _check_plannable(prepared, init)
    return prepared


def learn(
    prepared: PreparedAdaMerging,
    *,
    granularity: str = "layer",
    init: float = 0.3,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    lr: float = 1e-3,
    steps: int = 500,
    batches_per_step: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> LearnedRecipe:
    """Load the experts, run `splice.train.adamerging.adamerging` on the prepared texts (task
    k's batches, in file order, through expert k's head) and build the learned recipe."""
    from torch.func import functional_call
    from transformers.utils import logging as hf_logging

    from splice.reference import open_checkpoint
    from splice.train.adamerging import adamerging
    from splice.train.data import tokenize_batch
    from splice.train.models import load_for_task

    models, batches = [], []
    bars = hf_logging.is_progress_bar_enabled()
    for t in prepared.tasks:
        if not progress:  # transformers' "Loading weights" bar too
            hf_logging.disable_progress_bar()
        try:
            model, tok, _ = load_for_task(str(t.folder), "seq_cls", _num_labels(t.folder))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval().requires_grad_(False)
        models.append(model)
        batches.append(
            [
                tokenize_batch(tok, t.texts[i : i + t.batch_size], t.max_length)
                for i in range(0, len(t.texts), t.batch_size)
            ]
        )
    prefix = prepared.base_prefix  # a bare base names `bert.x` as `x`
    stored = [n[len(prefix) :] for n in prepared.backbone]
    reader = open_checkpoint(prepared.base, check_finite=True)
    base = {prefix + n: t for n, t in _read(reader, stored).items()}
    # the experts' backbones are read from their files when AdaMerging reads them (its
    # shape check and its task vectors), one tensor at a time: never a second resident copy
    experts = [
        FileState(open_checkpoint(str(t.folder), check_finite=True), prepared.backbone)
        for t in prepared.tasks
    ]

    def forward(params: Mapping[str, Tensor], k: int, batch: dict) -> Tensor:
        return functional_call(models[k], dict(params), args=(), kwargs=batch).logits

    try:
        result = adamerging(
            base,
            experts,
            batches,
            forward,
            granularity=granularity,  # type: ignore[arg-type]
            init=init,
            clamp=clamp,
            lr=lr,
            steps=steps,
            batches_per_step=batches_per_step,
            ties_density=prepared.density,
            seed=seed,
            progress=progress,
        )
    finally:
        for e in experts:
            e.close()
    names = [t.model for t in prepared.tasks]
    return LearnedRecipe(
        learned_recipe(prepared, result.coefficients, result.layers),
        result.coefficients,
        result.layers,
        names,
        result.losses,
        result.seconds,
        result.state,
    )


def learned_recipe(
    prepared: PreparedAdaMerging, coefficients: Tensor, layers: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """The input recipe without ``data:``, with ``on_missing: base`` and the weights of
    ``coefficients`` ([K]: task-wise; [K, L]: per tensor ``layers[j]``). AdaMerging++
    (``prepared.density``): ``method: ties`` with that density, the whole-model trim, the
    sign elected on the unweighted trimmed vectors and a disjoint sum, i.e. θ0 + Σ_k λ_k τ̂_k
    with τ̂_k of `splice.train.adamerging.ties_task_vectors`."""
    out = {k: v for k, v in prepared.raw.items() if k != "models"}
    out["on_missing"] = "base"
    if prepared.density is not None:
        out["method"] = "ties"
        out["parameters"] = dict(PLUS_PLUS_PARAMETERS)
    models = []
    for k, entry in enumerate(prepared.raw["models"]):
        entry = {key: v for key, v in entry.items() if key != "data"}
        if prepared.base_prefix:
            entry["tensor_prefix"] = prepared.base_prefix
        entry["parameters"] = {"weight": _weight(prepared, coefficients[k], layers)}
        if prepared.density is not None:
            entry["parameters"]["density"] = _density(prepared)
        models.append(entry)
    out["models"] = models
    return out


def _heads_filter(prepared: PreparedAdaMerging) -> str:
    """The recipe filter matching the head tensors the base shares with the experts."""
    return "re:^(?:" + "|".join(re.escape(n) for n in prepared.shared_heads) + ")$"


def _density(prepared: PreparedAdaMerging) -> Any:
    """AdaMerging++'s density; 1 on the head tensors the base shares (weight 0 there), which
    leaves them out of the whole-model trim and its count, as AdaMerging++ trims over the
    backbone only."""
    assert prepared.density is not None
    if not prepared.shared_heads:
        return float(prepared.density)
    return [
        {"filter": _heads_filter(prepared), "value": 1.0},
        {"value": float(prepared.density)},
    ]


def _weight(prepared: PreparedAdaMerging, lam: Tensor, layers: Any) -> Any:
    if lam.dim() == 0:
        if not prepared.shared_heads:
            return float(lam)
        return [{"filter": _heads_filter(prepared), "value": 0.0}, {"value": float(lam)}]
    entries: list[dict[str, Any]] = [
        {"filter": f"re:^{re.escape(name)}$", "value": float(v)}
        for name, v in zip(layers, lam.tolist(), strict=True)
    ]
    return [*entries, {"value": 0.0}]


def write_merged(
    recipe: Mapping[str, Any],
    out: str | Path,
    *,
    overwrite: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> Any:
    """``splice merge`` of ``recipe`` into ``out`` (the same planner and writer, so the
    folder equals ``splice merge RECIPE --out OUT`` bit for bit)."""
    from splice.engine import plan_merge, run_merge
    from splice.engine.coefficient_search import recipe_yaml
    from splice.recipe.schema import parse_recipe

    plan = plan_merge(parse_recipe(dict(recipe), "learned recipe"))
    try:
        return run_merge(
            plan,
            out,
            threads=threads,
            overwrite=overwrite,
            recipe_text=recipe_yaml(recipe),
            progress=progress,
        )
    finally:
        plan.close()


def check_merged_out(out: str | Path, overwrite: int, recipe: Recipe) -> None:
    """The refusal `splice merge` would give for ``out``, before any training."""
    from splice.errors import CheckpointError
    from splice.io.out_location import check_out_location, input_paths, overwrite_refusal

    refusal = overwrite_refusal(
        check_out_location(out), str(out), overwrite, input_paths(recipe.model_references())
    )
    if refusal is not None:
        raise CheckpointError(refusal)


# -- checks --------------------------------------------------------------------------------


def _check_recipe(r: Recipe) -> None:
    if r.dialect != "splice" or r.method != "task_arithmetic":
        raise MergeValidationError(
            f"AdaMerging learns the weights of a task-arithmetic merge: give "
            f"`method: task_arithmetic` (got {r.dialect} method '{r.method_name}')"
        )
    for key, why in REFUSED_KEYS.items():
        if key in r.model_fields_set and getattr(r, key) not in (None, "error"):
            raise MergeValidationError(f"recipe key '{key}' is not used by AdaMerging: {why}")
    if r.dtype not in (None, "float32"):
        raise MergeValidationError(
            f"dtype: AdaMerging computes in float32; remove 'dtype: {r.dtype}' from the recipe"
        )
    if not r.base_model:
        raise MergeValidationError("AdaMerging needs `base_model:` (θ0 of the task vectors)")
    for i, e in enumerate(r.models or []):
        where = f"models[{i}] ({e.model})"
        if e.model == r.base_model:
            raise MergeValidationError(f"{where}: the base is not one of the experts")
        if e.parameters:
            raise MergeValidationError(
                f"{where}.parameters: the weights are what AdaMerging learns; remove them "
                "(--init sets the start)"
            )
        if e.statistics is not None:
            raise MergeValidationError(f"{where}: `statistics:` is not used by AdaMerging")
        if e.data is None:
            raise MergeValidationError(
                f"{where}: AdaMerging needs `data:` on every model (the unlabeled texts of "
                "its task, e.g. `data: bbc_news` or `data: {source: texts.jsonl}`)"
            )
        if "per_example" in e.data.model_fields_set:
            raise MergeValidationError(f"{where}.data.per_example is a Fisher option")


def _task(i: int, e: Any) -> AdaMergingTask:
    """The entry's texts, read as `splice stats` reads them (labels not needed)."""
    from splice.train.models import resolve_model
    from splice.train.statistics import _lm_data, entry_request

    d = e.data
    req = entry_request("gram", e.model, d)  # only its data settings are used: the texts
    try:
        folder = resolve_model(e.model)
    except SpliceError as err:
        raise MergeValidationError(f"models[{i}] ({e.model}): {err}") from None
    try:
        texts = [r.prompt + r.completion for r in _lm_data(req)]
    except SpliceError as err:
        raise DataError(f"models[{i}].data ({e.model}): {err}") from None
    if not any(t.strip() for t in texts):
        raise DataError(f"models[{i}].data ({e.model}): no unlabeled text (every text is empty)")
    return AdaMergingTask(e.model, folder, texts, d.batch_size, d.max_length)


def _config(folder: str | Path) -> dict[str, Any]:
    from splice.train.models import resolve_model
    from splice.train.statistics import _config as read_config

    return read_config(resolve_model(str(folder)))


def _model_type(ref: str) -> Any:
    return _config(ref).get("model_type")


def _num_labels(folder: Path) -> int:
    config = _config(folder)
    return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)


def _classifier(i: int, t: AdaMergingTask) -> tuple[str, Any]:
    """(the ``*ForSequenceClassification`` architecture, model_type) of task i's model."""
    config = _config(t.folder)
    archs = config.get("architectures") or []
    found = [a for a in archs if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if not found:
        raise MergeValidationError(
            f"models[{i}] ({t.model}): not a sequence classifier (config.json architectures "
            f"{archs}); AdaMerging's entropy needs each expert's classification head"
        )
    return found[0], config.get("model_type")


def _prefix(arch: str | None) -> str:
    import transformers

    cls = getattr(transformers, arch or "", None)
    prefix = getattr(cls, "base_model_prefix", "")
    if not prefix:
        raise MergeValidationError(f"transformers has no class {arch} with a base_model_prefix")
    return str(prefix)


def _backbone(
    base: str, tasks: list[AdaMergingTask], prefix: str
) -> tuple[list[str], list[str], str]:
    """The backbone tensor names (the floating ones under ``prefix.``), the same with the
    same shapes in every expert and the base, in the base's order; the head names the base
    has too; and the prefix the experts add to the base's names: "" when the base names
    them as the experts do, or ``prefix.`` for a bare backbone base (e.g. a ``BertModel``'s
    ``embeddings.…`` for the experts' ``bert.embeddings.…``)."""
    from splice.reference import open_checkpoint

    def infos(ref: str) -> dict[str, tuple[int, ...]]:
        """The floating tensors' shapes: integer buffers (``position_ids``) are neither
        merged nor learned (the engine copies the base's), so they are not compared."""
        reader = open_checkpoint(ref)
        try:
            found = {n: reader.info(n) for n in reader.names()}
        finally:
            reader.close()
        return {n: tuple(i.shape) for n, i in found.items() if i.dtype.is_floating_point}

    base_shapes = infos(base)
    start = prefix + "."
    backbone: list[str] = []
    heads: set[str] = set()
    expert_shapes = []
    for i, t in enumerate(tasks):
        shapes = infos(str(t.folder))
        expert_shapes.append(shapes)
        names = [n for n in shapes if n.startswith(start)]
        heads.update(n for n in shapes if not n.startswith(start))
        if not names:
            raise MergeValidationError(
                f"models[{i}] ({t.model}): no tensor under '{start}' (the backbone of its "
                "architecture)"
            )
        if i == 0:
            backbone = names
        elif set(names) != set(backbone):
            odd = sorted(set(names) ^ set(backbone))
            raise MergeValidationError(
                f"models[{i}] ({t.model}): backbone tensors differ from models[0]'s, e.g. "
                f"{odd[:3]} ({len(odd)} in all)"
            )
    added = _base_prefix(base, base_shapes, backbone, start)
    for i, (t, shapes) in enumerate(zip(tasks, expert_shapes, strict=True)):
        for n in backbone:
            if shapes[n] != base_shapes[n[len(added) :]]:
                raise MergeValidationError(
                    f"tensor '{n}': models[{i}] ({t.model}) has shape {list(shapes[n])}, the "
                    f"base {list(base_shapes[n[len(added) :]])}"
                )
    in_backbone = set(backbone)
    if added:  # a bare base: all of its tensors are backbone tensors, none a head
        extra = [n for n in base_shapes if added + n not in in_backbone]
    else:
        extra = [n for n in base_shapes if n.startswith(start) and n not in in_backbone]
    if extra:
        bare = f" (a bare backbone base: all of its tensors are under '{start}' in the experts)"
        raise MergeValidationError(
            f"the base {base} has backbone tensors the experts lack, e.g. {extra[:3]} "
            f"({len(extra)} in all){bare if added else ''}"
        )
    # the base's order: `splice merge` plans in that order
    backbone = [added + n for n in base_shapes if added + n in in_backbone]
    shared = [] if added else sorted(h for h in heads if h in base_shapes)
    return backbone, shared, added


def _base_prefix(base: str, base_shapes: Mapping[str, Any], backbone: list[str], start: str) -> str:
    """ "" when the base has every backbone name, ``start`` when it has every one without
    ``start`` (a bare backbone); otherwise an error naming the first missing tensor."""
    missing = [n for n in backbone if n not in base_shapes]
    if not missing:
        return ""
    bare = [n for n in backbone if n[len(start) :] in base_shapes]
    if len(bare) == len(backbone) and not any(n.startswith(start) for n in base_shapes):
        return start
    if bare:
        raise MergeValidationError(
            f"the base {base} names some backbone tensors with the experts' '{start}' prefix "
            f"and some without (e.g. '{missing[0]}' is not in it); give a base that names "
            "all of them one way"
        )
    raise MergeValidationError(
        f"tensor '{missing[0]}' of the experts is not in the base {base}, with or without "
        f"'{start}' (the base must be the experts' pretrained model)"
    )


def _check_plannable(prepared: PreparedAdaMerging, init: float) -> None:
    """The recipe that will be written (here with every λ = init), planned as `splice merge`
    plans it: a head the base shares with the experts under another shape, say, fails now."""
    from splice.engine import plan_merge
    from splice.recipe.schema import parse_recipe

    probe = learned_recipe(prepared, torch.full((len(prepared.tasks),), float(init)), [])
    try:
        plan = plan_merge(parse_recipe(probe, "learned recipe"))
    except SpliceError as e:
        raise MergeValidationError(
            f"`splice merge` could not run the learned recipe: {e}"
        ) from None
    plan.close()


class FileState(Mapping[str, Tensor]):
    """A checkpoint's tensors ``names`` as a read-only mapping that reads each tensor from
    the file when it is looked up (a fresh tensor, not kept): AdaMerging reads an expert's
    state twice (the shape check, then τ_k = θ_k − θ0, one tensor at a time), so the
    experts' backbones are never held as a copy next to the loaded models.

    Why not the loaded models' own tensors: transformers (5.x) maps a safetensors file into
    memory, so a loaded model's backbone is file-backed and not resident until read; reading
    τ_k through it makes those pages resident (peak RSS as with a copy), while reading the
    file leaves them untouched (the forward passes use the merged tensors, never the model's
    own backbone). Measured in docs/adamerging.md ("Memory")."""

    def __init__(self, reader: Any, names: list[str]) -> None:
        self.reader = reader
        self.names = list(names)
        self._known = set(names)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self.reader.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        self.reader.close()


def _read(reader: Any, names: list[str]) -> dict[str, Tensor]:
    try:
        return {n: reader.read(n) for n in names}
    finally:
        reader.close()
