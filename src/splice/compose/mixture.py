"""A routed mixture of frozen adapters with a trained gate (X-LoRA / MoLE / MixLoRA family).

    mix = Mixture(am, ["math", "code"], gate="token", top_k=2, balance_coef=0.01)
    out = mix(input_ids=ids, attention_mask=mask, labels=ids)   # loss + coef · balance loss
    mix.balance_loss()                                          # the last forward's L_bal

At every layer the experts adapt (all experts must adapt the same layers), with f the base
layer and f_i the layer with expert i alone (`AdaptedLayer.forward_alone`):

    y = f(x) + Σ_i g_i · (f_i(x) − f(x))

For LoRA f_i(x) − f(x) = s_i B_i A_i x, so y = W x + Σ_i g_i s_i B_i A_i x: MixLoRA's and
X-LoRA's weighted sum of LoRA updates on a shared frozen base. Any layer adapter works as an
expert (DoRA, IA3, OFT, bottleneck, ...: its own forward minus the base's). g is the
top-k-renormalized softmax of a gate's logits (`splice.compose.gate`):

- ``gate="token"``: one `TokenGate` per adapted layer, g(x) per token from that layer's input
  (MixLoRA's router, on every adapted layer rather than once per FFN block).
- ``gate="sequence"``: one `SequenceGate`, g per sequence from the mean over its non-padding
  tokens of the base model's last hidden state, the same g at every layer. This is X-LoRA's
  two-pass scheme (a first pass with the adapters off, ``torch.no_grad``, its last hidden
  state feeding the gate; the second pass with the gate's weights) with the classifier
  applied to the mean-pooled state instead of each token, and layerwise_scalings=False.
  Models that do not return ``hidden_states`` take the pooled features as
  ``sequence_features=`` ([batch, hidden]).

Only the gate trains: building a mixture freezes the experts' parameters (the base is
frozen already). The load-balancing loss (`splice.compose.balance`) over all routing
positions of a forward is added to the model's loss, times ``balance_coef``, in training
mode (eval losses are the task's alone).

Execution: the base layer runs once; every expert runs densely on all positions and is
weighted (a top-k gate skips an expert no position chose). MixLoRA instead gathers each
expert's tokens; for LoRA experts the dense update costs N small matmuls per layer. The
router lives on the adapted layers (as ``AdaptedLayer.composition``) only during the mixture's
forward / generate, so the `AdapterModel` is unchanged in between; the model's other
active adapters take no part in a mixture's forward. Folded experts are refused. The base
and the experts stay in eval mode (`Mixture.train` switches only the gates): frozen experts
run without their dropout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters import AdaptedLayer, AdapterModel
from splice.compose.balance import load_balancing_loss
from splice.compose.gate import Routing, SequenceGate, TokenGate, route
from splice.compose.mixture_config import GateKind, MixtureError, MixtureOptions
from splice.config_errors import did_you_mean

SEQUENCE_GATE = "sequence"


def gate_key(path: str) -> str:
    """A layer path as a ModuleDict key (no '.')."""
    return path.replace(".", "/")


def input_features(base: nn.Module) -> int | None:
    """The size of the last axis of the layer's input: nn.Linear's ``in_features``, GPT-2's
    Conv1D (weight [in, out]); None for other layers (embeddings, convolutions)."""
    if isinstance(base, nn.Linear):
        return base.in_features
    if type(base).__name__ == "Conv1D" and getattr(base, "weight", None) is not None:
        return int(base.weight.shape[0])
    return None


def check_experts(am: AdapterModel, experts: Sequence[str], top_k: int | None) -> list[str]:
    """The layer paths all ``experts`` adapt; one-line errors for unknown names, duplicates,
    model-level adapters, experts on different layers, and top_k > number of experts."""
    if len(experts) < 2:
        raise MixtureError(f"a mixture needs at least two experts, got {list(experts)}")
    for name in experts:
        if name not in am.configs:
            known = ", ".join(am.configs) or "none"
            hint = did_you_mean(name, am.configs)
            raise MixtureError(f"unknown expert '{name}'{hint} (adapters loaded: {known})")
        if name in am.model_adapters:
            raise MixtureError(
                f"expert '{name}' is a model-level adapter (prompt / prefix tuning): a "
                "mixture routes layer adapters"
            )
    twice = sorted({n for n in experts if list(experts).count(n) > 1})
    if twice:
        raise MixtureError(f"expert '{twice[0]}' is named twice")
    if top_k is not None and top_k > len(experts):
        raise MixtureError(f"top_k={top_k} but the mixture has {len(experts)} experts")
    layers = {n: [p for p, _ in am.named_adapter_modules(n)] for n in experts}
    first = experts[0]
    for name in experts[1:]:
        if layers[name] != layers[first]:
            only = sorted(set(layers[first]) ^ set(layers[name]))
            where = only[0] if only else "(same layers, another order)"
            owner = first if where in layers[first] else name
            other = name if owner == first else first
            raise MixtureError(
                f"experts '{first}' and '{name}' adapt different layers: '{owner}' adapts "
                f"{where}, '{other}' does not"
            )
    return layers[first]


class LayerRouter:
    """One adapted layer's forward under a mixture (set as ``AdaptedLayer.composition``)."""

    def __init__(self, mixture: Mixture, path: str) -> None:
        self.mixture = mixture
        self.path = path

    def forward(self, layer: AdaptedLayer, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        mix = self.mixture
        base = layer.base_layer(x, *args, **kwargs)
        if layer.disabled:
            return base
        weights = mix.layer_weights(self.path, x)
        result: Tensor = base
        for i, name in enumerate(mix.experts):
            w = weights[..., i : i + 1]
            if mix.top_k is not None and not bool((w != 0).any()):
                continue
            y = layer.forward_alone(layer.adapters[name], x, args, kwargs, base)
            result = result + w * (y - base)
        return result.to(base.dtype)


class Mixture(nn.Module):
    """A trained gate over frozen experts of ``am`` (module docstring). ``hidden_size``: the
    sequence gate's input size (default: the model config's ``hidden_size``)."""

    def __init__(
        self,
        am: AdapterModel,
        experts: Sequence[str],
        *,
        gate: GateKind = "token",
        top_k: int | None = None,
        renormalize: bool = True,
        balance_coef: float = 0.0,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        options = MixtureOptions(
            gate=gate, top_k=top_k, renormalize=renormalize, balance_coef=balance_coef
        )
        experts = list(experts)
        self.layer_paths = check_experts(am, experts, options.top_k)
        self.am = am
        self.experts = experts
        self.options = options
        self.gates = nn.ModuleDict()
        n = len(experts)
        layers = dict(am.adapted_layers())
        if options.gate == "token":
            for path in self.layer_paths:
                base = layers[path].base_layer
                size = input_features(base)
                if size is None:
                    raise MixtureError(
                        f"a token gate reads a Linear layer's input; '{path}' is a "
                        f"{type(base).__name__} (use gate=sequence)"
                    )
                device = next(base.parameters()).device
                self.gates[gate_key(path)] = TokenGate(size, n).to(device)
        else:
            size = hidden_size or getattr(getattr(am.model, "config", None), "hidden_size", None)
            if not isinstance(size, int):
                raise MixtureError("a sequence gate needs hidden_size= (the model has no config)")
            device = next(am.parameters()).device
            self.gates[SEQUENCE_GATE] = SequenceGate(size, n).to(device)
        for name in experts:
            for p in am.adapter_parameters(name):
                p.requires_grad_(False)
        self._sequence_weights: Tensor | None = None
        self._token_mask: Tensor | None = None
        self._routings: list[tuple[Routing, Tensor | None]] = []
        self.last_routing: dict[str, Routing] = {}

    # -- options ---------------------------------------------------------------------------

    @property
    def gate_kind(self) -> GateKind:
        return self.options.gate

    @property
    def top_k(self) -> int | None:
        return self.options.top_k

    @property
    def balance_coef(self) -> float:
        return self.options.balance_coef

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts: the gate's, and the gate's plus the model's."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in params.values())
        return sum(p.numel() for p in params.values() if p.requires_grad), total

    def train(self, mode: bool = True) -> Mixture:
        """Only the gates change mode: the frozen base and experts stay in eval mode (no
        dropout in them while the gate trains)."""
        self.training = mode
        self.gates.train(mode)
        self.am.eval()
        return self

    # -- routing ---------------------------------------------------------------------------

    def layer_weights(self, path: str, x: Tensor) -> Tensor:
        """g for ``x`` at layer ``path``: [..., N] like x's leading axes (token gate), or
        [B, 1, ..., N] broadcasting over them (sequence gate)."""
        if self.gate_kind == "token":
            routing = route(self.gates[gate_key(path)](x), self.top_k, self.options.renormalize)
            self._record(path, routing, self._mask_for(x))
            return routing.weights
        weights = self._sequence_weights
        if weights is None:
            raise MixtureError("a sequence-gated layer ran outside the mixture's forward")
        if weights.shape[0] != x.shape[0]:
            raise MixtureError(
                f"the sequence gate routed {weights.shape[0]} rows, the layer got {x.shape[0]}"
            )
        return weights.reshape(weights.shape[0], *([1] * (x.dim() - 2)), weights.shape[-1])

    def _mask_for(self, x: Tensor) -> Tensor | None:
        mask = self._token_mask
        if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        return mask.reshape(-1)

    def _record(self, where: str, routing: Routing, mask: Tensor | None) -> None:
        self.last_routing[where] = routing
        self._routings.append((routing, mask))

    def route_sequences(self, features: Tensor) -> Routing:
        """The sequence gate's routing for pooled features [B, hidden]."""
        if self.gate_kind != "sequence":
            raise MixtureError("route_sequences: this mixture has a token gate")
        return route(self.gates[SEQUENCE_GATE](features), self.top_k, self.options.renormalize)

    @torch.no_grad()
    def sequence_features(self, args: tuple, kwargs: dict) -> Tensor:
        """The first pass: the base model (adapters off)'s last hidden state, averaged over
        each row's tokens where ``attention_mask`` is 1."""
        first = {k: v for k, v in kwargs.items() if k not in ("labels", "use_cache")}
        with self.am.disabled():
            out = self.am.model(*args, **first, output_hidden_states=True, use_cache=False)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise MixtureError(
                "the model returned no hidden_states for the sequence gate; pass "
                "sequence_features=[batch, hidden]"
            )
        h = states[-1].float()
        mask = kwargs.get("attention_mask")
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype)[..., None]
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def balance_loss(self) -> Tensor:
        """The load-balancing loss over every routing position of the last forward."""
        if not self._routings:
            return torch.zeros(())
        probs = torch.cat([r.probs.reshape(-1, r.probs.shape[-1]) for r, _ in self._routings])
        chosen = torch.cat([r.chosen.reshape(-1, *r.chosen.shape[-2:]) for r, _ in self._routings])
        masks = [
            m if m is not None else r.probs.new_ones(r.probs[..., 0].numel())
            for r, m in self._routings
        ]
        return load_balancing_loss(probs, chosen, torch.cat([m.reshape(-1) for m in masks]))

    # -- running ---------------------------------------------------------------------------

    @contextmanager
    def attached(
        self, sequence_weights: Tensor | None, token_mask: Tensor | None
    ) -> Iterator[None]:
        """Set the routers on the experts' layers (and no other adapter active) for a call."""
        layers = dict(self.am.adapted_layers())
        if getattr(self.am, "composition", None) is not None:
            raise MixtureError("a composition block is active: set_active(names) before a mixture")
        for path in self.layer_paths:
            folded = [n for n in self.experts if n in layers[path].folded]
            if folded:
                raise MixtureError(f"expert '{folded[0]}' is folded into the weights: unfold it")
            if layers[path].composition is not None or layers[path].mixed_plan is not None:
                raise MixtureError(
                    f"layer {path} is already running a mixture, a block or a mixed batch"
                )
        active = list(self.am.active)
        self.am.set_active([])
        self._sequence_weights, self._token_mask = sequence_weights, token_mask
        for path in self.layer_paths:
            layers[path].composition = LayerRouter(self, path)
        try:
            yield
        finally:
            for path in self.layer_paths:
                layers[path].composition = None
            self._sequence_weights = self._token_mask = None
            self.am.set_active(active)

    def _start(self, args: tuple, kwargs: dict, sequence_features: Tensor | None) -> Tensor | None:
        """Reset the routing record; for a sequence gate, route the rows (first pass)."""
        if "adapter_names" in kwargs:
            raise MixtureError("a mixture routes by its gate: adapter_names is not accepted")
        self._routings, self.last_routing = [], {}
        if self.gate_kind != "sequence":
            return None
        if sequence_features is None:
            sequence_features = self.sequence_features(args, kwargs)
        routing = self.route_sequences(sequence_features)
        self._record(SEQUENCE_GATE, routing, None)
        return routing.weights

    def forward(self, *args: Any, sequence_features: Tensor | None = None, **kwargs: Any) -> Any:
        """The model's forward through the mixture; in training mode with ``balance_coef``
        > 0, ``out.loss`` includes ``balance_coef · balance_loss()``."""
        if getattr(self.am, "_disabled", False):  # am.disabled(): the base model's forward
            return self.am(*args, **kwargs)
        weights = self._start(args, kwargs, sequence_features)
        with self.attached(weights, kwargs.get("attention_mask")):
            out = self.am(*args, **kwargs)
        loss = getattr(out, "loss", None)
        if self.training and self.balance_coef > 0 and loss is not None:
            out.loss = loss + self.balance_coef * self.balance_loss().to(loss.device)
        return out

    def generate(self, *args: Any, sequence_features: Tensor | None = None, **kwargs: Any) -> Any:
        """The model's ``generate`` through the mixture. A sequence gate routes each prompt
        once (its weights hold for every generated token; rows repeated for num_beams /
        num_return_sequences); a token gate routes every token as it is decoded."""
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        ids = call.pop("inputs", None)
        if ids is not None:
            call["input_ids"] = ids
        first = {k: call[k] for k in ("input_ids", "attention_mask") if k in call}
        weights = self._start((), first, sequence_features)
        if weights is not None:
            counts = [int(kwargs.get(k) or 1) for k in ("num_beams", "num_return_sequences")]
            repeat = max(counts)
            weights = weights.repeat_interleave(repeat, dim=0)
        with self.attached(weights, None):
            return self.am.model.generate(*args, **kwargs)
