"""`splice train`'s fusion mode: train AdapterFusion over frozen adapters.

    adapter:
      method: fusion
      experts: {sst: out/sst, style: out/style}    # adapter folders, loaded frozen
      name: fusion                                  # the fusion's name (default "fusion")
      composition: {fuse: [sst, style]}             # optional (splice.compose.parse form);
                                                    # default: a Fuse over `adapters` in order
      regularization: 0.01                          # and the other FusionConfig options

or with flags: ``splice train --method fusion --expert sst=out/sst --expert style=out/style ...``
(``experts`` and ``--expert`` as in the mixture mode, `splice.compose.mixture_io`).

Only the fusion's parameters train (the base model and the fused adapters are frozen); the
loss is the task's plus ``regularization`` · Σ ‖I − V‖²_F (AdapterHub's fusion
regularization). The output folder is a fusion folder (`splice.compose.fusion_io`: the fusion's
safetensors and JSON config, the fused adapters copied in) plus the usual training logs;
``splice.compose.load_fusion(am, folder)`` loads it back. Tasks: causal_lm (the LM head stays
frozen) and seq_cls: there the classifier's new head trains with the fusion (Pfeiffer et al.
2021, the target task's head; same learning rate) and is saved in the fusion folder
(``head.safetensors``), which `load_fusion` restores.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from splice.compose import CompositionError, Fuse, FusionConfig, parse_composition
from splice.config_errors import parse_config
from splice.train.config import TrainConfigError


class FusionTrainSettings(FusionConfig):
    """The ``adapter:`` section in fusion mode (the FusionConfig options plus these)."""

    method: str = "fusion"
    experts: dict[str, str] = Field(min_length=1)
    name: str = "fusion"
    composition: Any = None

    def fusion_config(self) -> FusionConfig:
        return FusionConfig(**self.model_dump(include=set(FusionConfig.model_fields)))

    def block(self) -> Fuse:
        """The Fuse to train, checked against ``adapters`` (before any loading)."""
        names = list(self.experts)
        data = self.composition
        if data is None:
            data = {"fuse": {"name": self.name, "adapters": names}}
        try:
            block = parse_composition(data, "adapter.composition")
        except CompositionError as e:
            raise TrainConfigError(str(e)) from None
        if not isinstance(block, Fuse) or not block.resolved:
            raise TrainConfigError(
                "adapter.composition: fusion mode trains a Fuse over adapters, e.g. {fuse: [a, b]}"
            )
        fuse = data.get("fuse") if isinstance(data, dict) else None
        if not (isinstance(fuse, dict) and "name" in fuse):  # unnamed: the setting's name
            block = Fuse(*block.children, name=self.name)
        if set(block.names()) != set(names):
            raise TrainConfigError(
                f"adapter.composition names {block.names()}, adapter.experts {names}: "
                "they must be the same adapters"
            )
        return block


def fusion_settings(adapter: dict[str, Any], where: str = "adapter") -> FusionTrainSettings:
    settings = parse_config(FusionTrainSettings, adapter, where, TrainConfigError, list_valid=True)
    settings.block()
    return settings


def setup_fusion(am: Any, settings: FusionTrainSettings, head: str | None = None) -> nn.Module:
    """Load the adapters frozen into ``am``, add the fusion, activate it; ``head``: the
    model's head module, trained with the fusion (a classifier's new head). Returns the
    `AdapterFusion` (its parameters, and the head's, are the only trainable ones)."""
    from splice.adapters import load_adapter

    block = settings.block()
    for name, folder in settings.experts.items():
        load_adapter(am, folder, name, trainable=False, activate=False)
    am.add_fusion(block, settings.fusion_config())
    am.set_active(block)
    if head is not None:
        for p in am.model.get_submodule(head).parameters():
            p.requires_grad_(True)
    return am.fusions[block.name]


class RegularizedFusion(nn.Module):
    """``am``'s forward with the fusion's regularization added to the loss (training)."""

    def __init__(self, am: nn.Module, fusion: nn.Module) -> None:
        super().__init__()
        self.am = am
        self.fusion = fusion

    def forward(self, **batch: Any) -> Any:
        out = self.am(**batch)
        if out.loss is not None and self.fusion.config.regularization:
            out["loss"] = out.loss + self.fusion.regularization_loss().to(out.loss.device)
        return out
