"""`AdapterModel`: a model with named adapters — add, activate, disable, delete, fold.

    am = AdapterModel(model)                        # any torch.nn.Module; HF models first
    am.add_adapter("sst", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    am.set_active(["sst", "style"])                 # one or several at once
    with am.disabled(): ...                         # the base model's outputs
    am.fold("sst"); am.unfold("sst")                # into the weights and back, exactly
    am.deltas("sst")                                # {param name: ΔW} (DESIGN.md deltas)
    am(input_ids, adapter_names=["sst", "__base__", {"sst": 0.5, "style": 0.5}])  # per row
    am.set_active(Stack("lang", "sst"))             # a composition block (splice.compose)
    am.add_fusion(Fuse("sst", "style", name="f"))   # AdapterFusion's trained parameters
    plain = am.merge_and_unload()                   # fold for good, drop the wrappers

Adding an adapter freezes every base parameter; the new adapter's parameters are trainable.
The wrapped model's attributes are reachable through the wrapper (``am.config``,
``am.generate``), and ``am(...)`` calls the model with the active model-level adapters
(prompt / prefix tuning) applied to its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.default_targets import DEFAULT_TARGETS, default_targets
from splice.adapters.full_copy import FullCopy
from splice.adapters.layer import AdaptedLayer, AdapterModule, AdapterStateError
from splice.adapters.mixed_batch import BASE_NAME, mixed_forward, plan_rows
from splice.adapters.mixed_prompts import generate_mixed, model_level_rows, prepare_mixed_call
from splice.adapters.model_adapter import ModelAdapter
from splice.adapters.registry import method_for_config
from splice.adapters.targeting import (
    find_targets,
    get_submodule,
    matches,
    named_base_modules,
    set_submodule,
    suggest_names,
)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclass
class PreparedAdapter:
    """An adapter built against a model but not attached to it (`AdapterModel.prepare_adapter`):
    its completed config, its modules by layer path (adapted layers and full copies) and its
    model-level module (prompt / prefix tuning), if any."""

    name: str
    config: AdapterConfig
    modules: list[tuple[str, AdapterModule]] = field(default_factory=list)
    model_adapter: ModelAdapter | None = None


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward's inputs: the first axis of ``input_ids`` /
    ``inputs_embeds`` / ``pixel_values``, else of the first positional tensor."""
    for key in ("input_ids", "inputs_embeds", "pixel_values"):
        if isinstance(kwargs.get(key), Tensor):
            return int(kwargs[key].shape[0])
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else None


