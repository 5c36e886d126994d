"""Model-level adapters: they change the model's inputs rather than a layer's weights
(prompt tuning, prefix tuning). They have no weight delta and cannot be folded."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class ModelAdapter(nn.Module):
    """Subclasses implement ``prepare``: given the wrapped model and the forward call's
    positional and keyword arguments, return the arguments to call it with instead
    (e.g. ``inputs_embeds`` with virtual tokens prepended and a longer attention mask)."""

    def prepare(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    def generate(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``model.generate(*args, **kwargs)`` with this adapter applied at every step."""
        from splice.adapters.layer import AdapterStateError

        raise AdapterStateError(f"{type(self).__name__} does not support generate()")

    def peft_state(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        from splice.adapters.layer import AdapterModule

        AdapterModule.load_peft_state(self, state, where)  # same checks and copy
