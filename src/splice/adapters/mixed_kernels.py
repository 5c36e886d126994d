"""Batched mixed-batch kernels: one computation per adapted layer for all rows whose adapter
is LoRA / DoRA, LoHa (linear), IA3 or VeRA, whatever the number of distinct adapters
(`splice.adapters.mixed_batch` calls them; the other adapter kinds run per segment).

Each row r has at most one of these adapters a(r) with weight 1. With x_r the row's input
(L positions, flattened) and base_r = f(x_r):

- LoRA / DoRA, for rank bucket R (the next power of two ≥ r, at least 8): the layer's
  adapters of that bucket are stacked, padded with zero ranks (exact: the extra products are
  0), plus one all-zero slot for rows without such an adapter:

      A_stack: (n+1) × R × in        B_stack: (n+1) × out × R,  B_i ← c_i ⊙ s_i B_i
      y_r = base_r + (c_a(r) − 1) ⊙ (base_r − b) + B_a(r) A_a(r) x_r

  as two ``bmm`` over the rows with the factors gathered per row (``index_select`` of the
  stack by the row's slot: one r×(in+out) block per row, never per token; for L positions
  that is 1/L of the row's own activation). LoRA: c = 1, so y = base + s B A x. DoRA: c =
  m / ‖W + s B A‖_row (PEFT's form: base(x) + (c − 1)(base(x) − b) + c s B A x, the bias not
  rescaled). Different s (rsLoRA, alpha / rank patterns) are folded into each B, so every
  adapter keeps its own scaling and rank exactly.
- LoHa on nn.Linear joins the stacks as the LoRA of rank r² it is: ΔW = s (W1a W1b) ⊙
  (W2a W2b) = s U V, U (out × r²) the row-wise outer products of W1a and W2a, V (r² × in)
  those of the columns of W1b and W2b (`_lora_form`); only when r² (in + out) < in · out
  (cheaper per token than the dense ΔW the per-segment path rebuilds at every call).
- When every row has the same slot, two flat matmuls replace the per-row gather.
- IA3 output scaling: y_r = l_a(r) ⊙ base_r, one (rows × out) vector gather (1 for others);
  input scaling: the base layer runs once on x_r ⊙ l_a(r) for all rows (x unchanged for
  the others: ×1 is exact).
- VeRA: adapters whose shared projections A', B' are equal (by value, checked when the cache
  is built; the usual case: one ``projection_prng_key``) form one group: y_r = base_r +
  λ_b,a(r) ⊙ B'(λ_d,a(r) ⊙ A' x_r), with A' x computed once for the group's rows and the
  per-row vectors gathered (λ = 0 for other rows).

Weighted sets of the additive kinds (`splice.adapters.mixed_batch`, Execution): in a LoRA
stack, a row with K of its adapters is one LoRA of rank K·R (`set_slots`, `add_lora_sets_`):
A = [A_1; …; A_K], B = [w_1 B_1 … w_K B_K] gathered per row (zero slot, weight 0 as padding),
DoRA's term Σ w_k (c_k − 1) ⊙ (base_r − b). VeRA, LoKr, IA3 output scaling: each (row,
adapter, weight) entry is computed as a row of its own (`pair_slots`: the entry's row of x
gathered, its adapter's slot), the update times the weight and ``index_add_``-ed into the
row; IA3 output scaling then adds (l − 1) ⊙ base_r (`add_scaled_output_`) instead of
scaling in place.

When under half the batch has rows for a kernel, its rows are gathered first (and the result
added back with ``index_add_``); otherwise the kernel runs on every row (the zero slot costs
r/in of the base layer, less than moving the rows).

Cache: per layer, the stacks are built at the first mixed forward that needs them and kept
(`_CACHE`, weakly keyed by the layer) with what they were built from: the layer's adapter
names and module objects, the mode of those whose kernel depends on it (dropout), and a
`Stamp` (data_ptr, _version) of the base weight and of each kernel adapter's tensors. A
mixed forward compares the module lists by identity and the stamps of the base weight and
of the adapters its batch names (C loops; nothing enumerates ``parameters()`` per forward):
an added, removed or replaced adapter module, an in-place change (optimizer step,
``copy_``, loading: ``_version``) or moved storage (data_ptr) rebuilds the layer's stacks.
An adapter changed while no batch names it is found when one does (no row reads its slot
before). Not tracked: writes through ``.data`` and a parameter object replaced by
assignment (call `clear_cache`). Checked once per layer per mixed call (a plan).
Memory: the stacks hold
a copy of the factors (padded to the bucket) and DoRA's c, i.e. factor bytes, never a dense
ΔW; IA3 / VeRA: the vectors. With gradients enabled on adapter parameters (training through
a mixed batch) the kernels are not used (the cached factors are detached); the per-segment
path runs and gradients flow.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from splice.adapters.layer import AdaptedLayer, AdapterModule
from splice.adapters.methods.ia3 import IA3
from splice.adapters.methods.loha import LoHa
from splice.adapters.methods.lora_layers import LoraLinear
from splice.adapters.methods.vera import VeraLinear
from splice.adapters.mixed_structured import (
    BlockStack,
    KronStack,
    ReflectStack,
    build_blocks,
    build_kron,
    build_reflect,
    kron_update,
    structured_kind,
)

_CACHE: weakref.WeakKeyDictionary[AdaptedLayer, LayerKernels] = weakref.WeakKeyDictionary()


def rank_bucket(r: int) -> int:
    """The padded rank of a LoRA of rank r: the next power of two, at least 8."""
    return max(8, 1 << (r - 1).bit_length())


def _dropout_off(module: AdapterModule) -> bool:
    drop = getattr(module, "dropout", None)
    return drop is None or isinstance(drop, nn.Identity) or not module.training


def kernel_kind(module: AdapterModule, base: nn.Module) -> str | None:
    """Which batched kernel runs ``module`` (on base layer ``base``) in a mixed batch (None:
    the per-segment path)."""
    if isinstance(module, LoraLinear):
        plain = module.lora_B.bias is None and module.base_bias is None
        return "lora" if plain and _dropout_off(module) else None
    if isinstance(module, IA3) and module.kind in ("linear", "conv1d"):
        return "ia3_in" if module.feedforward else "ia3_out"
    if isinstance(module, VeraLinear) and _dropout_off(module):
        return "vera"
    if isinstance(module, LoHa) and isinstance(base, nn.Linear) and not module.effective:
        no_dropout = not module.training or not (module.rank_dropout or module.module_dropout)
        out_f, in_f = base.weight.shape
        # the LoRA form (rank r²) when it costs less than the dense ΔW per token
        if no_dropout and module.r**2 * (in_f + out_f) < in_f * out_f:
            return "loha"
    return structured_kind(module, base)


_VERSION = operator.attrgetter("_version")


@dataclass
class Stamp:
    """The (data_ptr, _version) of some tensors when the stacks were built (module
    docstring); compared in C loops (``map``), as this runs at every mixed forward."""

    tensors: list[Tensor]
    ptrs: list[int]
    versions: list[int]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> Stamp:
        return cls(tensors, list(map(Tensor.data_ptr, tensors)), list(map(_VERSION, tensors)))

    def fresh(self) -> bool:
        return (
            list(map(_VERSION, self.tensors)) == self.versions
            and list(map(Tensor.data_ptr, self.tensors)) == self.ptrs
        )


@dataclass
class LoraStack:
    """The LoRA / DoRA adapters of one rank bucket of one layer (module docstring)."""

    slots: dict[str, int]  # adapter name -> slot; slot len(slots) is the zero slot
    a: Tensor  # (n+1) × R × in: A
    b: Tensor  # (n+1) × out × R: c ⊙ s B
    c: Tensor | None  # (n+1) × out, DoRA's c (1 for LoRA and the zero slot); None: no DoRA


@dataclass
class VectorStack:
    """Per-adapter vectors of one kind (IA3 l; VeRA λ_d, λ_b), one slot per adapter plus the
    neutral slot (IA3: 1, VeRA: 0) at index len(slots)."""

    slots: dict[str, int]
    vectors: list[Tensor]  # each (n+1) × features
    projections: tuple[Tensor, Tensor] | None = None  # VeRA's A' (r × in), B' (out × r)


@dataclass
class LayerKernels:
    names: list[str]  # the layer's adapter names when built, in order
    modules: list[AdapterModule]  # their modules (identity compared)
    # the modules whose kernel kind depends on their mode (they have dropout), with the
    # ``training`` flag at the build
    mode_sensitive: list[tuple[AdapterModule, bool]]
    base: Stamp  # the base layer's parameters (DoRA's c depends on W)
    watched: dict[str, Stamp]  # kernel adapter name -> its parameters and buffers
    kinds: dict[str, str]  # adapter name -> kernel kind
    lora: list[LoraStack] = field(default_factory=list)
    ia3_in: VectorStack | None = None
    ia3_out: VectorStack | None = None
    vera: list[VectorStack] = field(default_factory=list)
    # `splice.adapters.mixed_structured`: LoKr (output side), OFT and HRA (input side)
    kron: list[KronStack] = field(default_factory=list)
    blocks: list[BlockStack] = field(default_factory=list)
    reflect: list[ReflectStack] = field(default_factory=list)

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of every stacked tensor (the kernels' compute dtype)."""
        dtype = torch.bool
        for stack in self.lora:
            dtype = torch.promote_types(dtype, stack.a.dtype)
        for kron in self.kron:
            dtype = torch.promote_types(dtype, kron.w1.dtype)
        for vs in [self.ia3_out, self.ia3_in, *self.vera]:
            if vs is not None:
                dtype = torch.promote_types(dtype, vs.vectors[0].dtype)
        return dtype