def _rows_per_sequence(model: nn.Module, kwargs: dict) -> int:
    """How many rows HF ``generate`` decodes per input sequence:
    max(num_beams, num_return_sequences), keywords over the generation config."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    counts = []
    for key in ("num_beams", "num_return_sequences"):
        value = kwargs.get(key)
        value = getattr(config, key, None) if value is None else value
        counts.append(value if isinstance(value, int) and value > 0 else 1)
    return max(counts)


class AdapterModel(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, AdapterModel):
            raise AdapterStateError("the model is already an AdapterModel")
        self.model = model
        self.model_adapters = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}
        self.active: list[str] = []
        # the active composition block's runner (`splice.compose.blocks_activate`), or None
        self.composition: Any = None
        # AdapterFusion layers by fusion name (`splice.compose.fusion`)
        self.fusions = nn.ModuleDict()

    # -- wrapped model passthrough --------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's forward with the active adapters; ``adapter_names`` (one entry
        per row: a name, "__base__", or a weighted set) runs a mixed-adapter batch instead
        (`splice.adapters.mixed_batch`)."""
        if adapter_names is not None:
            plan = plan_rows(self, adapter_names, _batch_size(args, kwargs))
            args, kwargs = prepare_mixed_call(self, plan, args, kwargs)  # prompt / prefix rows
            with mixed_forward(self, plan):
                return self.model(*args, **kwargs)
        if self.composition is not None and not getattr(self, "_disabled", False):
            return self.composition.forward(self, args, kwargs)
        for name in self._running_model_adapters():
            args, kwargs = self.model_adapters[name].prepare(self.model, args, kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` with the active adapters; ``adapter_names`` (one
        entry per input sequence, as in `forward`) holds each sequence's adapters for every
        decoding step (`splice.adapters.mixed_batch`)."""
        if adapter_names is not None:
            size = _batch_size(args, {"input_ids": kwargs.get("inputs"), **kwargs})
            plan = plan_rows(self, adapter_names, size)
            plan = plan.repeat_rows(_rows_per_sequence(self.model, kwargs))
            with mixed_forward(self, plan):
                if model_level_rows(self, plan):  # prompt / prefix rows: per-row prefill
                    return generate_mixed(self, plan, args, kwargs)
                return self.model.generate(*args, **kwargs)
        if self.composition is not None and not getattr(self, "_disabled", False):
            return self.composition.generate(self, args, kwargs)
        running = self._running_model_adapters()
        if len(running) > 1:
            raise AdapterStateError(
                f"generate() with several active model-level adapters {running} is not supported"
            )
        if running:  # the adapter rewrites each step's inputs (ModelAdapter.generate)
            return self.model_adapters[running[0]].generate(self.model, args, kwargs)
        return self.model.generate(*args, **kwargs)

    # -- layers -----------------------------------------------------------------------------

    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        """(path, layer) of every adapted layer, in ``named_modules`` order. The walk does not
        descend into the adapters' own modules (their factors, vectors, ...; a `FullCopy` is
        still walked, as it copies base modules): with many adapters loaded those are most of
        the module tree, and this runs at every mixed-batch forward."""
        seen: set[int] = set()
        stack: list[tuple[str, nn.Module]] = [("", self.model)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, AdaptedLayer):
                yield path, module
            elif isinstance(module, AdapterModule) and not isinstance(module, FullCopy):
                continue
            children: list[tuple[str, nn.Module]] = []
            for name, child in module._modules.items():
                if name == "adapters" and isinstance(module, AdaptedLayer):
                    # of the adapters only the full copies: pushing every adapter module to
                    # skip it when popped was most of the walk with many adapters loaded
                    children += [
                        (f"adapters.{n}", c)
                        for n, c in child._modules.items()
                        if isinstance(c, FullCopy)
                    ]
                elif child is not None:
                    children.append((name, child))
            for name, child in reversed(children):
                stack.append((f"{path}.{name}" if path else name, child))

    def _running_model_adapters(self) -> list[str]:
        if getattr(self, "_disabled", False):
            return []
        return [n for n in self.active if n in self.model_adapters]

    # -- adding and removing -------------------------------------------------------------

    def add_adapter(
        self, name: str, config: AdapterConfig, *, activate: bool | None = None
    ) -> None:
        """Inject adapter ``name``. ``activate`` defaults to True for the first adapter."""
        self.attach_adapter(self.prepare_adapter(name, config), activate=activate)

    def prepare_adapter(self, name: str, config: AdapterConfig) -> PreparedAdapter:
        """Build adapter ``name``'s modules against the model without changing the model
        (`attach_adapter` injects them): the config is checked and completed, every module is
        built, so that nothing is half-injected when one fails. Building only reads the model,
        so a server builds while its decode thread runs the model and attaches between two
        steps."""
        self._check_new_name(name)
        method = method_for_config(config)
        modules: list[tuple[str, AdapterModule]] = []
        model_adapter = None
        if method.kind == "model":
            config = config.for_targets(self.model, [])  # e.g. model dimensions filled in
            model_adapter = method.build(self.model, config)
        else:
            config = self._with_default_targets(config, method)
            config, modules = self._build_layers(name, config, method)
        if config.modules_to_save:
            modules += self._build_full_copies(name, config.modules_to_save)
        # New modules start in train mode (nn.Module's default); follow the model's mode, so
        # an adapter added to a model in eval mode has no active dropout.
        mode = self.model.training
        for _, module in modules:
            module.train(mode)
        if model_adapter is not None:
            model_adapter.train(mode)
        return PreparedAdapter(name, config, modules, model_adapter)

    def attach_adapter(self, prepared: PreparedAdapter, *, activate: bool | None = None) -> None:
        """Inject a `prepare_adapter` result: its parameters become trainable, every other
        parameter is frozen. ``activate`` defaults to True for the first adapter."""
        name = prepared.name
        self._check_new_name(name)
        if prepared.model_adapter is not None:
            self.model_adapters[name] = prepared.model_adapter
        for path, module in prepared.modules:
            self._wrap(path).adapters[name] = module
        self.configs[name] = prepared.config
        self._freeze_base()
        for p in self.adapter_parameters(name):
            p.requires_grad_(True)
        if activate or (activate is None and not self.active):
            self.set_active([*self.active, name] if activate and self.active else [name])

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise AdapterConfigError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
        if name == BASE_NAME:
            raise AdapterConfigError(f"{BASE_NAME!r} names the base model in adapter_names")
        if name in self.configs:
            raise AdapterConfigError(f"an adapter named '{name}' already exists")

    def _with_default_targets(self, config: AdapterConfig, method: Any) -> AdapterConfig:
        if config.target_modules is not None or method.name not in DEFAULT_TARGETS:
            return config
        model_type = getattr(getattr(self.model, "config", None), "model_type", "")
        targets = default_targets(method.name, model_type)
        if not targets:
            raise AdapterConfigError(
                f"'{method.name}': set target_modules (no default for model type "
                f"{model_type!r}); module names here: {suggest_names(self.model)}"
            )
        return config.model_copy(update={"target_modules": targets})

    def _build_layers(
        self, name: str, config: AdapterConfig, method: Any
    ) -> tuple[AdapterConfig, list[tuple[str, AdapterModule]]]:
        paths = find_targets(self.model, config.target_modules, config.exclude_modules)
        if config.modules_to_save:
            paths = [p for p in paths if not matches(config.modules_to_save, p)]
        if not paths:
            raise AdapterConfigError(
                f"adapter '{name}': target_modules {config.target_modules!r} matched no module;"
                f" module names here: {suggest_names(self.model)}"
            )
        config = config.for_targets(self.model, [(p, self._base_of(p)) for p in paths])
        built: list[tuple[str, AdapterModule]] = []
        for path in paths:
            base = self._base_of(path)
            module = method.build(base, config, path)
            if module is None:
                raise AdapterConfigError(
                    f"adapter '{name}' ({method.name}): module '{path}' is a "
                    f"{type(base).__name__}, which {method.name} does not support"
                )
            built.append((path, module))
        return config, built

    def _build_full_copies(
        self, name: str, modules_to_save: list[str]
    ) -> list[tuple[str, AdapterModule]]:
        paths = [p for p, _ in named_base_modules(self.model) if p and matches(modules_to_save, p)]
        # the outermost matches only (a head, not also its sublayers)
        paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
        if not paths:
            raise AdapterConfigError(
                f"adapter '{name}': modules_to_save {modules_to_save!r} matched no module"
            )
        return [(path, FullCopy(self._base_of(path))) for path in paths]

    def _base_of(self, path: str) -> nn.Module:
        module = get_submodule(self.model, path)
        return module.base_layer if isinstance(module, AdaptedLayer) else module

    def _wrap(self, path: str) -> AdaptedLayer:
        module = get_submodule(self.model, path)
        if isinstance(module, AdaptedLayer):
            return module
        layer = AdaptedLayer(module)
        layer.active = list(self.active)
        set_submodule(self.model, path, layer)
        return layer

    def _freeze_base(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.model_adapters.parameters():
            p.requires_grad_(False)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        for path, layer in list(self.adapted_layers()):
            if name in layer.adapters:
                layer.unfold(name)
                del layer.adapters[name]
                if name in layer.active:
                    layer.active.remove(name)
                if not len(layer.adapters):
                    set_submodule(self.model, path, layer.base_layer)
        if name in self.model_adapters:
            del self.model_adapters[name]
        del self.configs[name]
        if name in self.active:
            self.set_active([n for n in self.active if n != name])

    # -- activation ------------------------------------------------------------------------

    def set_active(self, names: Any) -> None:
        """Activate a name, a list of names (applied together), or a composition block
        (`splice.compose`: Stack, Parallel, Average, Fuse), which checks and activates itself."""
        if hasattr(names, "activate"):
            names.activate(self)
            return
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check(n)
        self.active = names
        self.composition = None
        for _, layer in self.adapted_layers():
            layer.active = [n for n in names if n in layer.adapters]
            layer.composition = None

    def add_fusion(self, fuse: Any, config: Any = None) -> None:
        """Add the trainable fusion layers of a `splice.compose.Fuse` block (AdapterFusion)
        over its adapters; ``config``: a `splice.compose.FusionConfig` or its dict."""
        fuse.add_to(self, config)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: no adapter applies (folded adapters are unfolded for the
        duration and folded back after)."""
        folded = {p: layer.folded for p, layer in self.adapted_layers()}
        for _, layer in self.adapted_layers():
            for n in reversed(layer.folded):
                layer.unfold(n)
            layer.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for p, layer in self.adapted_layers():
                layer.disabled = False
                for n in folded.get(p, []):
                    layer.fold(n)

    # -- folding -----------------------------------------------------------------------------

    def fold(self, names: str | list[str] | None = None) -> None:
        """Add the deltas of ``names`` (default: the active adapters) to the base weights."""
        names = self._names(names)
        for n in names:
            if n in self.model_adapters:
                raise AdapterStateError(
                    f"adapter '{n}' is a model-level adapter: no weights to fold into"
                )
        layers = [layer for _, layer in self.adapted_layers()]
        for n in names:  # check every layer before changing any
            for layer in layers:
                if n in layer.adapters and not layer.adapters[n].foldable:
                    raise AdapterStateError(
                        f"adapter '{n}' ({type(layer.adapters[n]).__name__}) acts on "
                        "activations and cannot be folded into weights"
                    )
        for n in names:
            for layer in layers:
                if n in layer.adapters:
                    layer.fold(n)

    def unfold(self, names: str | list[str] | None = None) -> None:
        """Restore the exact weights from before folding ``names`` (default: all folded)."""
        for _, layer in self.adapted_layers():
            for n in reversed(layer.folded if names is None else self._names(names)):
                layer.unfold(n)

    def merge_and_unload(self, names: str | list[str] | None = None) -> nn.Module:
        """Fold ``names`` (default: active) for good and return the plain model (wrappers
        removed, other adapters dropped)."""
        self.fold(names)
        for path, layer in list(self.adapted_layers()):
            layer.commit_folds()
            set_submodule(self.model, path, layer.base_layer)
        model = self.model
        self.configs.clear()
        self.active = []
        return model

    # -- parameters and deltas ---------------------------------------------------------------

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        self._check(name)
        params = []
        for _, layer in self.adapted_layers():
            if name in layer.adapters:
                params.extend(layer.adapters[name].parameters())
        if name in self.model_adapters:
            params.extend(self.model_adapters[name].parameters())
        return params

    def named_adapter_modules(self, name: str) -> Iterator[tuple[str, AdapterModule]]:
        """(layer path, adapter module) for adapter ``name``."""
        for path, layer in self.adapted_layers():
            if name in layer.adapters:
                yield path, layer.adapters[name]

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; the total counts each tensor once."""
        seen: dict[int, nn.Parameter] = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in seen.values())
        trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
        return trainable, total

    def print_trainable_parameters(self) -> str:
        t, n = self.trainable_parameters()
        line = (
            f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
        )
        print(line)
        return line

    def deltas(self, name: str) -> dict[str, Tensor]:
        """Dense ΔW (float32) of adapter ``name`` by the base model's parameter name."""
        self._check(name)
        if name in self.model_adapters:
            raise AdapterStateError(f"adapter '{name}' is a model-level adapter: it has no delta")
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            for path, module in self.named_adapter_modules(name):
                layer = get_submodule(self.model, path)
                params = dict(layer.base_layer.named_parameters())
                for pname, d in module.delta(layer.base_layer).items():
                    out[f"{path}.{pname}"] = d.to_dense(params[pname].detach()).detach().cpu()
        return out

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, name: str) -> None:
        if name not in self.configs:
            known = ", ".join(self.configs) or "none"
            raise AdapterConfigError(f"no adapter named '{name}' (adapters: {known})")

    def _names(self, names: str | list[str] | None) -> list[str]:
        if names is None:
            return list(self.active)
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check(n)
        return names

    def model_adapter(self, name: str) -> ModelAdapter:
        return self.model_adapters[name]
