"""The layer wrapper and the interface every layer adapter implements.

An `AdaptedLayer` replaces a target module in the model. It keeps the original module as
``base_layer`` (frozen) and the named adapters in ``adapters`` (a ModuleDict). Its forward,
with the active adapters a_1..a_k (in activation order) that are not folded:

    x'     = a_1.transform_input(... a_k.transform_input(x))      (e.g. OFT rotates inputs)
    y      = a.base_forward(x', base)   for the last a with replaces_base (LN tuning,
             modules_to_save, HRA), else base(x')
    y      = a_k.transform_output(x, ... a_1.transform_output(x, y))  (LoRA adds s·B A x)

During a mixed-adapter batch (``mixed_plan`` set, `splice.adapters.mixed_batch`) the
forward follows the plan instead: each row's own adapters, whatever is active. While a
composition is set (``composition``: an active block, `splice.compose.blocks`, or a routed
mixture during its call, `splice.compose.mixture`) the forward is the composition's.

Input transforms apply last adapter first: with x' = M_1 ⋯ M_k x the adapted weight is
W M_1 ⋯ M_k, which is what folding a_1, then a_2, ... gives (W ← W M_i in turn), so the
forward equals the folded model (PEFT's HRA forward and its OFT merge take this order; its
OFT forward takes the other, and so disagrees with its own merge for several adapters).

Dtypes (PEFT's rule, peft 0.21): adapter parameters stay in their own dtype (float32 unless
the caller casts them; PEFT's ``autocast_adapter_dtype`` upcasts bf16/fp16 adapters to
float32 by default), each adapter computes in its parameters' dtype (x cast to it), and the
chain is rounded to the base layer's dtype once per side: the transformed input is cast to
the input's dtype before the base layer, and the output (base result plus every update,
accumulated in the promoted dtype) is cast to the base result's dtype at the end. So with a
bf16 base, y = round_bf16(base(x) + s · B A x) — the update is not rounded on its own.
HRA, as PEFT, runs the base layer itself in the adapter's dtype (its ``base_forward``).

The wrapper stands in for the base layer: attributes it does not have itself (``weight``,
``bias``, ``in_features``, ``kernel_size``, ``num_embeddings``, ...) are the base layer's,
as PEFT's layers expose them (model code reads e.g. ``patch_embeddings.projection.weight``).

A weight-space adapter also exposes its delta, ``delta(base) -> {param name: Delta}``, typed
`splice.delta` values in the base parameter's shape (every adaptation is a delta on named
parameters): LoRA a `LowRank` (never a dense ΔW unless asked), DoRA / IA3 / OFT / HRA a
`Folded` transform of the base, the others `Dense`. Folding adds the deltas to the base
parameters; the forward then skips the folded adapters. Unfolding restores the exact original
tensors (kept aside at fold time: that costs one copy of each folded parameter until unfold or
`merge_and_unload`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from splice.delta import Delta
from splice.errors import SpliceError


class AdapterStateError(SpliceError):
    """An adapter operation is not possible in the current state (fold, unfold, load)."""


def copy_saved(pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    """Load saved tensors: for each (where, own, saved), check the shape (all first, so a
    mismatch changes nothing), then copy ``saved`` into ``own`` cast to its dtype."""
    for where, own, saved in pairs:
        if tuple(saved.shape) != tuple(own.shape):
            raise AdapterStateError(
                f"{where}: saved shape {tuple(saved.shape)} != expected {tuple(own.shape)}"
            )
    with torch.no_grad():
        for _, own, saved in pairs:
            own.copy_(saved.to(own.dtype))


class AdapterModule(nn.Module):
    """One named adapter on one base layer. Subclasses override what they need."""

    foldable: ClassVar[bool] = True
    replaces_base: ClassVar[bool] = False

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        """The input the base layer sees, in the adapter's dtype (the layer casts it back)."""
        return x

    def base_forward(self, x: Tensor, base: nn.Module) -> Tensor:
        raise NotImplementedError

    def changes_base_input(self) -> bool:
        """True when the adapter changes what the base layer computes (an input transform or
        a replacement), so its forward cannot reuse the base layer's result (mixed batches)."""
        return self.replaces_base or type(self).transform_input is not AdapterModule.transform_input

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        """The output with this adapter's update, in the promoted dtype of ``result`` and
        the update (the layer casts the final output to the base result's dtype once)."""
        return result

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        """The delta per base parameter name ("weight", "bias"), shaped like that parameter;
        `to_dense(base_param)` gives ΔW in float32 (the caller casts)."""
        raise AdapterStateError(f"{type(self).__name__} acts on activations: it has no delta")

    def peft_state(self) -> dict[str, Tensor]:
        """Saved tensors by key suffix (PEFT's names, the adapter name removed)."""
        return {k: v for k, v in self.state_dict().items()}

    def shared_state(self) -> dict[str, Tensor]:
        """Tensors shared by all layers of this adapter, by their full saved key (not under
        the layer's path), e.g. VeRA's ``base_model.vera_A``; saved once. Default: none."""
        return {}

    def load_shared_state(self, state: dict[str, Tensor], where: str) -> None:
        """Receive the saved tensors whose keys `shared_state` names (those present)."""

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise AdapterStateError(
                f"{where}: adapter tensors do not match: missing {missing[:4]}, "
                f"unexpected {extra[:4]}"
            )
        copy_saved([(f"{where}.{k}", own[k], v) for k, v in state.items()])