def clear_cache(layer: AdaptedLayer | None = None) -> None:
    """Drop the cached stacks of ``layer`` (None: of every layer)."""
    if layer is None:
        _CACHE.clear()
    else:
        _CACHE.pop(layer, None)


def _mode_sensitive(module: AdapterModule) -> bool:
    """Whether ``kernel_kind`` of ``module`` can change with its train / eval mode."""
    drop = getattr(module, "dropout", None)
    return (drop is not None and not isinstance(drop, nn.Identity)) or bool(
        getattr(module, "rank_dropout", 0)
        or getattr(module, "module_dropout", 0)
        or getattr(module, "dropout_p", 0)  # OFT's module dropout
    )


def is_fresh(built: LayerKernels, layer: AdaptedLayer, names: Collection[str] | None) -> bool:
    """Whether ``built`` still holds the layer's adapters: the same adapter modules (by
    identity) in the same modes, the base weight and the adapters ``names`` (None: every
    kernel adapter) unchanged since the build."""
    modules = layer.adapters._modules
    # lists of pointers compared by identity first (no per-adapter objects made: this runs
    # for every adapted layer at every mixed forward)
    if list(modules.values()) != built.modules or list(modules) != built.names:
        return False
    if any(m.training != mode for m, mode in built.mode_sensitive) or not built.base.fresh():
        return False
    watched = built.watched
    for name in watched if names is None else names:
        stamp = watched.get(name)
        if stamp is not None and not stamp.fresh():
            return False
    return True


