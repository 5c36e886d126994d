"""What a composition block computes at one adapted layer, and the model-level forward.

At an adapted layer with base layer f, input x and base output f(x), a block maps the
current output y to a new one, starting from y = f(x). With f_a(x) the layer with adapter a
alone (the mixed batch's primitive, `AdaptedLayer.forward_alone`):

    name a          f_a(x) when y = f(x) (nothing has acted yet); after other adapters:
                    an activation adapter (bottleneck) reads y: y + r_a(y), r_a(y) =
                    s · up(act(down(y))); a weight-space adapter (LoRA, DoRA, IA3, OFT, ...)
                    adds its own delta: y + (f_a(x) − f(x)) = y + ΔW_a x (+ Δb);
                    an adapter absent from (or folded into) this layer: y
    Stack(c₁..c_k)  c_k(… c₂(c₁(y)))                                     (in sequence)
                    a Stack of names on f(x): the layer with those adapters active together
                    (``am.set_active([...])``, `AdaptedLayer._forward_with`; a top-level
                    Stack of names *is* that call, `splice.compose.blocks_activate`)
    Average(c, w)   y + Σ_i w_i · (c_i(y) − y)
    Fuse(c, name)   y + Σ_i p_i · V r_i,  r_i = c_i(y) − y,
                    p = softmax_i((Q y) · (K r_i))                        (`splice.compose.fusion`)
    Parallel(c)     the rows in N equal chunks (the batch was repeated N times, below):
                    chunk i gets c_i

So a Stack of LoRAs is the sum of their deltas (W x + s₁B₁A₁x + s₂B₂A₂x), exactly the
several-active forward; a Stack of bottleneck adapters feeds each adapter the previous one's
output (h₁ = h + r_a(h), h₂ = h₁ + r_b(h₁)); in a Stack of names IA3 and DoRA act on the running
output and OFT / HRA rotations multiply (W M₁ M₂: folding in sequence), as with several active
adapters. An Average of names on f(x) is the mixed batch's weighted set (`splice.adapters.
mixed_batch`): y = f(x) + Σ w_i (f_{a_i}(x) − f(x)), for weight-space adapters the layer with
W + Σ w_i ΔW_i (averaged deltas); at the top level it runs as that mixed batch.

Where AdapterHub's ``adapters`` (read from its composition.py, methods/bottleneck.py,
methods/lora.py, methods/adapter_layer_base.py) differs:

- Stack of LoRAs: AdapterHub feeds each LoRA the previous LoRA's *update* (compose_single
  passes ``state.hidden_states``): y = W x + s₂ B₂ A₂ (s₁ B₁ A₁ x), which needs in = out
  features. splice sums the deltas: y = W x + s₁ B₁ A₁ x + s₂ B₂ A₂ x.
- Average: AdapterHub takes ``torch.mean(torch.stack(outputs) * w, 0)`` with w normalized to
  sum 1, i.e. (1/N) Σ w_i out_i — an extra factor 1/N — where out_i is a bottleneck adapter's
  whole output h + r_i(h) (so the base output is scaled too), or a LoRA's update s_i B_i A_i x.
  splice: y + Σ w_i (c_i − y), the weighted average of the children's outputs, which keeps
  the base output whole when the weights sum to 1 (AdapterHub's normalization, the default).
- Fuse over a Stack: AdapterHub's value is the Stack's *last* adapter's up-projection; splice
  takes the whole Stack's update c_i(y) − y. AdapterHub supports Fuse for bottleneck
  adapters only; splice fuses any layer adapter (its update is a vector in the layer's output
  space).
- Parallel: both repeat the batch N times and give chunk i to child i; AdapterHub repeats the
  hidden states at the first layer that has the block (its patched model code repeats the
  masks), splice repeats the model's inputs before the forward (the unadapted layers then
  compute the same rows N times: the values are equal, the cost is not).
- Bottleneck placement: AdapterHub's adapters act after the residual / LayerNorm step of its
  configuration, splice's on the named module's output (`splice.adapters.methods.bottleneck`);
  the block formulas above are the same in both, at their own placement.

Checked against AdapterHub's outputs (Houlsby adapters on a tiny Llama and BERT; single,
Stack, Average with the N·w conversion, Parallel, Fuse, Stack of a Fuse):
tests/compose/test_adapterhub_parity.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from splice.compose.blocks import Average, Block, CompositionError, Fuse, Parallel, Stack

if TYPE_CHECKING:
    from splice.adapters.layer import AdaptedLayer, AdapterModule
    from splice.adapters.model import AdapterModel


class LayerComposition:
    """The forward an `AdaptedLayer` runs while a block is active (``layer.composition``):
    ``fusions`` are this layer's fusion modules by fusion name."""

    def __init__(self, block: Block, fusions: Mapping[str, nn.Module]) -> None:
        self.block = block
        self.fusions = dict(fusions)

    def forward(self, layer: AdaptedLayer, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        base = layer.base_layer(x, *args, **kwargs)
        if layer.disabled:
            return base
        run = _LayerRun(layer, args, kwargs, self.fusions)
        return run(self.block, x, base, base).to(base.dtype)


class _LayerRun:
    """One evaluation of a block at one layer (module docstring): ``run(node, x, y, base)``
    with y the current output and base = f(x); ``y is base`` while no adapter has acted."""

    def __init__(
        self, layer: AdaptedLayer, args: tuple, kwargs: dict, fusions: dict[str, nn.Module]
    ) -> None:
        self.layer, self.args, self.kwargs, self.fusions = layer, args, kwargs, fusions

    def adapter(self, name: str) -> AdapterModule | None:
        if name not in self.layer.adapters or name in self.layer.folded:
            return None
        return self.layer.adapters[name]

    def alone(self, a: AdapterModule, x: Tensor, base: Tensor) -> Tensor:
        """f_a(x): the layer with adapter a alone (the mixed batch's primitive)."""
        return self.layer.forward_alone(a, x, self.args, self.kwargs, base)

    def __call__(self, node: str | Block, x: Tensor, y: Tensor, base: Tensor) -> Tensor:
        if isinstance(node, str):
            return self.single(node, x, y, base)
        if isinstance(node, Stack):
            return self.stack(node, x, y, base)
        if isinstance(node, Average):
            out = y
            for child, w in zip(node.children, node.weights, strict=True):
                c = self(child, x, y, base)
                if c is not y:
                    out = out + w * (c - y)
            return out
        if isinstance(node, Fuse):
            fusion = self.fusions.get(node.name)
            if fusion is None:  # the fused adapters do not adapt this layer
                return y
            updates = [self(child, x, y, base) - y for child in node.children]
            return fusion(y, torch.stack(updates, dim=-2))
        if isinstance(node, Parallel):
            n = len(node.children)
            if x.shape[0] % n:
                raise CompositionError(
                    f"Parallel over {n} adapters: an adapted layer got {x.shape[0]} rows, "
                    "not a multiple of the number of adapters"
                )
            xs, bs = x.chunk(n, dim=0), base.chunk(n, dim=0)
            ys = bs if y is base else y.chunk(n, dim=0)
            outs = [self(c, xs[i], ys[i], bs[i]) for i, c in enumerate(node.children)]
            return torch.cat(outs, dim=0)
        raise CompositionError(f"unknown block {type(node).__name__}")

    def single(self, name: str, x: Tensor, y: Tensor, base: Tensor) -> Tensor:
        a = self.adapter(name)
        if a is None:
            return y
        if y is base:
            return self.alone(a, x, base)
        if not a.foldable:  # an activation adapter (bottleneck) reads the current output
            return a.transform_output(x, y, self.layer.base_layer)
        return y + (self.alone(a, x, base) - base)  # a weight-space adapter adds its delta

    def stack(self, node: Stack, x: Tensor, y: Tensor, base: Tensor) -> Tensor:
        if node.names_only() and y is base:  # the several-active forward
            present = [a for n in node.children if (a := self.adapter(str(n))) is not None]
            if any(a.changes_base_input() for a in present):
                return self.layer._forward_with(present, x, self.args, self.kwargs)
            for a in present:  # _forward_with's loop, reusing the base output
                y = a.transform_output(x, y, self.layer.base_layer)
            return y
        for child in node.children:
            y = self(child, x, y, base)
        return y


# -- the model-level forward --------------------------------------------------------------


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The first axis of ``input_ids`` / ``inputs`` / ``inputs_embeds`` / ``pixel_values``,
    else of the first positional tensor."""
    for key in ("input_ids", "inputs", "inputs_embeds", "pixel_values"):
        if isinstance(kwargs.get(key), Tensor):
            return int(kwargs[key].shape[0])
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else None


class ActiveComposition:
    """The active block on an `AdapterModel` (``am.composition``): its forward and generate.

    ``rows``: a top-level Average of adapter names runs as a mixed batch whose every row is
    that weighted set. A block with a Parallel repeats the inputs (`parallel_forward`)."""

    def __init__(self, block: Block, rows: dict[str, float] | None = None) -> None:
        self.block = block
        self.rows = rows

    def forward(self, am: AdapterModel, args: tuple, kwargs: dict) -> Any:
        if self.rows is not None:
            n = _need_batch(args, kwargs, self.block)
            return am(*args, adapter_names=[dict(self.rows)] * n, **kwargs)
        if self.block.channels > 1:
            return parallel_forward(am.model, self.block.channels, args, kwargs)
        return am.model(*args, **kwargs)

    def generate(self, am: AdapterModel, args: tuple, kwargs: dict) -> Any:
        if self.block.channels > 1:
            raise CompositionError(
                f"generate() with {self.block!r} active: Parallel gives one output per adapter "
                "for a forward; generate with each adapter in turn"
            )
        if self.rows is not None:
            n = _need_batch(args, kwargs, self.block)
            return am.generate(*args, adapter_names=[dict(self.rows)] * n, **kwargs)
        return am.model.generate(*args, **kwargs)


def _need_batch(args: tuple, kwargs: dict, block: Block) -> int:
    n = batch_size(args, kwargs)
    if n is None:
        raise CompositionError(f"{block!r}: cannot tell the batch size of the inputs")
    return n


def parallel_forward(model: nn.Module, channels: int, args: tuple, kwargs: dict) -> list[Any]:
    """Repeat every batch-first input tensor ``channels`` times along the batch (``[x; x; …]``,
    as AdapterHub's ``repeat``), run the model once, and split the output: one output per
    channel, its tensors the channel's rows. Fields that are not per-row tensors (the loss,
    the KV cache) are left out (None): a per-channel loss is the caller's to compute."""
    n = batch_size(args, kwargs)
    if n is None:
        raise CompositionError("Parallel: cannot tell the batch size of the inputs")
    if kwargs.get("past_key_values") is not None:
        raise CompositionError("Parallel: a KV cache (past_key_values) is not supported")

    def rep(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() and v.shape[0] == n:
            return torch.cat([v] * channels, dim=0)
        return v

    out = model(*[rep(a) for a in args], **{k: rep(v) for k, v in kwargs.items()})
    return [_channel(out, i, n, channels) for i in range(channels)]


def _channel(out: Any, i: int, n: int, channels: int) -> Any:
    def part(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v[i * n : (i + 1) * n] if v.dim() and v.shape[0] == n * channels else None
        if isinstance(v, tuple) and v and all(isinstance(t, Tensor) for t in v):
            parts = tuple(part(t) for t in v)
            return None if any(p is None for p in parts) else parts
        return None

    if isinstance(out, Tensor | tuple):
        return part(out)
    if isinstance(out, Mapping):  # a transformers ModelOutput (a dict subclass) or a dict
        fields = {k: part(v) for k, v in out.items()}
        return type(out)(**{k: v for k, v in fields.items() if v is not None})
    raise CompositionError(f"Parallel: cannot split a model output of type {type(out).__name__}")
