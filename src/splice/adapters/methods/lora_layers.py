"""LoRA / DoRA adapter modules: one per base layer type (Linear or GPT-2 Conv1D, Embedding,
Conv2d). The config, targeting and initialisation choices are in `lora.py` / `lora_init.py`.

Shared math (s = the scaling, W: out×in in nn.Linear's layout):

    LoRA:  y = base(x) + s · B A dropout(x)                      ΔW = s · B A
    DoRA:  W' = m ⊙ (W + s B A) / ‖W + s B A‖_row              ΔW = W' − W
           (‖·‖_row: the L2 norm of each output row, i.e. over the input dimension: PEFT's
           "column-wise" norm of Vᵀ; the norm is detached from the graph, DoRA §4.3)

DoRA forward, as PEFT (`peft/tuners/lora/dora.py`): with c = m / ‖W + s B A‖_row (detached),

    eval or no dropout:  y = base(x) + (c − 1) · (base(x) − b) + c · s · B A x
    training + dropout:  y = base(x) + (c − 1) · W d(x)        + c · s · B A d(x),  d = dropout

so without dropout y = c ⊙ (W + s B A) x + b exactly, and the bias is never rescaled.

Bias options (PEFT's names): ``lora_bias`` gives lora_B a bias β (update s · β, init 0,
ΔW_bias = s · β; not with DoRA, as PEFT); ``bias="lora_only"`` makes the base layer's bias
trainable: splice keeps a trainable copy b_t inside the adapter (saved as PEFT saves it,
``base_layer.bias``) and adds b_t − b, so ``disabled()`` and ``delete_adapter`` give the
base's own bias back (PEFT trains the base bias in place instead; the saved file is the same).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.adapters.layer import AdapterModule, AdapterStateError, copy_saved
from splice.adapters.targeting import linear_features
from splice.delta import Delta, Dense, Folded, LowRank
from splice.delta.folded import dora_factor

_BIAS_KEY = "base_layer.bias"


class LoraModule(AdapterModule):
    """What the three layer kinds share: scaling, the DoRA magnitude and its init, bias
    copies, the saved names."""

    use_dora: bool
    scaling: float
    lora_magnitude_vector: nn.Parameter | None

    def _setup_bias(self, base: nn.Module, train_bias: bool) -> None:
        bias = getattr(base, "bias", None)
        self.base_bias = (
            nn.Parameter(bias.detach().clone()) if train_bias and bias is not None else None
        )

    def _bias_shift(self, base: nn.Module) -> Tensor | None:
        """b_t − b for bias="lora_only" (None when the bias is not trained)."""
        if self.base_bias is None:
            return None
        return self.base_bias - base.bias.detach()

    def base_weight(self, base: nn.Module) -> Tensor:
        """W with the output features first (out × in [× kernel])."""
        return base.weight

    def lora_weight(self) -> Tensor:
        """B A in `base_weight`'s layout (unscaled)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_magnitude(self, base: nn.Module) -> None:
        """m = ‖W + s B A‖ per output feature, so DoRA starts equal to LoRA (PEFT's init)."""
        w = self.base_weight(base).float() + self.scaling * self.lora_weight().float()
        norm = w.norm(p=2, dim=tuple(range(1, w.dim())))
        self.lora_magnitude_vector.copy_(norm.view_as(self.lora_magnitude_vector))

    def dora_scale(self, weight: Tensor) -> Tensor:
        """DoRA's c = m / ‖W + s · B A‖ per output feature (`splice.delta.folded.dora_factor`)."""
        lora = self.scaling * self.lora_weight().detach()
        return dora_factor(self.lora_magnitude_vector, weight, lora)

    # -- saved names ---------------------------------------------------------------------

    def peft_state(self) -> dict[str, Tensor]:
        return {(_BIAS_KEY if k == "base_bias" else k): v for k, v in self.state_dict().items()}

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        super().load_peft_state(
            {("base_bias" if k == _BIAS_KEY else k): v for k, v in state.items()}, where
        )