def layer_kernels(layer: AdaptedLayer, names: Collection[str] | None = None) -> LayerKernels:
    """The layer's stacks, rebuilt when an adapter module was added, removed or replaced, the
    base weight changed, or one of the adapters ``names`` (the batch's; None: all) changed.
    An adapter outside the batch that changed is found when a batch names it (its stale slot
    is read by no row before that)."""
    cached = _CACHE.get(layer)
    if cached is not None and is_fresh(cached, layer, names):
        return cached
    base = layer.base_layer
    kinds = {n: k for n, m in layer.adapters.items() if (k := kernel_kind(m, base)) is not None}
    watched = {
        n: Stamp.of([*layer.adapters[n].parameters(), *layer.adapters[n].buffers()]) for n in kinds
    }
    modules = list(layer.adapters.values())
    sensitive = [(m, m.training) for m in modules if _mode_sensitive(m)]
    built = LayerKernels(
        list(layer.adapters), modules, sensitive, Stamp.of(list(base.parameters())), watched, kinds
    )
    with torch.no_grad():
        _build_lora(layer, built)
        built.ia3_in = _build_ia3(layer, kinds, "ia3_in")
        built.ia3_out = _build_ia3(layer, kinds, "ia3_out")
        _build_vera(layer, built)
        built.kron = _build_of(layer, built.kinds, "lokr", build_kron)
        built.blocks = _build_of(layer, built.kinds, "oft", build_blocks)
        built.reflect = _build_of(
            layer, built.kinds, "hra", functools.partial(build_reflect, rank_bucket=rank_bucket)
        )
    _CACHE[layer] = built
    return built