class AdaptedLayer(nn.Module):
    """A base module plus named adapters (see the module docstring)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        # a mixed batch's row plan during one forward (`splice.adapters.mixed_batch`)
        self.mixed_plan: Any = None
        # the forward of the active composition at this layer (`splice.compose`: a block's,
        # or a routed mixture's during its call), or None
        self.composition: Any = None
        # name -> original base tensors, for exact unfolding; insertion order = fold order.
        self._folded: dict[str, dict[str, Tensor]] = {}

    @property
    def folded(self) -> list[str]:
        return list(self._folded)

    def running(self) -> list[AdapterModule]:
        if self.disabled:
            return []
        return [
            self.adapters[n] for n in self.active if n in self.adapters and n not in self._folded
        ]

    def __getattr__(self, name: str) -> Any:
        """The base layer's attribute when the wrapper has none of that name."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.mixed_plan is not None:
            return self.mixed_plan.forward(self, x, args, kwargs)
        if self.composition is not None:
            return self.composition.forward(self, x, args, kwargs)
        return self._forward_with(self.running(), x, args, kwargs)

    def forward_alone(
        self, adapter: AdapterModule, x: Tensor, args: tuple, kwargs: dict, base_result: Tensor
    ) -> Tensor:
        """The forward with ``adapter`` alone, given ``base_result`` = base(x): reused unless
        the adapter changes the base layer's input or replaces it."""
        if adapter.changes_base_input():
            return self._forward_with([adapter], x, args, kwargs)
        return adapter.transform_output(x, base_result, self.base_layer).to(base_result.dtype)

    def _forward_with(
        self, running: list[AdapterModule], x: Tensor, args: tuple, kwargs: dict
    ) -> Tensor:
        if not running:
            return self.base_layer(x, *args, **kwargs)
        x_in = x
        for a in reversed(running):
            x = a.transform_input(x, self.base_layer)
        replacing = [a for a in running if a.replaces_base]
        if replacing:
            result = replacing[-1].base_forward(x, self.base_layer)
        else:
            result = self.base_layer(x.to(x_in.dtype), *args, **kwargs)
        out_dtype = result.dtype
        for a in running:
            result = a.transform_output(x_in, result, self.base_layer)
        return result.to(out_dtype)

    # -- folding -------------------------------------------------------------------------

    def fold(self, name: str) -> None:
        if name in self._folded:
            return
        adapter = self.adapters[name]
        if not adapter.foldable:
            raise AdapterStateError(
                f"adapter '{name}' ({type(adapter).__name__}) acts on activations and cannot "
                "be folded into weights"
            )
        deltas = adapter.delta(self.base_layer)
        params = dict(self.base_layer.named_parameters(recurse=True))
        backup: dict[str, Tensor] = {}
        with torch.no_grad():
            for pname, d in deltas.items():
                p = params[pname]
                backup[pname] = p.detach().clone()
                p.copy_((p.float() + d.to_dense(p.detach()).to(p.device)).to(p.dtype))
        self._folded[name] = backup

    def unfold(self, name: str) -> None:
        """Restore the exact pre-fold tensors. Folds are undone newest first, so unfolding
        one adapter also unfolds (and then refolds) any folded after it."""
        if name not in self._folded:
            return
        order = list(self._folded)
        later = order[order.index(name) + 1 :]
        for n in reversed([name, *later]):
            backup = self._folded.pop(n)
            params = dict(self.base_layer.named_parameters(recurse=True))
            with torch.no_grad():
                for pname, t in backup.items():
                    params[pname].copy_(t)
        for n in later:
            self.fold(n)

    def commit_folds(self) -> None:
        """Make folds permanent: drop the backups (and with them the way back)."""
        self._folded = {}

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, folded={self.folded}"
