"""Permutation specs: which axes of which tensors share one permutation of hidden units.

A hidden unit of a network can be relabelled without changing the function: permuting the
rows of the layer that produces it and, the same way, the columns of the layers that read it.
Following Git Re-Basin's `PermutationSpec` (Ainsworth et al., ICLR 2023; official
`samuela/git-re-basin`, `weight_matching.py`), a spec names each permutation and lists the
axes it acts on. One difference from the official spec: a permutation here may move *blocks*
of `block` consecutive entries (`AxisRef.block`), so that one attention head (head_dim rows)
is one unit; the official code permutes single entries only.

Convention (PyTorch `nn.Linear`): a weight has shape (out, in); axis 0 is indexed by the
layer's output units, axis 1 by its input units. Applying a permutation π (a tensor of unit
indices) to an axis takes units in the order π: ``W' = index_select(W, axis, π)`` (block
units expanded to their entries), as the official `get_permuted_param` (`jnp.take`).

Specs provided:

- `mlp_spec(shapes)`: a plain chain of linear layers (``NAME.weight`` (out, in), optional
  ``NAME.bias`` (out,)), ordered by name with numbers compared as numbers; each hidden width
  between two consecutive layers is one permutation. The input features and the output
  logits are not permuted.
- `llama_spec(shapes, num_heads, num_kv_heads)`: Llama-style decoder blocks
  (``model.layers.{i}.mlp.{gate,up,down}_proj``, ``self_attn.{q,k,v,o}_proj``). Per layer:
  the MLP's intermediate units (rows of gate and up, columns of down) and the attention's
  key/value heads as units (rows of k and v in blocks of head_dim, the group of query heads
  that share each kv head: rows of q and columns of o in blocks of group·head_dim). Whole
  heads commute with RoPE (every head rotates the same dimensions by the same angles), so
  head permutations keep the function exactly. Not permuted: the residual stream (embedding,
  norms, lm_head, the inputs of q/k/v/gate/up, the outputs of o/down) unless
  ``residual=True`` (`residual_refs`: one permutation of the hidden dimensions shared by all
  layers, exact for RMSNorm models), the dimensions inside a head (RoPE pairs them), the
  order of query heads inside one kv group.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.errors import SpliceError


class AlignmentError(SpliceError):
    """A spec that does not fit the state dicts (missing tensor, wrong shape, unknown spec)."""


@dataclass(frozen=True)
class AxisRef:
    """Axis `axis` of tensor `tensor`, whose entries are units of `block` consecutive entries."""

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """`perms`: permutation name -> the axes it permutes (each unit count must agree)."""

    perms: Mapping[str, tuple[AxisRef, ...]]

    def axes_of(self, tensor: str) -> list[tuple[str, AxisRef]]:
        """(permutation name, axis) pairs acting on `tensor`."""
        return [(p, ref) for p, refs in self.perms.items() for ref in refs if ref.tensor == tensor]

    def unit_counts(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """The number of units of every permutation, checked against `shapes`: every tensor
        exists, every axis exists and splits into whole blocks, all axes of one permutation
        have the same unit count, no permutation acts twice on one axis."""
        counts: dict[str, int] = {}
        seen: dict[tuple[str, int], str] = {}
        for p, refs in self.perms.items():
            if not refs:
                raise AlignmentError(f"permutation '{p}' acts on no axis")
            for ref in refs:
                shape = shapes.get(ref.tensor)
                if shape is None:
                    raise AlignmentError(f"permutation '{p}': tensor '{ref.tensor}' is missing")
                if not 0 <= ref.axis < len(shape):
                    raise AlignmentError(
                        f"permutation '{p}': tensor '{ref.tensor}' {list(shape)} has no axis "
                        f"{ref.axis}"
                    )
                if ref.block < 1 or shape[ref.axis] % ref.block:
                    raise AlignmentError(
                        f"permutation '{p}': axis {ref.axis} of '{ref.tensor}' {list(shape)} "
                        f"does not split into blocks of {ref.block}"
                    )
                n = shape[ref.axis] // ref.block
                if counts.setdefault(p, n) != n:
                    raise AlignmentError(
                        f"permutation '{p}': axis {ref.axis} of '{ref.tensor}' has {n} units, "
                        f"another of its axes {counts[p]}"
                    )
                other = seen.setdefault((ref.tensor, ref.axis), p)
                if other != p:
                    raise AlignmentError(
                        f"axis {ref.axis} of '{ref.tensor}' is in two permutations: "
                        f"'{other}' and '{p}'"
                    )
        return counts


def unit_index(perm: Tensor, block: int) -> Tensor:
    """Entry indices of the units `perm`, each unit `block` consecutive entries."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    name: str,
    tensor: Tensor,
    except_axis: int | None = None,
) -> Tensor:
    """`tensor` with every permutation of `spec` that acts on it applied (but the one on
    `except_axis`)."""
    for p, ref in spec.axes_of(name):
        if ref.axis != except_axis:
            tensor = tensor.index_select(ref.axis, unit_index(perms[p], ref.block))
    return tensor


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, Tensor], state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A new state dict: every tensor of `state` with its permutations applied (the others
    unchanged, the same objects)."""
    return {name: permute_tensor(spec, perms, name, t) for name, t in state.items()}


# -- specs --------------------------------------------------------------------------------


def natural_key(name: str) -> list[int | str]:
    """Sort key with digit runs compared as numbers (layers.2 before layers.10)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def linear_chain(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The layer names (``NAME`` of ``NAME.weight``) of a plain MLP, in natural name order,
    checked: only 2-D ``.weight`` and matching 1-D ``.bias`` tensors, each layer's input
    width equal to the previous layer's output width, at least two layers."""
    layers: list[str] = []
    for name in sorted(shapes, key=natural_key):
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) == 2:
            layers.append(name[: -len(".weight")])
        elif name.endswith(".bias") and len(shape) == 1:
            layer = name[: -len(".bias")]
            weight = shapes.get(layer + ".weight")
            if weight is None or len(weight) != 2 or weight[0] != shape[0]:
                raise AlignmentError(f"mlp spec: bias '{name}' {list(shape)} has no weight")
        else:
            raise AlignmentError(
                f"mlp spec: tensor '{name}' {list(shape)} is not a linear layer's 2-D weight or "
                "1-D bias (use --spec llama for a decoder model)"
            )
    if len(layers) < 2:
        raise AlignmentError(f"mlp spec: {len(layers)} linear layer(s); need at least 2")
    for prev, layer in itertools.pairwise(layers):
        if shapes[layer + ".weight"][1] != shapes[prev + ".weight"][0]:
            raise AlignmentError(
                f"mlp spec: '{layer}.weight' {list(shapes[layer + '.weight'])} does not read "
                f"the {shapes[prev + '.weight'][0]} outputs of '{prev}.weight'"
            )
    return layers


