"""A trainable full copy of a module: PEFT's ``modules_to_save`` (e.g. a task head).

The copy replaces the base module in the forward; its delta is copy − base per parameter.
Saved under the module's own parameter names (``classifier.weight``), as PEFT saves it.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from splice.adapters.layer import AdapterModule
from splice.delta import Delta, Dense


class FullCopy(AdapterModule):
    replaces_base = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def base_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        return self.module(x)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        own = dict(self.module.named_parameters())
        return {
            n: Dense(own[n].detach().float() - p.detach().float())
            for n, p in base.named_parameters()
        }

    def peft_state(self) -> dict[str, Tensor]:
        return dict(self.module.state_dict())

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        super().load_peft_state({f"module.{k}": v for k, v in state.items()}, where)
