"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"): per adapted layer, a trained attention over frozen adapters' outputs.

At a layer with current output y (the query side: the adapted module's output, which the
adapters read) and the N fused adapters' updates r_i = c_i(x, y) − y (a bottleneck adapter's
s · up(f(down(y))), a LoRA's ΔW x), with Q, K (H×H + bias) and V (H×H, no bias):

    q   = Q y                 k_i = K r_i              v_i = V r_i
    p   = softmax_i(q · k_i)  (over the adapters, no 1/√H scaling: the paper's code)
    out = y + Σ_i p_i v_i

(``query`` / ``key`` / ``value`` false: that projection is the identity;
``value_before_softmax`` false: V applies to Σ p_i r_i instead, the same linear map.) The
scores get dropout (``dropout``, on the scores before the softmax, as AdapterHub). Init, as
AdapterHub's ``BertFusion`` (the "dynamic" config, its default): Q, K weights N(0, 0.02²),
biases 0; V the identity with 1e-6 off the diagonal (``value_init: identity``), so at the start
the layer outputs y + Σ_i p_i r_i with p nearly uniform. Training adds
``regularization`` · Σ_layers ‖I − V‖²_F to the loss (AdapterHub: 0.01, "dynamic").

Left out from AdapterHub's options: ``temperature`` (a softmax temperature annealed from 50 to 1
by a counter inside the forward), ``residual_before`` (the residual added to the values) and
``query_before_ln``: splice's adapters read the module output, so the query is that output.

