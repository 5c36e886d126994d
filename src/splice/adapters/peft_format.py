"""Save and load adapters in PEFT's folder format.

    adapter_config.json          {"peft_type": "LORA", "r": 8, ...}   (splice-only methods:
                                  "peft_type": "SPLICE_<NAME>", same layout)
    adapter_model.safetensors    keys "base_model.model.<module path>.<suffix>", the adapter
                                  name removed (PEFT's naming), e.g.
                                  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight

Model-level adapters (prompt / prefix tuning) save their tensors under their own keys
(``prompt_embeddings``), as PEFT does. Folders are written through
`splice.io.output_folder.OutputFolder` (locked, built aside, renamed into place; `overwrite`
1 replaces a previous splice output, 2 any folder). Loading reads only regular files inside
the adapter folder's allowed root (`splice.io.safe_paths`), validates the config (unknown or
non-inert options are errors) and requires every expected tensor with its shape, and no
unexpected one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from splice.adapters.config import AdapterConfigError
from splice.adapters.layer import AdapterStateError
from splice.adapters.model import AdapterModel
from splice.adapters.registry import method_for_config, method_for_peft_type
from splice.errors import CheckpointError
from splice.io.output_folder import OutputFolder, write_bytes
from splice.io.safe_paths import allowed_root, member
from splice.io.textfile import load_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


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
    state: dict[str, torch.Tensor] = {}
    for path, module in am.named_adapter_modules(name):
        for suffix, t in module.peft_state().items():
            state[f"{PREFIX}{path}.{suffix}"] = t
        state.update(module.shared_state())  # tensors shared across layers (VeRA), once
    if name in am.model_adapters:
        state.update(am.model_adapters[name].peft_state())
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
        write_adapter_files(
            am,
            tmp,
            name,
            base_model_name_or_path=base_model_name_or_path,
            extra_config=extra_config,
        )
    return Path(out_dir)


def write_adapter_files(
    am: AdapterModel,
    folder: Path,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Write adapter ``name``'s PEFT files into ``folder`` (an `OutputFolder`'s partial one)."""
    config = am.configs.get(name)
    if config is None:
        am._check(name)
    assert config is not None
    cfg: dict[str, Any] = config.to_peft()
    cfg["task_type"] = _task_type(am.model)
    cfg["base_model_name_or_path"] = base_model_name_or_path or getattr(
        getattr(am.model, "config", None), "_name_or_path", None
    )
    cfg["inference_mode"] = True
    cfg.update(extra_config or {})
    state = {k: v.detach().contiguous().cpu().clone() for k, v in adapter_state(am, name).items()}
    write_bytes(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    write_bytes(folder / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(method, raw config dict) of a PEFT/splice adapter folder; clear errors otherwise."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not an adapter folder (no such directory)")
    cfg_path = member(d, CONFIG_NAME)
    if cfg_path is None:
        raise CheckpointError(f"{d}: not an adapter folder (no {CONFIG_NAME})")
    raw = load_json(cfg_path, CheckpointError)
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise CheckpointError(f"{cfg_path}: no 'peft_type'")
    return method_for_peft_type(str(raw["peft_type"])), raw


def read_adapter_weights(adapter_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from splice.io.open import open_path

    d = Path(adapter_dir)
    root = allowed_root(d)
    for fname in (WEIGHTS_NAME, "adapter_model.bin"):
        if (path := member(d, fname, root)) is not None:
            reader = open_path(path)
            try:
                return {n: reader.read(n) for n in reader.names()}
            finally:
                reader.close()
    raise CheckpointError(f"{d}: no {WEIGHTS_NAME} (or adapter_model.bin)")


def load_adapter(
    am: AdapterModel,
    adapter_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool | None = None,
) -> None:
    """Add the adapter saved at ``adapter_dir`` to ``am`` under ``name``."""
    method, raw = read_adapter_config(adapter_dir)
    config = method.config_cls.from_peft(raw, where=f"{adapter_dir}/{CONFIG_NAME}")
    weights = read_adapter_weights(adapter_dir)
    am.add_adapter(name, config, activate=activate)
    try:
        _load_state(am, name, weights, str(adapter_dir))
    except BaseException:
        am.delete_adapter(name)
        raise
    for p in am.adapter_parameters(name):
        p.requires_grad_(trainable)


def _load_state(am: AdapterModel, name: str, weights: dict[str, torch.Tensor], where: str) -> None:
    expected = set(adapter_state(am, name))
    unexpected = sorted(set(weights) - expected)
    if unexpected:
        raise AdapterStateError(
            f"{where}: {len(unexpected)} saved tensor(s) match no adapted module, e.g. "
            f"{unexpected[0]!r} (was it saved for another model?)"
        )
    for path, module in am.named_adapter_modules(name):
        prefix = f"{PREFIX}{path}."
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        # keys of nested paths (a.b and a.b.c) share a prefix: keep only this module's own
        own = set(module.peft_state())
        module.load_peft_state({k: v for k, v in sub.items() if k in own}, f"{where}: {path}")
        shared = set(module.shared_state())
        if shared:
            module.load_shared_state({k: v for k, v in weights.items() if k in shared}, where)
    if name in am.model_adapters:
        madapter = am.model_adapters[name]
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
