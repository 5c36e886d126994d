"""One LoRA target as factors: ΔW = scale · B @ A, never materialized unless asked.

B is out×r, A is r×in, in the orientation PEFT stores them (`lora_B.weight`, `lora_A.weight`;
for embeddings `lora_embedding_B`, `lora_embedding_A`). B @ A is then the delta *in PEFT's
compute orientation*: the base weight receives (B @ A)ᵀ when the adapter says fan_in_fan_out
(GPT-2 Conv1D) or for an embedding, B @ A otherwise. Every method here works on B @ A and keeps
the orientation, so the merged factors are written back under the same kind of key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """ΔW = scale · b @ a with b: out×r, a: r×in."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.b.dim() != 2 or self.a.dim() != 2 or self.b.shape[1] != self.a.shape[0]:
            raise ValueError(
                f"LoRA factors must be B out×r, A r×in; got {list(self.b.shape)}, "
                f"{list(self.a.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta B @ A."""
        return self.b.shape[0], self.a.shape[1]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale · B @ A (out×in), for tests and the dense methods."""
        return (self.b.to(dtype) @ self.a.to(dtype)) * self.scale

    def scaled(self, factor: float) -> LoraFactors:
        """The same factors with the scale folded into B (scale becomes 1), times `factor`."""
        return LoraFactors(self.b * (self.scale * factor), self.a, 1.0)