def _one_dtype(modules: dict[str, AdapterModule], kinds: dict[str, str]) -> bool:
    """Stacking needs one dtype and device; otherwise the kind runs per segment."""
    seen = {(p.dtype, p.device) for m in modules.values() for p in m.parameters()}
    if len(seen) > 1:
        for n in modules:
            kinds.pop(n)
        return False
    return True


def _lora_form(layer: AdaptedLayer, module: AdapterModule) -> tuple[Tensor, Tensor, Tensor | None]:
    """(A: r × in, B: out × r with the scaling (and DoRA's c) folded in, DoRA's c or None).

    LoHa: ΔW = s (W1a W1b) ⊙ (W2a W2b) has entries s Σ_jk W1a[o,j] W2a[o,k] · W1b[j,i]
    W2b[k,i], i.e. ΔW = s U V with U = the row-wise outer products of W1a, W2a (out × r²)
    and V those of the columns of W1b, W2b (r² × in): a LoRA of rank r²."""
    if isinstance(module, LoHa):
        u = (module.hada_w1_a[:, :, None] * module.hada_w2_a[:, None, :]).flatten(1)
        v = (module.hada_w1_b[:, None, :] * module.hada_w2_b[None, :, :]).flatten(0, 1)
        return v, u * module.scaling, None
    assert isinstance(module, LoraLinear)
    a, b = module.lora_A.weight, module.lora_B.weight * module.scaling
    if not module.use_dora:
        return a, b, None
    c = module.dora_scale(module.base_weight(layer.base_layer).to(a.dtype)).to(a.dtype)
    return a, c[:, None] * b, c


def _build_lora(layer: AdaptedLayer, built: LayerKernels) -> None:
    modules = {n: layer.adapters[n] for n, k in built.kinds.items() if k in ("lora", "loha")}
    if not modules or not _one_dtype(modules, built.kinds):
        return
    forms = {n: _lora_form(layer, m) for n, m in modules.items()}
    buckets: dict[int, list[str]] = {}
    for n, (a, _, _) in forms.items():
        buckets.setdefault(rank_bucket(a.shape[0]), []).append(n)
    for rank, names in sorted(buckets.items()):
        a0, b0, _ = forms[names[0]]
        dtype, device = a0.dtype, a0.device
        in_f, out_f = a0.shape[1], b0.shape[0]
        a = torch.zeros(len(names) + 1, rank, in_f, dtype=dtype, device=device)
        b = torch.zeros(len(names) + 1, out_f, rank, dtype=dtype, device=device)
        any_dora = any(forms[n][2] is not None for n in names)
        cs = torch.ones(len(names) + 1, out_f, dtype=dtype, device=device) if any_dora else None
        for i, n in enumerate(names):
            a_n, b_n, c_n = forms[n]
            a[i, : a_n.shape[0]] = a_n
            b[i, :, : a_n.shape[0]] = b_n
            if c_n is not None:
                assert cs is not None
                cs[i] = c_n
        built.lora.append(LoraStack({n: i for i, n in enumerate(names)}, a, b, cs))


