"""A fusion saved as a folder (safetensors + JSON, no pickle), loadable back.

    fusion_config.json       {"format": "splice_fusion", "version": 1, "name": "fusion_ab",
                              "composition": {"fuse": {"name": ..., "adapters": [a, b]}},
                              "config": {FusionConfig}, "layers": [layer paths],
                              "adapters": {"a": "adapters/a", "b": "adapters/b"}, ...}
    fusion.safetensors       "<layer path>.query.weight" | .query.bias | .key.* | .value.weight
    adapters/<name>/         each fused adapter, *copied* (a PEFT / splice adapter folder)
    head.safetensors         a classifier's head trained with the fusion ("head": its module
                             name in fusion_config.json), e.g. "classifier.weight"; only then

The fused adapters are copied into the folder, so it is complete on its own: loading it needs
the base model only. `load_fusion` loads the adapters (frozen) under their names, adds the
fusion and reads its tensors (every tensor's name and shape checked against the model), and
the head's into the model's module of that name (a sequence classifier's new head: Pfeiffer et
al. 2021 train the target task's head with the fusion).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save

from splice.compose.blocks import CompositionError, Fuse
from splice.compose.fusion import AdapterFusion, add_fusion, fusion_config
from splice.compose.parse import parse_composition
from splice.io.output_folder import OutputFolder, write_bytes

if TYPE_CHECKING:
    from splice.adapters.model import AdapterModel

CONFIG = "fusion_config.json"
WEIGHTS = "fusion.safetensors"
HEAD = "head.safetensors"
FORMAT = "splice_fusion"


def write_fusion_files(
    am: AdapterModel,
    name: str,
    folder: Path,
    *,
    base_model_name_or_path: str | None = None,
    head: str | None = None,
) -> None:
    """Write fusion ``name`` and copies of its adapters into ``folder`` (an `OutputFolder`'s
    partial folder); ``head``: the model's head module trained with it, saved too."""
    from splice.adapters.peft_format import save_adapter_files

    fusion = _fusion(am, name)
    names = fusion.block.names()
    for n in names:
        sub = folder / "adapters" / n
        sub.mkdir(parents=True, exist_ok=True)
        save_adapter_files(am, sub, n, base_model_name_or_path=base_model_name_or_path)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in fusion.fusion_state().items()}
    write_bytes(folder / WEIGHTS, save(state, metadata={"format": "pt"}))
    if head is not None:
        module = am.model.get_submodule(head)
        tensors = {
            f"{head}.{k}": v.detach().contiguous().cpu().clone()
            for k, v in module.state_dict().items()
        }
        write_bytes(folder / HEAD, save(tensors, metadata={"format": "pt"}))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "name": name,
        "composition": fusion.block.to_dict(),
        "config": fusion.config.model_dump(mode="json"),
        "layers": fusion.paths,
        "adapters": {n: f"adapters/{n}" for n in names},
        **({"head": head} if head is not None else {}),
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(am.model, "config", None), "_name_or_path", None),
    }
    write_bytes(folder / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())


def save_fusion(
    am: AdapterModel,
    out: str | os.PathLike[str],
    name: str,
    *,
    overwrite: int | bool = False,
    base_model_name_or_path: str | None = None,
    head: str | None = None,
) -> Path:
    """Write fusion ``name`` (and copies of its adapters, and ``head``) as a folder at ``out``,
    atomically."""
    _fusion(am, name)
    folder = OutputFolder(out, overwrite=overwrite).check()
    with folder as partial:
        write_fusion_files(
            am, name, partial, base_model_name_or_path=base_model_name_or_path, head=head
        )
    return Path(out)


def read_fusion_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    from splice.io.safe_paths import member
    from splice.io.textfile import load_json_object

    d = Path(folder)
    if not d.is_dir():
        raise CompositionError(f"fusion folder {d} does not exist")
    path = member(d, CONFIG, error=CompositionError)
    if path is None:
        raise CompositionError(f"{d}: no {CONFIG} (not a splice fusion folder)")
    meta = load_json_object(path, CompositionError)
    if meta.get("format") != FORMAT or meta.get("version") != 1:
        raise CompositionError(f"{path}: not a splice fusion config (format {FORMAT}, version 1)")
    for key, kind in (("name", str), ("composition", dict), ("config", dict), ("adapters", dict)):
        if not isinstance(meta.get(key), kind):
            raise CompositionError(f"{path}: '{key}' missing or not a {kind.__name__}")
    if "head" in meta and not isinstance(meta["head"], str):
        raise CompositionError(f"{path}: 'head' is not a module name")
    return meta