The fusion's parameters live on the model (``am.fusions[name]``, an `AdapterFusion`: one
`FusionLayer` per layer the fused adapters adapt), are trainable when added, and leave the
fused adapters as they are (frozen by `splice train`'s fusion mode). Saving and loading:
`splice.compose.fusion_io`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.adapters.targeting import linear_features
from splice.compose.blocks import CompositionError, Fuse
from splice.config_errors import StrictConfig, parse_config

if TYPE_CHECKING:
    from splice.adapters.model import AdapterModel

_FUSION_NAME = re.compile(r"[A-Za-z0-9_,\-]+")


class FusionConfig(StrictConfig):
    """The fusion layer's options (AdapterHub's "dynamic" AdapterFusionConfig by default)."""

    query: bool = True
    key: bool = True
    value: bool = True
    value_before_softmax: bool = True
    value_init: Literal["identity", "random"] = "identity"
    regularization: float = Field(0.01, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)


def fusion_config(
    data: FusionConfig | dict[str, Any] | None, where: str = "fusion"
) -> FusionConfig:
    if isinstance(data, FusionConfig):
        return data
    return parse_config(FusionConfig, data or {}, where, CompositionError, list_valid=True)


class FusionLayer(nn.Module):
    """The attention of one layer (module docstring), on hidden size ``hidden``."""

    def __init__(self, hidden: int, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Linear(hidden, hidden) if config.query else None
        self.key = nn.Linear(hidden, hidden) if config.key else None
        self.value = nn.Linear(hidden, hidden, bias=False) if config.value else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        for proj in (self.query, self.key):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)
        if self.value is not None:
            if self.config.value_init == "identity":
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
            else:
                nn.init.normal_(self.value.weight, std=0.02)

    def scores(self, y: Tensor, updates: Tensor) -> Tensor:
        """Attention probabilities p [..., N] of the adapters (before dropout: eval mode)."""
        q = self.query(y) if self.query is not None else y
        k = self.key(updates) if self.key is not None else updates
        s = (q.unsqueeze(-2) * k).sum(-1)
        return torch.softmax(self.dropout(s), dim=-1)

    def forward(self, y: Tensor, updates: Tensor) -> Tensor:
        """``y`` [..., H] the current output, ``updates`` [..., N, H] the adapters' updates;
        computed in the fusion's dtype, returned in the promoted dtype."""
        params = list(self.parameters())
        dtype = params[0].dtype if params else y.dtype
        y_f, r = y.to(dtype), updates.to(dtype)
        p = self.scores(y_f, r)
        before = self.value is not None and self.config.value_before_softmax
        v = self.value(r) if before else r
        context = (p.unsqueeze(-1) * v).sum(-2)
        if self.value is not None and not before:
            context = self.value(context)
        return y + context

    def regularization(self) -> Tensor:
        """‖I − V‖²_F (0 without a value matrix)."""
        if self.value is None:
            return torch.zeros(())
        w = self.value.weight
        return (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()


class AdapterFusion(nn.Module):
    """One fusion: its `Fuse` block, config, and a `FusionLayer` per adapted layer path."""

    def __init__(self, block: Fuse, config: FusionConfig, dims: dict[str, int]) -> None:
        super().__init__()
        self.block = block
        self.config = config
        self.paths = list(dims)
        self.layers = nn.ModuleList(FusionLayer(h, config) for h in dims.values())

    def layer_at(self, path: str) -> FusionLayer | None:
        return self.layers[self.paths.index(path)] if path in self.paths else None  # type: ignore[return-value]

    def regularization_loss(self) -> Tensor:
        """``regularization`` · Σ_layers ‖I − V‖²_F, what training adds to the loss."""
        total = sum((layer.regularization() for layer in self.layers), torch.zeros(()))
        return self.config.regularization * total

    def fusion_state(self) -> dict[str, Tensor]:
        """The tensors by ``<layer path>.<query|key|value>.<weight|bias>``."""
        return {
            f"{path}.{k}": v
            for path, layer in zip(self.paths, self.layers, strict=True)
            for k, v in layer.state_dict().items()
        }

    def load_fusion_state(self, state: dict[str, Tensor], where: str) -> None:
        from splice.adapters.layer import copy_saved

        own = self.fusion_state()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise CompositionError(
                f"{where}: fusion tensors do not match the model: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        copy_saved([(f"{where}: {k}", own[k], state[k]) for k in own])


def fused_layers(am: AdapterModel, block: Fuse) -> list[str]:
    """The layer paths a Fuse acts on: those its children adapt, which must be the same for
    every child (a child's layers: those any adapter in it adapts)."""
    from splice.compose.blocks_activate import check_names

    check_names(am, block)
    covered: list[tuple[str, set[str]]] = []
    for child in block.children:
        names = [child] if isinstance(child, str) else child.names()
        paths = {p for p, layer in am.adapted_layers() if any(n in layer.adapters for n in names)}
        covered.append((str(child), paths))
    first_child, first = covered[0]
    for child, paths in covered[1:]:
        if paths != first:
            only = sorted(first ^ paths)[0]
            who = first_child if only in first else child
            raise CompositionError(
                f"Fuse {block.name!r}: {first_child} and {child} adapt different layers "
                f"({len(first)} vs {len(paths)}; e.g. '{only}' only in {who}): a fusion "
                "needs adapters on the same layers"
            )
    return [p for p, _ in am.adapted_layers() if p in first]


def add_fusion(
    am: AdapterModel, block: Fuse, config: FusionConfig | dict[str, Any] | None = None
) -> AdapterFusion:
    """Add the fusion ``block.name`` over ``block``'s children to ``am`` (trainable, in
    float32 on the layers' device). The fused adapters are left as they are."""
    if not isinstance(block, Fuse) or not block.resolved:
        raise CompositionError(f"add_fusion: expected a Fuse over adapters, got {block!r}")
    if not _FUSION_NAME.fullmatch(block.name):
        raise CompositionError(f"fusion name {block.name!r}: use letters, digits, '_', '-' or ','")
    if block.name in am.fusions:
        raise CompositionError(f"a fusion named {block.name!r} already exists")
    cfg = fusion_config(config)
    paths = fused_layers(am, block)
    dims: dict[str, int] = {}
    device = None
    layers = dict(am.adapted_layers())
    for path in paths:
        base = layers[path].base_layer
        features = linear_features(base)
        if features is None:
            raise CompositionError(
                f"Fuse {block.name!r}: layer '{path}' is a {type(base).__name__}; fusion "
                "needs linear layers"
            )
        dims[path] = features[1]
        device = base.weight.device
    fusion = AdapterFusion(block, cfg, dims).to(device=device)
    fusion.train(am.model.training)
    am.fusions[block.name] = fusion
    return fusion