def _build_of(layer: AdaptedLayer, kinds: dict[str, str], kind: str, build: Callable) -> list:
    """``build({name: module})`` for the layer's adapters of ``kind`` (one dtype and device)."""
    modules = {n: layer.adapters[n] for n, k in kinds.items() if k == kind}
    if not modules or not _one_dtype(modules, kinds):
        return []
    return build(modules)


def _build_ia3(layer: AdaptedLayer, kinds: dict[str, str], kind: str) -> VectorStack | None:
    modules = {n: layer.adapters[n] for n, k in kinds.items() if k == kind}
    if not modules or not _one_dtype(modules, kinds):
        return None
    vecs = [m.ia3_l.flatten() for m in modules.values()]
    vecs.append(torch.ones_like(vecs[0]))
    return VectorStack({n: i for i, n in enumerate(modules)}, [torch.stack(vecs)])


def _build_vera(layer: AdaptedLayer, built: LayerKernels) -> None:
    modules = {n: layer.adapters[n] for n, k in built.kinds.items() if k == "vera"}
    if not modules or not _one_dtype(modules, built.kinds):
        return
    groups: list[tuple[tuple[Tensor, Tensor], list[str]]] = []
    for n, m in modules.items():
        a, b = m.sliced()
        for (ga, gb), names in groups:
            if (
                ga.shape == a.shape
                and gb.shape == b.shape
                and torch.equal(ga, a)
                and torch.equal(gb, b)
            ):
                names.append(n)
                break
        else:
            groups.append(((a, b), [n]))
    for (a, b), names in groups:
        ld = [modules[n].vera_lambda_d for n in names]
        lb = [modules[n].vera_lambda_b for n in names]
        ld.append(torch.zeros_like(ld[0]))
        lb.append(torch.zeros_like(lb[0]))
        dtype = ld[0].dtype
        slots = {n: i for i, n in enumerate(names)}
        proj = (a.to(dtype).clone(), b.to(dtype).clone())
        built.vera.append(VectorStack(slots, [torch.stack(ld), torch.stack(lb)], proj))


# -- applying the kernels ----------------------------------------------------------------------


@dataclass
class RowSlots:
    """For one stack: each row's slot (the neutral slot for rows it does not cover), and the
    covered rows when they are under half the batch (then only those rows are computed)."""

    slots: Tensor  # (rows,) or (k,) when ``rows`` is set
    rows: Tensor | None  # the covered rows, ascending; None: all rows
    uniform: int | None = None  # the slot of every row, when all rows have the same one
    # weighted-set pairs (`pair_slots`): each entry's weight; ``rows`` may repeat a row
    weights: Tensor | None = field(default=None, kw_only=True)
    # every row of the batch as runs (start, stop, slot) of consecutive rows with one slot
    # (the neutral slot included), for kernels that loop over runs (OFT on CPU; not set for
    # weighted-set pairs)
    runs: list[tuple[int, int, int]] = field(default_factory=list, kw_only=True)


def row_slots(
    stack_slots: dict[str, int], row_names: list[str | None], device: torch.device
) -> RowSlots | None:
    """Each row's slot in a stack from the row's kernel adapter name (None: none); None when
    the stack covers no row."""
    neutral = len(stack_slots)
    slots = [stack_slots.get(n, neutral) if n is not None else neutral for n in row_names]
    covered = [i for i, s in enumerate(slots) if s != neutral]
    if not covered:
        return None
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], i + 1, s)
        else:
            runs.append((i, i + 1, s))
    if 2 * len(covered) >= len(slots):
        uniform = slots[0] if len(covered) == len(slots) and len(set(slots)) == 1 else None
        return RowSlots(
            torch.tensor(slots, dtype=torch.long, device=device), None, uniform, runs=runs
        )
    return RowSlots(
        torch.tensor([slots[i] for i in covered], dtype=torch.long, device=device),
        torch.tensor(covered, dtype=torch.long, device=device),
        runs=runs,
    )


