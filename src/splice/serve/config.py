"""`splice serve`'s settings: a strict YAML file with the same keys as the flags.

    base: smollm2                 # an HF folder or a packaged model name (required)
    adapters: {support: ./out/support-lora}   # NAME: PATH (--adapter NAME=PATH)
    adapter_roots: [./adapters]   # folders whose subfolders are adapters (--adapter-root)
    host: 127.0.0.1
    port: 8000
    api_keys: keys.yaml           # --api-keys (splice.serve.api_keys); none: no auth
    max_batch: 16                 # sequences decoded together
    max_queue: 256                # requests waiting for a batch slot
    max_loaded: 8                 # adapters held in memory at once (LRU beyond)
    max_loaded_bytes: 2GB         # and their tensors' bytes (splice.io.parse_size units)
    max_prompt_tokens: null       # default: the model's context length
    max_tokens: 1024              # the largest max_tokens a request may ask for
    served_name: null             # the base model's id in the API (default: BASE's name)
    shutdown_timeout: 30          # seconds a shutdown waits for in-flight requests
    compositions:                 # named compositions, served as model ids (`compositions`)
      support_mix: {average: {support: 0.7, billing: 0.3}}

Unknown keys are errors naming the closest valid one; numbers must be finite. Flags given on
the command line replace the file's values (``adapters`` are merged, ``adapter_roots``
appended). Relative paths are relative to the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from splice.config_errors import StrictConfig, named_paths, parse_config
from splice.errors import SpliceError
from splice.io.sizes import parse_size
from splice.io.textfile import load_yaml

ADAPTER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")  # AdapterModel's adapter names


class ServeConfigError(SpliceError):
    """A bad `splice serve` flag or config file."""


class ServeConfig(StrictConfig):
    base: str = Field(min_length=1)
    adapters: dict[str, str] = Field(default_factory=dict)
    adapter_roots: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: str | None = None
    max_batch: int = Field(16, ge=1, le=4096)
    max_queue: int = Field(256, ge=1)
    max_loaded: int = Field(8, ge=1)
    max_loaded_bytes: int | str | None = None
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int = Field(1024, ge=1)
    served_name: str | None = None
    shutdown_timeout: float = Field(30.0, ge=0)
    compositions: dict[str, Any] = Field(default_factory=dict)

    @field_validator("compositions")
    @classmethod
    def _compositions(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, data in value.items():
            if not ADAPTER_NAME_RE.fullmatch(name):
                raise ValueError(f"composition name {name!r}: use letters, digits, '_' or '-'")
            composition_weights(name, data)  # a ValueError (pydantic's message) if malformed
        return value

    def composition_sets(self) -> dict[str, tuple[tuple[str, float], ...]]:
        """Each named composition as the weighted set its rows run with."""
        return {name: composition_weights(name, data) for name, data in self.compositions.items()}

    @field_validator("adapters")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not ADAPTER_NAME_RE.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-'")
            if not path:
                raise ValueError(f"adapter {name!r}: empty path")
        return value

    @field_validator("max_loaded_bytes")
    @classmethod
    def _bytes(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_size(value)
        except SpliceError as e:
            raise ValueError(str(e)) from None

    @property
    def loaded_bytes_budget(self) -> int | None:
        return None if self.max_loaded_bytes is None else int(self.max_loaded_bytes)

    def base_id(self) -> str:
        """The base model's id in the API: `served_name`, else BASE's last path component."""
        if self.served_name:
            return self.served_name
        return Path(os.path.normpath(self.base)).name or self.base


def composition_weights(name: str, data: Any) -> tuple[tuple[str, float], ...]:
    """A named composition (`splice.compose.parse` form) as ((adapter, weight), ...): only an
    Average of adapter names can be served, as it is exactly a mixed batch's weighted set
    (y = f(x) + Σ w_i (f_{a_i}(x) − f(x)), `splice.compose.blocks_forward`); any other block
    (Stack, Parallel, Fuse, nesting) is refused."""
    from splice.compose.blocks import Average, CompositionError
    from splice.compose.parse import parse_composition

    try:
        block = parse_composition(data, f"composition {name!r}")
    except CompositionError as e:
        raise ValueError(str(e)) from None
    if not isinstance(block, Average) or not block.names_only():
        raise ValueError(
            f"composition {name!r}: only an average of adapter names can be served "
            "(e.g. {average: {a: 0.5, b: 0.5}}): it runs as a weighted set in the decode batch"
        )
    for child in block.children:
        if not ADAPTER_NAME_RE.fullmatch(child):
            raise ValueError(f"composition {name!r}: adapter name {child!r} is not a plain name")
    return tuple(zip(block.children, (float(w) for w in block.weights), strict=True))


def parse_adapter_flags(items: list[str]) -> dict[str, str]:
    """``--adapter NAME=PATH`` values as a mapping (a repeated name is an error)."""
    return named_paths(items, "--adapter", ServeConfigError)


def load_serve_config(path: str | None, flags: dict[str, Any]) -> ServeConfig:
    """The config file at ``path`` (if any) with ``flags`` (values not None) applied."""
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        if not Path(path).exists():
            raise ServeConfigError(f"{path} does not exist")
        loaded = load_yaml(path, ServeConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ServeConfigError(f"{path}: expected a mapping at the top level")
        data = dict(loaded or {})
        where = str(path)
    for key, value in flags.items():
        if value is None:
            continue
        if key == "adapters":
            current = data.get("adapters") or {}
            if not isinstance(current, dict):
                raise ServeConfigError(f"{where}: 'adapters': expected a mapping NAME: PATH")
            data["adapters"] = {**current, **value}
        elif key == "adapter_roots":
            current = data.get("adapter_roots") or []
            if not isinstance(current, list):
                raise ServeConfigError(f"{where}: 'adapter_roots': expected a list of folders")
            data["adapter_roots"] = [*current, *value]
        else:
            data[key] = value
    if "base" not in data:
        raise ServeConfigError("no base model: give BASE (an HF folder or a packaged name)")
    config = parse_config(ServeConfig, data, where, ServeConfigError, list_valid=True)
    if config.base_id() in config.adapters:
        raise ServeConfigError(f"adapter name {config.base_id()!r} is the base model's id")
    clash = sorted(set(config.compositions) & (set(config.adapters) | {config.base_id()}))
    if clash:
        raise ServeConfigError(
            f"composition name {clash[0]!r} is also an adapter's or the base model's id"
        )
    return config
