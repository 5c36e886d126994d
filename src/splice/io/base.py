"""The lazy checkpoint reader interface.

A reader knows every tensor's name, shape and dtype from headers alone; `read(name)` loads
that one tensor and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class CheckpointReader(Protocol):
    """Lazy, read-only access to a checkpoint's tensors."""

    path: str

    def names(self) -> list[str]:
        """Tensor names in file order."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype without reading data; KeyError for unknown names."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor the caller may own and modify)."""
        ...

    def close(self) -> None: ...


class InMemoryReader:
    """The `CheckpointReader` methods over ``self._tensors``, a name → tensor dict in file
    order that a subclass fills when it opens its file (loaded, or mapped from disk)."""

    path: str
    _tensors: dict[str, torch.Tensor]

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype)

    def read(self, name: str) -> torch.Tensor:
        """A fresh contiguous copy (tensors sharing storage are copied apart)."""
        return self._tensors[name].clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        """Drop the tensors (a file mapping goes with the last reference)."""
        self._tensors = {}