class LoraLayerPair(LoraModule):
    """LoRA / DoRA whose A and B are layers (``lora_A``, ``lora_B``): Linear / Conv1D and
    Conv2d share the constructor and the forward; subclasses give the layers' shapes."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        dropout: float,
        *,
        lora_bias: bool = False,
        use_dora: bool = False,
        train_bias: bool = False,
    ) -> None:
        super().__init__()
        self.lora_A, self.lora_B = self._make_layers(base, r, lora_bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.use_dora = use_dora
        self._setup_bias(base, train_bias)
        ones = torch.ones(self._magnitude_shape(base))
        self.lora_magnitude_vector = nn.Parameter(ones) if use_dora else None

    def _make_layers(self, base: nn.Module, r: int, lora_bias: bool) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def _magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def _per_channel(self, t: Tensor) -> Tensor:
        """A per-output-feature vector shaped to broadcast against the output (last axis)."""
        return t

    def _base_op(self, x: Tensor, weight: Tensor, base: nn.Module) -> Tensor:
        """The base layer's operation with ``weight`` and no bias."""
        raise NotImplementedError

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        """LoRA / DoRA (module docstring) in the adapter's dtype: x is cast to A's dtype and
        the update added unrounded (`AdaptedLayer` rounds the output once, as PEFT)."""
        shift = self._bias_shift(base)
        if shift is not None:
            result = result + self._per_channel(shift).to(result.dtype)
        x = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            return result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        weight = self.base_weight(base).to(x.dtype)
        c = self._per_channel(self.dora_scale(weight))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = result
            bias = self.base_bias if self.base_bias is not None else getattr(base, "bias", None)
            if bias is not None:
                base_result = base_result - self._per_channel(bias)
        else:
            x = self.dropout(x)
            base_result = self._base_op(x, weight, base)
        update = (c - 1) * base_result + c * self.lora_B(self.lora_A(x)) * self.scaling
        return result + update


class LoraLinear(LoraLayerPair):
    """LoRA / DoRA on nn.Linear or GPT-2 Conv1D (weight stored in×out: ``transpose``, PEFT's
    fan_in_fan_out, which PEFT forces True on Conv1D and False on Linear)."""

    def _make_layers(self, base: nn.Module, r: int, lora_bias: bool) -> tuple[nn.Module, ...]:
        in_f, out_f, self.transpose = linear_features(base)
        return nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=lora_bias)

    def _magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (self.lora_B.out_features,)

    def base_weight(self, base: nn.Module) -> Tensor:
        return base.weight.T if self.transpose else base.weight

    def lora_weight(self) -> Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    def _base_op(self, x: Tensor, weight: Tensor, base: nn.Module) -> Tensor:
        return F.linear(x, weight)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        b, a = self.lora_B.weight, self.lora_A.weight
        out = {"weight": _lora_or_dora(self, b, a, base.weight.shape, transposed=self.transpose)}
        return _with_bias(out, base, self, self.scaling)


def _lora_or_dora(
    module: LoraModule,
    b: Tensor,
    a: Tensor,
    shape: tuple[int, ...],
    *,
    transposed: bool = False,
    weight_shape: tuple[int, ...] | None = None,
) -> Delta:
    """LoRA: ``LowRank(B, A, s)``; DoRA: the ``dora`` transform of the base (same factors)."""
    if not module.use_dora:
        return LowRank(b, a, module.scaling, transposed, weight_shape)
    params = {"b": b, "a": a, "magnitude": module.lora_magnitude_vector}
    options = {"lora_scale": module.scaling, "transposed": transposed}
    return Folded("dora", params, tuple(shape), options)


def _with_bias(
    out: dict[str, Delta], base: nn.Module, module: LoraModule, s: float
) -> dict[str, Delta]:
    """Add the bias deltas: s · lora_B.bias (lora_bias) and b_t − b (bias="lora_only")."""
    parts = []
    lora_b = getattr(getattr(module, "lora_B", None), "bias", None)
    if lora_b is not None:
        parts.append(lora_b.float() * s)
    shift = module._bias_shift(base)
    if shift is not None:
        parts.append(shift.float())
    if parts:
        if getattr(base, "bias", None) is None:
            raise AdapterStateError(
                "lora_bias=True on a layer without a bias: the update cannot be folded (as PEFT)"
            )
        out["bias"] = Dense(sum(parts[1:], parts[0]))
    return out