def load_fusion(
    am: AdapterModel,
    folder: str | os.PathLike[str],
    *,
    load_adapters: bool = True,
    activate: bool = True,
) -> Fuse:
    """Load a fusion folder into ``am``: its adapters (frozen, unless ``load_adapters`` is
    False: then the model must have adapters of those names), the fusion, its tensors; with
    ``activate``, make the Fuse the active setup; a saved head replaces the model's (checked
    tensor by tensor). Returns the Fuse block."""
    from splice.adapters import load_adapter
    from splice.io.safe_paths import allowed_root, member, resolve_inside
    from splice.io.safetensors_reader import SafetensorsReader

    d = Path(folder)
    meta = read_fusion_config(d)
    block = parse_composition(meta["composition"], f"{d}/{CONFIG}: composition")
    if not isinstance(block, Fuse) or not block.resolved or block.name != meta["name"]:
        raise CompositionError(f"{d}/{CONFIG}: 'composition' is not the Fuse {meta['name']!r}")
    config = fusion_config(meta["config"], f"{d}/{CONFIG}: config")
    weights = member(d, WEIGHTS, error=CompositionError)
    if weights is None:
        raise CompositionError(f"{d}: no {WEIGHTS}")
    names = block.names()
    if set(meta["adapters"]) != set(names):
        raise CompositionError(f"{d}/{CONFIG}: 'adapters' does not list {names}")
    head = _saved_head(am, d, meta.get("head"))  # read and checked before any change
    added: list[str] = []
    try:
        if load_adapters:
            for n in names:
                if n in am.configs:
                    raise CompositionError(
                        f"{d}: the model already has an adapter named {n!r} (load with "
                        "load_adapters=False to fuse the model's own)"
                    )
                sub = d / str(meta["adapters"][n])
                resolve_inside(allowed_root(d), sub, CompositionError)  # stays in the folder
                if not sub.is_dir():
                    raise CompositionError(f"{d}: adapter folder {meta['adapters'][n]!r} missing")
                load_adapter(am, sub, n, trainable=False, activate=False)
                added.append(n)
        fusion: AdapterFusion = add_fusion(am, block, config)
        try:
            with SafetensorsReader(weights) as reader:
                state = {k: reader.read(k) for k in reader.names()}
            fusion.load_fusion_state(state, str(weights))
            if head is not None:
                head()
        except BaseException:
            del am.fusions[block.name]
            raise
    except BaseException:
        for n in added:
            am.delete_adapter(n)
        raise
    if activate:
        am.set_active(block)
    return block


def _saved_head(am: AdapterModel, d: Path, name: str | None) -> Callable[[], None] | None:
    """The saved head's loader (None without one): its module on the model, its file and its
    tensors' names are checked here; calling it copies the tensors (shapes checked first)."""
    if name is None:
        return None
    from splice.adapters.layer import copy_saved
    from splice.io.safe_paths import member
    from splice.io.safetensors_reader import SafetensorsReader

    try:
        module = am.model.get_submodule(name)
    except AttributeError:
        raise CompositionError(
            f"{d}: the saved head {name!r} is not a module of the model"
        ) from None
    path = member(d, HEAD, error=CompositionError)
    if path is None:
        raise CompositionError(f"{d}/{CONFIG} names a head but {HEAD} is missing")
    with SafetensorsReader(path) as reader:
        state = {k: reader.read(k) for k in reader.names()}
    own = {f"{name}.{k}": v for k, v in module.state_dict().items()}
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CompositionError(
            f"{path}: head tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )

    def load() -> None:
        copy_saved([(f"{path}: {k}", own[k], state[k]) for k in own])

    return load


def _fusion(am: AdapterModel, name: str) -> AdapterFusion:
    if name not in am.fusions:
        known = ", ".join(am.fusions) or "none"
        raise CompositionError(f"no fusion named {name!r} (fusions: {known})")
    return am.fusions[name]  # type: ignore[return-value]
