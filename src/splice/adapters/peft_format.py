"""Save and load an `AdapterModel`'s adapters as PEFT adapter folders.

The folder format (files, key names, the one writer) is `splice.peft.files`; this module maps
an adapter's layers to and from it: each adapted layer's ``peft_state`` under
`saved_key(path, suffix)`, tensors shared by all layers (VeRA's ``base_model.vera_A``) once
under their own keys, model-level adapters' (prompt / prefix tuning) under theirs
(``prompt_embeddings``), as PEFT does. Folders are written through
`splice.io.output_folder.OutputFolder` (locked, built aside, renamed into place; `overwrite`
1 replaces a previous splice output, 2 any folder). Loading reads only regular files inside
the adapter folder's allowed root (`splice.io.safe_paths`), validates the config (unknown or
non-inert options are errors) and requires every expected tensor with its shape, and no
unexpected one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterStateError
from splice.adapters.model import AdapterModel, PreparedAdapter
from splice.adapters.registry import method_for_config, method_for_peft_type
from splice.io.output_folder import OutputFolder
from splice.peft.files import (
    CONFIG_NAME,
    read_config,
    read_weights,
    saved_key,
    write_adapter_folder_files,
)


def _task_type(model: torch.nn.Module) -> str | None:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    cls = type(model).__name__
    for name in [cls, *archs]:
        if name.endswith(("ForCausalLM", "LMHeadModel")):  # GPT2LMHeadModel
            return "CAUSAL_LM"
        if name.endswith("ForSequenceClassification"):
            return "SEQ_CLS"
        if name.endswith("ForTokenClassification"):
            return "TOKEN_CLS"
        if name.endswith("ForQuestionAnswering"):
            return "QUESTION_ANS"
    return None


def adapter_state(am: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under PEFT's saved key names."""
    am._check(name)
    model_adapter = dict(am.model_adapters.items()).get(name)  # ModuleDict has no get
    return _state(list(am.named_adapter_modules(name)), model_adapter)


def _state(modules: list[tuple[str, Any]], model_adapter: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path, module in modules:
        for suffix, t in module.peft_state().items():
            state[saved_key(path, suffix)] = t
        state.update(module.shared_state())  # tensors shared across layers (VeRA), once
    if model_adapter is not None:
        state.update(model_adapter.peft_state())
    return state


def save_adapter(
    am: AdapterModel,
    out_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    overwrite: int | bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write adapter ``name`` as a PEFT adapter folder at ``out_dir`` (atomically)."""
    folder = OutputFolder(out_dir, overwrite=overwrite).check()
    am._check(name)
    with folder as tmp:
        save_adapter_files(
            am,
            tmp,
            name,
            base_model_name_or_path=base_model_name_or_path,
            extra_config=extra_config,
        )
    return Path(out_dir)


def save_adapter_files(
    am: AdapterModel,
    folder: Path,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
    saved: tuple[AdapterConfig, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write adapter ``name``'s PEFT files into ``folder`` (an `OutputFolder`'s partial one);
    ``saved`` replaces its (config, tensors), e.g. PiSSA converted to LoRA."""
    am._check(name)
    config, state = saved if saved is not None else (am.configs[name], adapter_state(am, name))
    cfg: dict[str, Any] = config.to_peft()
    cfg["task_type"] = _task_type(am.model)
    cfg["base_model_name_or_path"] = base_model_name_or_path or getattr(
        getattr(am.model, "config", None), "_name_or_path", None
    )
    cfg["inference_mode"] = True
    cfg.update(extra_config or {})
    write_adapter_folder_files(folder, cfg, state)


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(method, raw config dict) of a PEFT/splice adapter folder; clear errors otherwise."""
    _, raw = read_config(adapter_dir)
    return method_for_peft_type(str(raw["peft_type"])), raw


def load_adapter(
    am: AdapterModel,
    adapter_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool | None = None,
) -> None:
    """Add the adapter saved at ``adapter_dir`` to ``am`` under ``name``: `read_adapter`,
    `build_adapter`, then ``am.attach_adapter``."""
    config, weights = read_adapter(adapter_dir)
    prepared = build_adapter(am, name, config, weights, str(adapter_dir))
    am.attach_adapter(prepared, activate=activate)
    for p in am.adapter_parameters(name):
        p.requires_grad_(trainable)


def read_adapter(
    adapter_dir: str | os.PathLike[str],
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The folder's validated config and its tensors; touches no model."""
    method, raw = read_adapter_config(adapter_dir)
    config = method.config_cls.from_peft(raw, where=f"{adapter_dir}/{CONFIG_NAME}")
    return config, read_weights(adapter_dir)


def build_adapter(
    am: AdapterModel,
    name: str,
    config: AdapterConfig,
    weights: dict[str, torch.Tensor],
    where: str,
) -> PreparedAdapter:
    """Adapter ``name`` built against ``am`` (`AdapterModel.prepare_adapter`: the model is
    only read, not changed) with ``weights`` loaded: every expected tensor with its shape,
    no unexpected one. ``am.attach_adapter`` then injects it. A server does this and
    `read_adapter` in a worker thread while its decode loop runs the model."""
    prepared = am.prepare_adapter(name, config)
    _load_state(prepared, weights, where)
    return prepared


def _load_state(prepared: PreparedAdapter, weights: dict[str, torch.Tensor], where: str) -> None:
    expected = set(_state(prepared.modules, prepared.model_adapter))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise AdapterStateError(
            f"{where}: {len(unexpected)} saved tensor(s) match no adapted module, e.g. "
            f"{unexpected[0]!r} (was it saved for another model?)"
        )
    for path, module in prepared.modules:
        prefix = saved_key(path, "")
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        # keys of nested paths (a.b and a.b.c) share a prefix: keep only this module's own
        own = set(module.peft_state())
        module.load_peft_state({k: v for k, v in sub.items() if k in own}, f"{where}: {path}")
        shared = set(module.shared_state())
        if shared:
            module.load_shared_state({k: v for k, v in weights.items() if k in shared}, where)
    if prepared.model_adapter is not None:
        madapter = prepared.model_adapter
        own = set(madapter.peft_state())
        madapter.load_peft_state({k: v for k, v in weights.items() if k in own}, where)


def load_adapter_model(
    model: torch.nn.Module,
    adapter_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    trainable: bool = False,
) -> AdapterModel:
    """Wrap ``model`` and load one adapter: splice's ``PeftModel.from_pretrained``."""
    am = AdapterModel(model)
    load_adapter(am, adapter_dir, name, trainable=trainable)
    return am


def config_of(am: AdapterModel, name: str) -> dict[str, Any]:
    cfg = am.configs.get(name)
    if cfg is None:
        raise AdapterConfigError(f"no adapter named '{name}'")
    return {"method": method_for_config(cfg).name, **cfg.model_dump(mode="json")}