class LoraEmbedding(LoraModule):
    """LoRA / DoRA on nn.Embedding (W: num_embeddings × dim, ΔW = s · (B A)ᵀ).

    PEFT's layout: ``lora_embedding_A`` r×num_embeddings, ``lora_embedding_B`` dim×r;
    y = base(x) + s · embed(x, Aᵀ) Bᵀ. No dropout on embeddings (as PEFT). PEFT also saves the
    embedding itself (``base_layer.weight``) when an embedding is targeted; splice does the
    same and, loading, writes a saved one into the base (PEFT's load does, for resized
    vocabularies)."""

    def __init__(
        self, base: nn.Embedding, r: int, scaling: float, *, use_dora: bool = False
    ) -> None:
        super().__init__()
        num, dim = base.weight.shape
        self.lora_embedding_A = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B = nn.Parameter(torch.randn(dim, r))
        self.scaling = scaling
        self.use_dora = use_dora
        self.base_bias = None
        self._base = weakref.ref(base)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(dim)) if use_dora else None

    def lora_weight(self) -> Tensor:
        """B A: dim × num_embeddings (ΔW = s · this, transposed)."""
        return self.lora_embedding_B @ self.lora_embedding_A

    def base_weight(self, base: nn.Module) -> Tensor:
        return base.weight.T

    def _embed(self, x: Tensor, weight: Tensor, base: nn.Embedding) -> Tensor:
        return F.embedding(
            x,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        update = (self._embed(x, self.lora_embedding_A.T, base) @ self.lora_embedding_B.T) * (
            self.scaling
        )
        embed_scale = getattr(base, "embed_scale", None)  # Gemma-style scaled embeddings
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        if not self.use_dora:
            return result + update
        c = self.dora_scale(self.base_weight(base))
        return c * result + c * update

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        b, a = self.lora_embedding_B, self.lora_embedding_A  # ΔW = s · (B A)ᵀ
        return {"weight": _lora_or_dora(self, b, a, base.weight.shape, transposed=True)}

    def peft_state(self) -> dict[str, Tensor]:
        state = super().peft_state()
        base = self._base()
        if base is not None:
            state["base_layer.weight"] = base.weight
        return state

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        state = dict(state)
        saved = state.pop("base_layer.weight", None)
        base = self._base()
        super().load_peft_state(state, where)
        if saved is not None and base is not None:
            copy_saved([(f"{where}.base_layer.weight", base.weight, saved)])


class LoraConv2d(LoraLayerPair):
    """LoRA / DoRA on nn.Conv2d (PEFT's conv LoRA): A = Conv2d(in, r, the base's kernel,
    stride, padding), B = 1×1 Conv2d(r, out); ΔW[o,i,k,l] = s · Σ_r B[o,r] A[r,i,k,l]."""

    def _make_layers(self, base: nn.Module, r: int, lora_bias: bool) -> tuple[nn.Module, ...]:
        lora_a = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False
        )
        return lora_a, nn.Conv2d(r, base.out_channels, 1, 1, bias=lora_bias)

    def _magnitude_shape(self, base: nn.Module) -> tuple[int, ...]:
        return (1, base.out_channels, 1, 1)  # PEFT's saved shape

    def lora_weight(self) -> Tensor:
        """Σ_r B[o,r] A[r,i,k,l]: out × in × kh × kw."""
        return torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight)

    def _per_channel(self, t: Tensor) -> Tensor:
        return t.view(1, -1, 1, 1)

    def _base_op(self, x: Tensor, weight: Tensor, base: nn.Module) -> Tensor:
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        shape = tuple(base.weight.shape)
        b, a = self.lora_B.weight[:, :, 0, 0], self.lora_A.weight.flatten(1)
        weight = _lora_or_dora(self, b, a, shape, weight_shape=shape)
        return _with_bias({"weight": weight}, base, self, self.scaling)