def pair_slots(
    stack_slots: dict[str, int],
    pairs: list[tuple[int, str, float]],
    device: torch.device,
    dtype: torch.dtype,
) -> RowSlots | None:
    """The (row, adapter, weight) pairs of weighted-set rows whose adapter is in a stack, as
    entries computed like rows (the row's input gathered per entry) whose update is scaled
    by the weight and added to the row (``index_add_``: a row's entries sum); None when no
    pair is in the stack. Weight 0 entries are dropped (they add 0). The weights are held in
    ``dtype``, the kernels' compute dtype (float64 adapters keep float64 weights)."""
    kept = [(r, stack_slots[n], w) for r, n, w in pairs if n in stack_slots and w != 0.0]
    if not kept:
        return None
    rows, slots, weights = zip(*kept, strict=True)
    return RowSlots(
        torch.tensor(slots, dtype=torch.long, device=device),
        torch.tensor(rows, dtype=torch.long, device=device),
        weights=torch.tensor(weights, dtype=dtype, device=device),
    )


@dataclass
class SetSlots:
    """For one LoRA stack: the weighted-set rows with adapters in it, each row's slots and
    weights padded to the largest count K with the zero slot and weight 0 (exact: + 0)."""

    slots: Tensor  # (n, K)
    weights: Tensor  # (n, K), in the kernels' compute dtype
    rows: Tensor | None  # the n rows, ascending; None: every row of the batch (n = rows)


def set_slots(
    stack_slots: dict[str, int],
    row_sets: list[list[tuple[str, float]] | None],
    device: torch.device,
    dtype: torch.dtype,
) -> SetSlots | None:
    """Each row's (slot, weight) list in a LoRA stack from its weighted set (None: not one run
    as such); None when no row has one of the stack's adapters with a non-zero weight. When
    at least half the batch has one, every row is listed (the others with the zero slot),
    as `row_slots`."""
    neutral = len(stack_slots)
    per_row = [
        [(stack_slots[n], w) for n, w in entries if n in stack_slots and w != 0.0]
        if entries is not None
        else []
        for entries in row_sets
    ]
    covered = [i for i, e in enumerate(per_row) if e]
    if not covered:
        return None
    listed = list(range(len(per_row))) if 2 * len(covered) >= len(per_row) else covered
    k = max(len(per_row[i]) for i in covered)
    pad = [(neutral, 0.0)] * k
    grid = [(per_row[i] + pad)[:k] for i in listed]
    return SetSlots(
        torch.tensor([[s for s, _ in g] for g in grid], dtype=torch.long, device=device),
        torch.tensor([[w for _, w in g] for g in grid], dtype=dtype, device=device),
        None
        if len(listed) == len(per_row)
        else torch.tensor(covered, dtype=torch.long, device=device),
    )


def _rows3(t: Tensor) -> Tensor:
    """(rows, positions, features) view of a contiguous (rows, ..., features) tensor."""
    return t.view(t.shape[0], -1, t.shape[-1])


def scale_input(x: Tensor, stack: VectorStack, rs: RowSlots) -> Tensor:
    """IA3 input scaling: x ⊙ l_a(r) per row, rounded back to x's dtype (the base's input)."""
    vec = stack.vectors[0]
    x = x.contiguous()
    if rs.rows is None:
        scale = vec.index_select(0, rs.slots)[:, None, :]
        return (_rows3(x.to(vec.dtype)) * scale).view(x.shape).to(x.dtype)
    out = x.clone()
    sub = x.index_select(0, rs.rows).to(vec.dtype)
    sub = _rows3(sub) * vec.index_select(0, rs.slots)[:, None, :]
    out.index_copy_(0, rs.rows, sub.view((-1, *x.shape[1:])).to(x.dtype))
    return out


# The functions below update ``out`` in place: a contiguous tensor owned by the caller, in the
# promoted dtype of the base result and the adapters. Each row has at most one kernel adapter,
# so a kernel run on every row leaves the rows of the others exactly as they were (× 1, + 0):
# the base result's rows that other adapters read are unchanged. Weighted-set entries
# (``rs.weights``) touch only their own rows, which no single-adapter kernel covers; the entries
# that read the base result get it from the base layer's output, not from ``out``.


