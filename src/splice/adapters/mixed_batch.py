"""Mixed-adapter batches: each row of one forward pass names its own adapter(s).

    am(input_ids, adapter_names=["sst", "__base__", {"sst": 0.5, "style": 0.5}, ["a", "b"]])

One entry per row (PEFT's keyword and semantics, plus weighted sets):

- an adapter name: that adapter alone for the row; ``"__base__"`` (PEFT's name): no adapter;
- a dict ``{name: weight}`` or a list of names (weight 1 each): a *weighted set*.

The currently active adapters play no part in such a forward (as PEFT): a row runs exactly
what it names. With f_a a layer's forward with adapter a alone and f its base forward, a
row with the set {a_i: w_i} gets, at each adapted layer,

    y = f(x) + Σ_i w_i · (f_{a_i}(x) − f(x)).

For every weight-space adapter the layer is affine in its parameters, so f_a(x) − f(x) = ΔW_a x
(+ Δb_a) with ΔW_a the adapter's delta (`AdapterModule.delta`), and the set's row is exactly
the layer with W + Σ w_i ΔW_i: the forward of the weighted sum of their updates (LoRA: Σ w_i
s_i B_i A_i x; DoRA: its own ‖W + s B A‖ scale per adapter inside its ΔW; OFT / HRA / IA3:
W (M_i − I)). Bottleneck adapters (not weight deltas) get the weighted sum of their residuals
h + Σ w_i r_i(h). A single name is the set {name: 1}, and its rows equal the forward with that
adapter alone active (the layer's output for those rows is replaced by f_a's, not summed).

Execution, per adapted layer (`AdaptedLayer.forward` while a plan is set):

- every row the same single adapter: the plain forward with that adapter (no gather, no
  scatter, no copy);
- otherwise the base layer runs once for the whole batch (on x ⊙ l per row where IA3 scales
  inputs), then the rows whose one adapter (weight 1) is LoRA / DoRA / LoHa (linear), IA3 or VeRA
  (or LoKr, OFT, HRA: `splice.adapters.mixed_structured`) are computed together by the batched
  kernels of `splice.adapters.mixed_kernels` (stacked factors per rank bucket, two ``bmm``
  over the rows, DoRA's scale and the IA3 / VeRA vectors gathered per row; whatever the
  number of distinct adapters), updating the base result in place;
- weighted sets whose adapters in this layer are all of an *additive* kernel kind
  (`ADDITIVE_KINDS`: LoRA incl. rsLoRA / rank patterns and DoRA, LoHa in its LoRA form,
  VeRA, LoKr, IA3 output scaling) run in the same kernels, each adapter's f_a(x) − f(x)
  computed from x and the row's base result (LoRA: s B A x; DoRA: (c − 1)(f(x) − b) + c s
  B A x; IA3: (l − 1) ⊙ f(x)), times its weight, added to the row. LoRA stacks (LoRA, DoRA,
  LoHa): each row's K adapters of the bucket as one LoRA of rank K·R, [w_1 B_1 … w_K B_K]
  [A_1; …; A_K] x plus Σ w_k (c_k − 1)(f(x) − b) (`MixedBatchPlan.sets`, padded with the
  zero slot: two ``bmm`` over the rows, as single-adapter rows). VeRA, LoKr, IA3: the row is
  expanded into (row, adapter, weight) entries (`MixedBatchPlan.pairs`), each computed like
  a single-adapter row (its row of x gathered), scaled and ``index_add_``-ed into the row.
  Weight-0 entries are dropped. The base result is left unchanged (what reads it reads the
  base layer's own output; the result is then a copy), so the row gets f(x) + Σ w_i
  (f_{a_i}(x) − f(x)) as above, up to float rounding — with every row its own set
  (retrieval routing, Twin-Merging) in a few batched products per stack instead of one
  Python segment per row. Not additive, so not paired: input transforms (IA3
  input scaling, OFT, HRA: they change the base layer's input) and the non-kernel kinds; the
  decision is per layer (a set runs in the kernels at the layers where all of its adapters
  are additive kernel kinds, per segment at the others);
- the remaining segments (the rows sharing one other weighted set, or one adapter of another
  kind) run per segment: the segment's rows are gathered once (``index_select``), each
  adapter of the set runs on them, and the result is written back (``index_copy``). Additive
  adapters (LoRA, DoRA, VeRA, LoHa, LoKr, IA3 output scaling, BitFit, bottleneck) reuse the
  base result of those rows; input transforms and replacements (OFT, HRA, IA3 input scaling,
  LN tuning, modules_to_save) run the base layer on their segment's rows.

Rows naming "__base__" cost nothing beyond the base (and the kernels' zero slot). With
gradients enabled on adapter parameters the kernels are skipped (their cached factors are
detached) and every segment runs the per-segment path.

Generation (`AdapterModel.generate(..., adapter_names=[...])`): one entry per input sequence;
the plan is set for the whole ``generate`` call, so every decoding step (KV cache on) runs it.
HF expands each input row into ``max(num_beams, num_return_sequences)`` consecutive rows
(``repeat_interleave``) and beam search reorders beams only within a row's own block, so the
plan's rows are repeated the same way (`MixedBatchPlan.repeat_rows`; PEFT repeats
adapter_names for num_beams likewise).

Prompt and prefix tuning rows (a row naming one such adapter alone): each row gets its own
virtual tokens or prefix, other rows masked padding (`splice.adapters.mixed_prompts`).

Model-level adapters (prompt / prefix tuning) stand alone in a row with weight 1: a weighted
set containing one (``{"prompt": 0.5, "lora": 0.5}``, or ``{"prompt": 0.5}`` alone) is refused
naming the row and the adapter — virtual tokens are not a weight delta and neither PEFT nor
AdapterHub defines a weighted mix of them. Folded adapters are refused too; both before any
compute.

The plan lives on the adapted layers (``AdaptedLayer.mixed_plan``) for the duration of one
forward or generate call (`mixed_forward`), so no keyword travels through the wrapped model's
code. One mixed call at a time per model: a second one started while a plan is set is refused.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from splice.adapters.layer import AdaptedLayer, AdapterStateError
from splice.adapters.mixed_kernels import (
    LayerKernels,
    RowSlots,
    SetSlots,
    add_kron_,
    add_lora_,
    add_lora_sets_,
    add_scaled_output_,
    add_vera_,
    kernel_kind,
    layer_kernels,
    pair_slots,
    row_slots,
    scale_input,
    scale_output_,
    set_slots,
)
from splice.adapters.mixed_structured import reflect_input, rotate_input
from splice.config_errors import did_you_mean

if TYPE_CHECKING:
    from splice.adapters.model import AdapterModel

BASE_NAME = "__base__"  # PEFT's row name for "no adapter"

RowAdapters = str | Sequence[str] | Mapping[str, float]

# kernel kinds whose update f_a(x) − f(x) is computed per row from x and the row's base result,
# leaving that base result as it is: a weighted set of them runs in the kernels (as pairs)
ADDITIVE_KINDS = frozenset({"lora", "loha", "vera", "lokr", "ia3_out"})

_SETTING = threading.Lock()  # guards the check-and-set of a model's plan


@dataclass
class Segment:
    """The rows (batch indices, ascending) that share one weighted set of adapters."""

    weights: tuple[tuple[str, float], ...]  # (adapter, weight), in the row's order
    rows: list[int]
    _index: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    # one adapter with weight 1: the rows are exactly that adapter's forward
    single: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.single = len(self.weights) == 1 and self.weights[0][1] == 1.0

    def index(self, device: torch.device) -> Tensor:
        """The rows as an index tensor on ``device`` (made once per device)."""
        if device not in self._index:
            self._index[device] = torch.tensor(self.rows, dtype=torch.long, device=device)
        return self._index[device]


@dataclass
class MixedBatchPlan:
    """Rows → segments for one forward. ``rows``: the batch size."""

    rows: int
    segments: list[Segment]
    # per call: each layer's kernels (checked once per call, not per decoding step) and the
    # rows' slots per stack (shared by the layers with the same adapters)
    _kernels: dict[int, LayerKernels | None] = field(default_factory=dict, repr=False)
    _slots: dict[tuple, Any] = field(default_factory=dict, repr=False)
    # per layer: the weighted-set segments its kernels run (indices into ``segments``)
    _paired: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # each row's adapter when it is one name with weight 1 (None: base or weighted set)
        self.row_single: list[str | None] = [None] * self.rows
        for seg in self.segments:
            if seg.single:
                for r in seg.rows:
                    self.row_single[r] = seg.weights[0][0]
        # the adapters whose cached kernel state this batch reads (`layer_kernels`)
        self.kernel_names = {n for seg in self.segments for n, _ in seg.weights}
        only = {self.row_single[r] for r in range(self.rows)}
        # every row the same single adapter: the plain forward with it (no gather / scatter)
        self.only = only.pop() if len(only) == 1 and self.rows else None

    def repeat_rows(self, times: int) -> MixedBatchPlan:
        """The plan for the batch with each row repeated ``times`` times in place (row r →
        rows r·times … r·times + times − 1, as ``repeat_interleave``)."""
        if times == 1:
            return self
        segments = [
            Segment(s.weights, [r * times + j for r in s.rows for j in range(times)])
            for s in self.segments
        ]
        return MixedBatchPlan(self.rows * times, segments)

    def forward(self, layer: AdaptedLayer, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """``layer``'s forward under this plan (module docstring)."""
        return layer_forward(self, layer, x, args, kwargs)

    def kernels(self, layer: AdaptedLayer) -> LayerKernels | None:
        """The layer's batched kernels, None when gradients must flow to its adapters."""
        if id(layer) not in self._kernels:
            needs_grad = torch.is_grad_enabled() and any(
                p.requires_grad for p in layer.adapters.parameters()
            )
            names = self.kernel_names
            self._kernels[id(layer)] = None if needs_grad else layer_kernels(layer, names)
        return self._kernels[id(layer)]

    def slots(self, stack_slots: dict[str, int], device: torch.device) -> RowSlots | None:
        key = (tuple(stack_slots), device)
        if key not in self._slots:
            self._slots[key] = row_slots(stack_slots, self.row_single, device)
        return self._slots[key]

    def paired(self, layer: AdaptedLayer, kinds: Mapping[str, str]) -> frozenset[int]:
        """The weighted-set segments (indices) the layer's kernels run: every adapter of the
        set that the layer has is of an additive kernel kind (`ADDITIVE_KINDS`), at least one."""
        if id(layer) not in self._paired:
            paired = []
            for i, seg in enumerate(self.segments):
                present = [n for n, _ in seg.weights if n in layer.adapters]
                if (
                    not seg.single
                    and present
                    and all(kinds.get(n) in ADDITIVE_KINDS for n in present)
                ):
                    paired.append(i)
            self._paired[id(layer)] = frozenset(paired)
        return self._paired[id(layer)]

    def pairs(
        self,
        stack_slots: dict[str, int],
        paired: frozenset[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> RowSlots | None:
        """The (row, adapter, weight) entries of the ``paired`` segments in a stack."""
        key = ("pairs", tuple(stack_slots), paired, device, dtype)
        if key not in self._slots:
            entries = [
                (r, n, w)
                for i in sorted(paired)
                for n, w in self.segments[i].weights
                for r in self.segments[i].rows
            ]
            self._slots[key] = pair_slots(stack_slots, entries, device, dtype)
        return self._slots[key]

    def sets(
        self,
        stack_slots: dict[str, int],
        paired: frozenset[int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> SetSlots | None:
        """Each row's (slot, weight) list in a LoRA stack, for the ``paired`` segments."""
        key = ("sets", tuple(stack_slots), paired, device, dtype)
        if key not in self._slots:
            row_sets: list[list[tuple[str, float]] | None] = [None] * self.rows
            for i in paired:
                for r in self.segments[i].rows:
                    row_sets[r] = list(self.segments[i].weights)
            self._slots[key] = set_slots(stack_slots, row_sets, device, dtype)
        return self._slots[key]


def _row_set(entry: Any, row: int) -> tuple[tuple[str, float], ...]:
    """One row's entry as ((adapter, weight), ...); () for the base."""
    if isinstance(entry, str):
        return () if entry == BASE_NAME else ((entry, 1.0),)
    if isinstance(entry, Mapping):
        items = list(entry.items())
    elif isinstance(entry, Sequence):
        names = list(entry)
        dup = sorted({n for n in names if names.count(n) > 1}, key=str)
        if dup:
            raise AdapterStateError(f"adapter_names row {row}: adapter {dup[0]!r} named twice")
        items = [(n, 1.0) for n in names]
    else:
        raise AdapterStateError(
            f"adapter_names row {row}: expected an adapter name, a list of names or a "
            f"{{name: weight}} dict, got {type(entry).__name__}"
        )
    if not items:
        raise AdapterStateError(
            f"adapter_names row {row}: an empty adapter set; use {BASE_NAME!r} for no adapter"
        )
    out = []
    for name, w in items:
        if not isinstance(name, str) or name == BASE_NAME:
            raise AdapterStateError(
                f"adapter_names row {row}: {name!r} in a weighted set; name adapters only "
                f"({BASE_NAME!r} stands alone)"
            )
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise AdapterStateError(
                f"adapter_names row {row}: weight of {name!r} must be a finite number, got {w!r}"
            )
        out.append((name, float(w)))
    return tuple(out)


def plan_rows(am: AdapterModel, adapter_names: Any, batch_size: int | None) -> MixedBatchPlan:
    """Check ``adapter_names`` against the model (no compute) and group its rows."""
    if isinstance(adapter_names, str | Mapping) or not isinstance(adapter_names, Sequence):
        raise AdapterStateError(
            "adapter_names: expected one entry per row of the batch (a list), got "
            f"{type(adapter_names).__name__}"
        )
    if batch_size is not None and len(adapter_names) != batch_size:
        raise AdapterStateError(
            f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows"
        )
    groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
    first_row: dict[str, int] = {}  # each name's first row (for the folded check below)
    for row, entry in enumerate(adapter_names):
        weights = _row_set(entry, row)
        for name, _ in weights:
            _check_usable(am, name, row, alone=weights == ((name, 1.0),))
            first_row.setdefault(name, row)
        if weights:
            groups.setdefault(weights, []).append(row)
    _check_not_folded(am, first_row)
    return MixedBatchPlan(len(adapter_names), [Segment(w, r) for w, r in groups.items()])


def _check_usable(am: AdapterModel, name: str, row: int, *, alone: bool) -> None:
    if name not in am.configs:
        known = ", ".join([BASE_NAME, *am.configs])
        raise AdapterStateError(
            f"adapter_names row {row}: no adapter named {name!r}"
            f"{did_you_mean(name, am.configs)}; adapters: {known}"
        )
    if name in am.model_adapters and not alone:
        # virtual tokens / a prefix are not a weight delta: a weighted set of them has no
        # defined meaning (PEFT and AdapterHub define none), so it is refused, not guessed
        raise AdapterStateError(
            f"adapter_names row {row}: adapter {name!r} ({am.configs[name].method}) is a "
            "model-level adapter (virtual tokens, not a weight delta): it can only stand alone "
            "in a row with weight 1, not in a weighted set"
        )


def _check_not_folded(am: AdapterModel, first_row: dict[str, int]) -> None:
    """One walk over the adapted layers for all the batch's names (not one per name)."""
    for path, layer in am.adapted_layers():
        folded = [n for n in layer.folded if n in first_row]
        if folded:
            name = min(folded, key=first_row.__getitem__)
            raise AdapterStateError(
                f"adapter_names row {first_row[name]}: adapter {name!r} is folded into "
                f"'{path}'; unfold it for a mixed batch"
            )


@contextmanager
def mixed_forward(am: AdapterModel, plan: MixedBatchPlan) -> Iterator[None]:
    """Set ``plan`` on every adapted layer for the body (one forward), then clear it."""
    if getattr(am, "_disabled", False):
        raise AdapterStateError("adapter_names inside disabled(): the adapters are disabled")
    layers = [layer for _, layer in am.adapted_layers()]
    with _SETTING:
        if any(layer.mixed_plan is not None for layer in layers):
            raise AdapterStateError("a mixed-batch forward is already running on this model")
        for layer in layers:
            layer.mixed_plan = plan
    try:
        yield
    finally:
        for layer in layers:
            layer.mixed_plan = None


def _kernel_precision(x: Tensor) -> AbstractContextManager[object]:
    """Autocast off for the kernels: they pick their own dtypes (the stacks', cast in and
    out), which autocast would override for some ops (``bmm`` to bfloat16) but not for the
    in-place ones that follow (``baddbmm_``), mixing dtypes. Under autocast the adapters'
    products run in the stacks' dtype (float32 for float32 adapters); the base layer keeps
    autocast."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


def layer_forward(
    plan: MixedBatchPlan, layer: AdaptedLayer, x: Tensor, args: tuple, kwargs: dict
) -> Tensor:
    """The adapted layer's forward under ``plan`` (module docstring)."""
    if x.dim() == 0 or x.shape[0] != plan.rows:
        raise AdapterStateError(
            f"mixed batch of {plan.rows} rows: an adapted layer got an input of shape "
            f"{tuple(x.shape)} (mixed batches need the batch on the first axis)"
        )
    if plan.only is not None and not _kernel_first(layer, plan.only):
        # every row the same adapter: its plain forward (DoRA, LoHa: the kernel, with the
        # cached scale or LoRA form, rather than ‖W + s B A‖ or the dense ΔW recomputed by
        # the plain forward)
        running = [layer.adapters[plan.only]] if plan.only in layer.adapters else []
        if len(running) == 1 and kernel_kind(running[0], layer.base_layer) == "lora":
            return _one_lora(layer, running[0], x, args, kwargs)
        return layer._forward_with(running, x, args, kwargs)
    kernels = plan.kernels(layer) if plan.segments else None
    kinds = kernels.kinds if kernels is not None else {}
    if kernels is None:
        x_base = x
    else:
        with _kernel_precision(x):
            x_base = _transform_input(plan, kernels, x)
    base_out = layer.base_layer(x_base, *args, **kwargs)
    out, owned = base_out, False
    paired: frozenset[int] = frozenset()
    if kernels is not None:
        paired = plan.paired(layer, kinds)
        with _kernel_precision(x):
            out, owned = _run_kernels(plan, kernels, layer, x, base_out, paired)
    for i, seg in enumerate(plan.segments):
        if i in paired:
            continue  # a weighted set of additive kernel adapters: done by the kernels
        if seg.single and (seg.weights[0][0] in kinds or seg.weights[0][0] not in layer.adapters):
            continue  # done by a kernel above, or nothing to do in this layer
        present = [(layer.adapters[n], w) for n, w in seg.weights if n in layer.adapters]
        if not present:
            continue
        idx = seg.index(x.device)
        x_s = x.index_select(0, idx)
        base_s = base_out.index_select(0, idx)
        if seg.single and len(present) == 1:
            y_s = layer.forward_alone(present[0][0], x_s, args, kwargs, base_s)
        else:
            y_s = base_s
            for adapter, w in present:
                f_s = layer.forward_alone(adapter, x_s, args, kwargs, base_s)
                y_s = y_s + w * (f_s - base_s)
        if not owned:
            out, owned = base_out.clone(), True
        out.index_copy_(0, idx, y_s.to(out.dtype))
    return out


def _kernel_first(layer: AdaptedLayer, name: str) -> bool:
    """Whether rows of adapter ``name`` alone run faster through the cached kernel than
    through the adapter's plain forward: DoRA (cached scale), LoHa (cached LoRA form), LoKr
    (cached factors, no dense ΔW), HRA (its reflections as one low-rank update) and OFT
    (cached blocks: no Cayley transform per forward; on CPU one ``bmm`` on strided views, no
    permuted copies)."""
    if name not in layer.adapters:
        return False
    module = layer.adapters[name]
    kind = kernel_kind(module, layer.base_layer)
    return kind in ("loha", "lokr", "hra", "oft") or (
        kind == "lora" and bool(getattr(module, "use_dora", False))
    )


def _transform_input(plan: MixedBatchPlan, kernels: LayerKernels, x: Tensor) -> Tensor:
    """The base layer's input for all rows: x with each kernel row's input transform (IA3
    input scaling, OFT, HRA) on its rows; other rows unchanged (each row has at most one)."""
    steps: list[tuple[Any, Callable]] = [(s, rotate_input) for s in kernels.blocks]
    steps += [(s, reflect_input) for s in kernels.reflect]
    if kernels.ia3_in is not None:
        steps.append((kernels.ia3_in, scale_input))
    for stack, apply in steps:
        rs = plan.slots(stack.slots, x.device)
        if rs is not None:
            x = apply(x, stack, rs)
    return x


def _one_lora(layer: AdaptedLayer, module: Any, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """A plain LoRA (kernel kind "lora", not DoRA) on every row: the base result plus s B A x
    accumulated in place (one ``addmm_``, no full-size temporaries); the plain forward when
    the adapter's dtype differs from the base result's."""
    base_out = layer.base_layer(x, *args, **kwargs)
    a, b = module.lora_A.weight, module.lora_B.weight
    if base_out.dtype != a.dtype:
        return module.transform_output(x, base_out, layer.base_layer).to(base_out.dtype)
    out = base_out.contiguous()
    h = x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.T
    out.view(-1, out.shape[-1]).addmm_(h, b.T, alpha=module.scaling)
    return out


def _run_kernels(
    plan: MixedBatchPlan,
    kernels: LayerKernels,
    layer: AdaptedLayer,
    x: Tensor,
    base_out: Tensor,
    paired: frozenset[int] = frozenset(),
) -> tuple[Tensor, bool]:
    """The batched kernels' rows (`splice.adapters.mixed_kernels`) on the base result: the
    result and whether it is a tensor the caller may write (False: ``base_out`` untouched).

    The base layer's fresh output is updated in place when its dtype is the compute dtype
    (no copy); with lower-precision base outputs (bf16 base, float32 adapters) a float32 copy
    is updated and rounded once at the end, as a row alone is.

    The ``paired`` weighted-set segments: in LoRA stacks each row's set as one LoRA of the
    summed rank (`set_slots`); in the VeRA, LoKr and IA3 stacks as (row, adapter, weight)
    entries (`pair_slots`), each entry's update (computed like a single-adapter row's) times
    its weight, summed into the row. What reads the base result (DoRA's rescaled part, IA3
    output scaling) reads ``base_out``, so then the result is a copy."""
    bias = getattr(layer.base_layer, "bias", None)
    work: list[Callable[[Tensor], None]] = []
    reads_base = False

    def slot_sets(stack_slots: dict[str, int]) -> list[RowSlots]:
        found = [plan.slots(stack_slots, x.device)]
        if paired:
            found.append(plan.pairs(stack_slots, paired, x.device, kernels.dtype))
        return [rs for rs in found if rs is not None]

    if kernels.ia3_out is not None:
        for rs in slot_sets(kernels.ia3_out.slots):
            if rs.weights is None:
                work.append(partial(scale_output_, stack=kernels.ia3_out, rs=rs))
            else:
                reads_base = True
                work.append(partial(add_scaled_output_, base=base_out, stack=kernels.ia3_out,
                                    rs=rs))  # fmt: skip
    for lora in kernels.lora:
        rs = plan.slots(lora.slots, x.device)
        if rs is not None:
            work.append(partial(add_lora_, x=x, base=base_out, bias=bias, stack=lora, rs=rs))
        ss = plan.sets(lora.slots, paired, x.device, kernels.dtype) if paired else None
        if ss is not None:  # each row's set as one LoRA of the summed rank
            reads_base |= lora.c is not None
            work.append(partial(add_lora_sets_, x=x, base=base_out, bias=bias, stack=lora, ss=ss))
    for vera in kernels.vera:
        for rs in slot_sets(vera.slots):
            work.append(partial(add_vera_, x=x, stack=vera, rs=rs))
    for kron in kernels.kron:
        for rs in slot_sets(kron.slots):
            work.append(partial(add_kron_, x=x, stack=kron, rs=rs))
    if not work:
        return base_out, False
    dtype = torch.promote_types(base_out.dtype, kernels.dtype)
    if dtype != base_out.dtype:
        out = base_out.to(dtype)
    else:
        out = base_out.clone() if reads_base else base_out.contiguous()
    for step in work:
        step(out)
    return out.to(base_out.dtype), True
