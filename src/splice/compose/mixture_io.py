"""A routed mixture saved as a folder, and built from expert folders.

    mixture_config.json   {"format": "splice-mixture", "version": 1, "gate": "token",
                           "top_k": 2, "balance_coef": 0.01,
                           "experts": {"math": "/abs/path/math-lora", ...},
                           "layers": [adapted layer paths], "hidden_size": null}
    gate.safetensors      the gate weights: "<layer path>.weight" per token gate, or
                           "sequence.weight" / "sequence.bias" for a sequence gate

No pickle: the gate is safetensors, the config JSON. The experts stay in their own adapter
folders, referenced by path (relative paths are relative to the mixture folder);
`load_mixture` loads those not already on the `AdapterModel` under their names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save

from splice.adapters import AdapterModel, load_adapter
from splice.compose.mixture import SEQUENCE_GATE, Mixture, gate_key
from splice.compose.mixture_config import (
    MixtureConfig,
    MixtureError,
    MixtureOptions,
    parse_mixture_config,
)
from splice.config_errors import parse_config
from splice.io.output_folder import OutputFolder, write_bytes
from splice.io.safe_paths import allowed_root, member
from splice.io.safetensors_reader import SafetensorsReader
from splice.io.textfile import load_json_object
from splice.peft.files import CONFIG_NAME as ADAPTER_CONFIG

MIXTURE_METHOD = "mixture"  # splice train's method name
FORMAT = "splice-mixture"
CONFIG_FILE = "mixture_config.json"
GATE_FILE = "gate.safetensors"


class SavedMixture(MixtureConfig):
    """``mixture_config.json``."""

    format: Literal["splice-mixture"]
    version: Literal[1]
    layers: list[str]
    hidden_size: int | None = None


def mixture_config_of(
    method: str, params: dict[str, Any], where: str = "adapter"
) -> MixtureConfig | None:
    """The mixture config of a ``splice train`` adapter section (``method: mixture``), checked
    (every expert folder holds an adapter config); None for any other method."""
    if method != MIXTURE_METHOD:
        return None
    config = parse_mixture_config(params, where)
    for name, path in config.experts.items():
        if not path or not (Path(path) / ADAPTER_CONFIG).is_file():
            raise MixtureError(f"{where}: expert '{name}': {path} is not an adapter folder")
    return config


def gate_state(mixture: Mixture) -> dict[str, torch.Tensor]:
    """The gate tensors by saved key (module docstring)."""
    out: dict[str, torch.Tensor] = {}
    if mixture.gate_kind == "sequence":
        gate = mixture.gates[SEQUENCE_GATE]
        out[f"{SEQUENCE_GATE}.weight"] = gate.weight
        out[f"{SEQUENCE_GATE}.bias"] = gate.bias
    else:
        for path in mixture.layer_paths:
            out[f"{path}.weight"] = mixture.gates[gate_key(path)].weight
    return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}


def write_mixture_files(
    mixture: Mixture, folder: Path, expert_paths: Mapping[str, str | None] | None = None
) -> None:
    """Write the config and the gate into ``folder`` (an `OutputFolder`'s partial folder).
    ``expert_paths``: name -> adapter folder (stored absolute); None for an expert the user
    loads before `load_mixture`."""
    paths = dict(expert_paths or {})
    experts = {n: (os.path.abspath(paths[n]) if paths.get(n) else None) for n in mixture.experts}
    sequence = mixture.gates[SEQUENCE_GATE] if mixture.gate_kind == "sequence" else None
    config = {
        "format": FORMAT,
        "version": 1,
        **mixture.options.model_dump(mode="json"),
        "experts": experts,
        "layers": mixture.layer_paths,
        "hidden_size": int(sequence.weight.shape[1]) if sequence is not None else None,
    }
    write_bytes(folder / GATE_FILE, save(gate_state(mixture), metadata={"format": "pt"}))
    write_bytes(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def save_mixture(
    mixture: Mixture,
    out: str | os.PathLike[str],
    *,
    expert_paths: Mapping[str, str | None] | None = None,
    overwrite: int | bool = False,
) -> Path:
    """Write the mixture folder atomically (`OutputFolder`); returns its path."""
    folder = OutputFolder(out, overwrite=overwrite).check()
    with folder as partial:
        write_mixture_files(mixture, partial, expert_paths)
    return Path(out)


def load_experts(
    am: AdapterModel, experts: Mapping[str, str | None], base_dir: Path | None = None
) -> None:
    """Load each expert not already on ``am`` from its folder, under its name, frozen and
    inactive. Checks every folder exists before loading any."""
    todo: list[tuple[str, Path]] = []
    for name, path in experts.items():
        if name in am.configs:
            continue
        if not path:
            raise MixtureError(f"expert '{name}' is not loaded and no folder is given for it")
        p = Path(path)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_dir():
            raise MixtureError(f"expert '{name}': {path} is not an adapter folder")
        todo.append((name, p))
    for name, p in todo:
        load_adapter(am, p, name, activate=False)


def _options(config: MixtureOptions) -> dict[str, Any]:
    """The routing options of a config (or a saved mixture) as `Mixture` keywords."""
    return config.model_dump(include=set(MixtureOptions.model_fields))


def build_mixture(
    am: AdapterModel, config: MixtureConfig, *, base_dir: Path | None = None
) -> Mixture:
    """Load the experts ``config`` names (`load_experts`) and build a fresh gate over them."""
    load_experts(am, config.experts, base_dir)
    return Mixture(am, list(config.experts), **_options(config))


def load_mixture(am: AdapterModel, folder: str | os.PathLike[str]) -> Mixture:
    """The mixture saved in ``folder`` on ``am``: experts loaded (`load_experts`) unless
    already there under their names, the gate weights restored (checked key by key)."""
    d = Path(folder)
    root = allowed_root(d)
    config_path = member(d, CONFIG_FILE, root, MixtureError) if d.is_dir() else None
    gate_path = member(d, GATE_FILE, root, MixtureError) if d.is_dir() else None
    if config_path is None or gate_path is None:
        raise MixtureError(f"{folder}: not a mixture folder (no {CONFIG_FILE} / {GATE_FILE})")
    raw = load_json_object(config_path, MixtureError)
    saved = parse_config(SavedMixture, raw, str(config_path), MixtureError, list_valid=True)
    load_experts(am, saved.experts, d)
    mixture = Mixture(am, list(saved.experts), **_options(saved), hidden_size=saved.hidden_size)
    if mixture.layer_paths != saved.layers:
        raise MixtureError(
            f"{folder}: the experts adapt {len(mixture.layer_paths)} layers here, the saved "
            f"gate routes {len(saved.layers)} (another model or other experts?)"
        )
    with SafetensorsReader(gate_path) as reader:
        state = {n: reader.read(n) for n in reader.names()}
    own = gate_state(mixture)
    if set(state) != set(own):
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        raise MixtureError(
            f"{gate_path}: gate tensors missing {missing[:2]}, unexpected {extra[:2]}"
        )
    targets = dict(zip(own, _gate_params(mixture), strict=True))
    for key, tensor in state.items():
        param = targets[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise MixtureError(
                f"{gate_path}: '{key}' has shape {tuple(tensor.shape)}, expected "
                f"{tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
    return mixture


def _gate_params(mixture: Mixture) -> list[torch.nn.Parameter]:
    """The gate parameters in `gate_state`'s key order."""
    if mixture.gate_kind == "sequence":
        gate = mixture.gates[SEQUENCE_GATE]
        return [gate.weight, gate.bias]
    return [mixture.gates[gate_key(p)].weight for p in mixture.layer_paths]