def scale_output_(out: Tensor, stack: VectorStack, rs: RowSlots) -> None:
    """IA3 output scaling: out ← l_a(r) ⊙ out per row."""
    vec = stack.vectors[0].to(out.dtype)
    if rs.rows is None:
        _rows3(out).mul_(vec.index_select(0, rs.slots)[:, None, :])
        return
    sub = _rows3(out.index_select(0, rs.rows)) * vec.index_select(0, rs.slots)[:, None, :]
    out.index_copy_(0, rs.rows, sub.view((-1, *out.shape[1:])))


def add_lora_(out: Tensor, x: Tensor, base: Tensor, bias: Tensor | None, stack: LoraStack,
              rs: RowSlots) -> None:  # fmt: skip
    """out ← out + (c − 1)(base − b) + B A x per row (module docstring). ``base``: the base
    layer's output (DoRA's rescaled part)."""
    dtype = stack.a.dtype
    if rs.uniform is not None and out.dtype == dtype:
        _add_one_lora_(out, x, bias, stack, rs.uniform)
        return
    if rs.rows is not None:
        x = x.index_select(0, rs.rows)
    # (A x)ᵀ = A xᵀ per row, then y += (A x)ᵀᵀ Bᵀ: the factors in their own layout (the
    # fastest order of the small per-row products measured on CPU)
    x3 = _rows3(x.contiguous().to(dtype))
    h = torch.bmm(stack.a.index_select(0, rs.slots), x3.transpose(1, 2)).transpose(1, 2)
    b = stack.b.index_select(0, rs.slots).transpose(1, 2)
    if rs.rows is None and out.dtype == dtype:
        out3 = _rows3(out)
        if stack.c is not None:  # out's rows are the base's here: c ⊙ base + (1 − c) ⊙ b
            c = stack.c.index_select(0, rs.slots)
            out3.mul_(c[:, None, :])
            if bias is not None:
                out3.add_(((1 - c) * bias.to(dtype))[:, None, :])
        out3.baddbmm_(h, b)
        return
    upd = torch.bmm(h, b)
    if stack.c is not None:
        base = base if rs.rows is None else base.index_select(0, rs.rows)
        base3 = _rows3(base.contiguous()).to(dtype)
        if bias is not None:
            base3 = base3 - bias.to(dtype)
        upd.addcmul_(stack.c.index_select(0, rs.slots)[:, None, :] - 1, base3)
    _add_rows_(out, upd, rs)


def add_lora_sets_(out: Tensor, x: Tensor, base: Tensor, bias: Tensor | None, stack: LoraStack,
                   ss: SetSlots) -> None:  # fmt: skip
    """Weighted-set rows of a LoRA stack: each row's K adapters as one LoRA of rank K·R,

        out_r += Σ_k w_k [(c_k − 1)(base_r − b) + B_k A_k x_r] = (Σ_k w_k (c_k − 1))(base_r − b)
                 + [B_1 w_1 … B_K w_K] [A_1; …; A_K] x_r

    (the factors gathered per row and concatenated along the rank, the weights folded into
    the B columns): two ``bmm`` over the rows, x read once per row. ``base``: the base layer's
    output (unchanged by the other kernels)."""
    dtype = stack.a.dtype
    n, k = ss.slots.shape
    rank, in_f, out_f = stack.a.shape[1], stack.a.shape[2], stack.b.shape[1]
    flat, w = ss.slots.flatten(), ss.weights.to(dtype)  # (the stacks may differ in dtype)
    a = stack.a.index_select(0, flat).view(n, k * rank, in_f)
    bt = stack.b.index_select(0, flat).view(n, k, out_f, rank).transpose(2, 3)
    bt = (bt * w[:, :, None, None]).reshape(n, k * rank, out_f)
    if ss.rows is not None:
        x, base = x.index_select(0, ss.rows), base.index_select(0, ss.rows)
    h = torch.bmm(a, _rows3(x.contiguous().to(dtype)).transpose(1, 2)).transpose(1, 2)
    in_place = ss.rows is None and out.dtype == dtype
    upd = _rows3(out) if in_place else torch.zeros(n, h.shape[1], out_f, dtype=dtype,
                                                   device=out.device)  # fmt: skip
    if stack.c is not None:
        cw = ((stack.c.index_select(0, flat).view(n, k, out_f) - 1) * w[:, :, None]).sum(1)
        base3 = _rows3(base.contiguous()).to(dtype)
        if bias is not None:
            base3 = base3 - bias.to(dtype)
        upd.addcmul_(cw[:, None, :], base3)
    upd.baddbmm_(h, bt)
    if not in_place:
        _add_rows_(out, upd, RowSlots(ss.slots, ss.rows))