def mlp_spec(shapes: Mapping[str, tuple[int, ...]]) -> PermutationSpec:
    """One permutation ``P_k`` per hidden width of the chain `linear_chain(shapes)`: rows of
    layer k's weight and bias, columns of layer k+1's weight."""
    layers = linear_chain(shapes)
    perms: dict[str, tuple[AxisRef, ...]] = {}
    for k, (layer, nxt) in enumerate(itertools.pairwise(layers)):
        refs = [AxisRef(f"{layer}.weight", 0)]
        if f"{layer}.bias" in shapes:
            refs.append(AxisRef(f"{layer}.bias", 0))
        refs.append(AxisRef(f"{nxt}.weight", 1))
        perms[f"P_{k}"] = tuple(refs)
    return PermutationSpec(perms)


_LAYER = re.compile(r"^(.*\.layers\.(\d+))\.mlp\.down_proj\.weight$")


def llama_spec(
    shapes: Mapping[str, tuple[int, ...]],
    num_heads: int | None,
    num_kv_heads: int | None,
    *,
    residual: bool = False,
) -> PermutationSpec:
    """Per decoder layer i: ``mlp_i`` (intermediate units) and, when the head counts are
    given, ``heads_i`` (kv heads with their query groups). Biases of the permuted rows
    (q/k/v/gate/up, as Qwen2 has) move with them. With ``residual``, also one permutation
    ``residual`` of the hidden dimensions shared by every layer (`residual_refs`)."""
    layers = sorted((m.group(1) for name in shapes if (m := _LAYER.match(name))), key=natural_key)
    if not layers:
        raise AlignmentError("llama spec: no '*.layers.N.mlp.down_proj.weight' tensor")
    if (num_heads is None) != (num_kv_heads is None):
        raise AlignmentError("llama spec: give both head counts or neither")
    if (
        num_heads is not None
        and num_kv_heads is not None
        and (num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads)
    ):
        raise AlignmentError(
            f"llama spec: {num_heads} attention heads do not split into groups of "
            f"{num_kv_heads} kv heads"
        )
    perms: dict[str, tuple[AxisRef, ...]] = {}
    for i, prefix in enumerate(layers):
        mlp = f"{prefix}.mlp"
        refs = [
            AxisRef(f"{mlp}.{p}.{kind}", 0)
            for p in ("gate_proj", "up_proj")
            for kind in ("weight", "bias")
            if f"{mlp}.{p}.{kind}" in shapes
        ]
        refs.append(AxisRef(f"{mlp}.down_proj.weight", 1))
        perms[f"mlp_{i}"] = tuple(refs)
        if num_heads is None or num_kv_heads is None:
            continue
        attn = f"{prefix}.self_attn"
        q = shapes.get(f"{attn}.q_proj.weight")
        if q is None:
            raise AlignmentError(f"llama spec: '{attn}.q_proj.weight' is missing")
        if q[0] % num_heads:
            raise AlignmentError(
                f"llama spec: '{attn}.q_proj.weight' {list(q)} has no {num_heads} equal heads"
            )
        head_dim = q[0] // num_heads
        group = head_dim * (num_heads // num_kv_heads)
        refs = []
        for p, block in (("q_proj", group), ("k_proj", head_dim), ("v_proj", head_dim)):
            refs += [
                AxisRef(f"{attn}.{p}.{kind}", 0, block)
                for kind in ("weight", "bias")
                if kind == "weight" or f"{attn}.{p}.bias" in shapes
            ]
        refs.append(AxisRef(f"{attn}.o_proj.weight", 1, group))
        perms[f"heads_{i}"] = tuple(refs)
    if residual:
        perms["residual"] = residual_refs(shapes, layers)
    return PermutationSpec(perms)


def residual_refs(shapes: Mapping[str, tuple[int, ...]], layers: list[str]) -> tuple[AxisRef, ...]:
    """The axes of the residual stream: columns of the token embedding and of lm_head, every
    RMSNorm weight on it (``*layernorm.weight`` of each layer and the final ``norm.weight``;
    RMSNorm is permutation-equivariant: RMS(Px) = RMS(x), (w ⊙ Px) = P(P⁻¹w ⊙ x)), the input
    columns of q/k/v/gate/up, the output rows (and biases) of o_proj and down_proj. A tensor
    named here but absent (a tied lm_head) is skipped. Every other tensor must not touch the
    residual stream: LayerNorm biases or learned position embeddings are not handled."""
    root = layers[0].rsplit(".layers.", 1)[0]
    refs = [AxisRef(f"{root}.embed_tokens.weight", 1)]
    if f"{root}.norm.weight" in shapes:
        refs.append(AxisRef(f"{root}.norm.weight", 0))
    if "lm_head.weight" in shapes:
        refs.append(AxisRef("lm_head.weight", 1))
    for prefix in layers:
        refs += [
            AxisRef(name, 0)
            for name in sorted(shapes)
            if name.startswith(prefix + ".")
            and name.count(".") == prefix.count(".") + 2
            and name.endswith("layernorm.weight")
        ]
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            refs.append(AxisRef(f"{prefix}.{module}.weight", 1))
        for module in ("mlp.gate_proj", "mlp.up_proj"):
            refs.append(AxisRef(f"{prefix}.{module}.weight", 1))
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            refs += [
                AxisRef(f"{prefix}.{module}.{kind}", 0)
                for kind in ("weight", "bias")
                if f"{prefix}.{module}.{kind}" in shapes
            ]
    return tuple(refs)