def _add_one_lora_(
    out: Tensor, x: Tensor, bias: Tensor | None, stack: LoraStack, slot: int
) -> None:
    """`add_lora_` when every row has the adapter in ``slot``: two flat matmuls (no gather),
    the update accumulated into ``out`` in place."""
    out2 = out.view(-1, out.shape[-1])
    if stack.c is not None:  # c ⊙ base + (1 − c) ⊙ b, as in add_lora_
        c = stack.c[slot]
        out2.mul_(c)
        if bias is not None:
            out2.add_((1 - c) * bias.to(c.dtype))
    h = x.reshape(-1, x.shape[-1]).to(stack.a.dtype) @ stack.a[slot].T
    out2.addmm_(h, stack.b[slot].T)


def add_vera_(out: Tensor, x: Tensor, stack: VectorStack, rs: RowSlots) -> None:
    """out ← out + λ_b ⊙ B'(λ_d ⊙ A' x) per row, the projections shared by the group."""
    assert stack.projections is not None
    a, b = stack.projections
    ld, lb = stack.vectors
    if rs.rows is not None:
        x = x.index_select(0, rs.rows)
    h = _rows3(x.contiguous().to(ld.dtype)) @ a.T
    h.mul_(ld.index_select(0, rs.slots)[:, None, :])
    lb_rows = lb.index_select(0, rs.slots)[:, None, :]
    if rs.rows is None and out.dtype == ld.dtype:
        _rows3(out).addcmul_(h @ b.T, lb_rows)
        return
    _add_rows_(out, (h @ b.T).mul_(lb_rows), rs)


def add_kron_(out: Tensor, x: Tensor, stack: KronStack, rs: RowSlots) -> None:
    """out ← out + s W1 X W2ᵀ per row (`splice.adapters.mixed_structured`): accumulated into
    ``out`` by the last product when every row is computed in ``out``'s dtype."""
    if rs.rows is None and out.dtype == stack.w1.dtype:
        kron_update(x, stack, rs, into=_rows3(out))
        return
    _add_rows_(out, kron_update(x, stack, rs), rs)


def add_scaled_output_(out: Tensor, base: Tensor, stack: VectorStack, rs: RowSlots) -> None:
    """IA3 output scaling as an additive update (weighted-set pairs): out ← out + (l − 1) ⊙
    base per entry (f_a − f for that adapter), ``base`` the base layer's output."""
    vec = stack.vectors[0]
    base3 = _rows3(base.index_select(0, rs.rows) if rs.rows is not None else base.contiguous())
    upd = base3.to(vec.dtype) * (vec.index_select(0, rs.slots) - 1)[:, None, :]
    _add_rows_(out, upd, rs)


def _add_rows_(out: Tensor, upd3: Tensor, rs: RowSlots) -> None:
    if rs.weights is not None:  # weighted-set pairs: each entry's update times its weight
        upd3 = upd3 * rs.weights.to(upd3.dtype)[:, None, None]
    if rs.rows is None:
        _rows3(out).add_(upd3)
    else:
        out.index_add_(0, rs.rows, upd3.view((-1, *out.shape[1:])).to(out.dtype))
