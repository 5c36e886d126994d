"""The structured mixed-batch kernels (`splice.adapters.mixed_structured`): LoKr (Kronecker
factors), OFT (stacked rotation blocks) and HRA (reflections as a low-rank input update).
Rows of many such adapters (several ranks, block sizes, options) equal each row alone with
no per-segment forward; the forms equal the adapters' own matrices on hand-computed inputs;
the kinds that cannot be batched run per segment; the cache follows in-place changes."""

from __future__ import annotations

import random

import pytest
import torch
from test_mixed_batch import check_random_assignments, check_rows, model_with

from splice.adapters import mixed_kernels
from splice.adapters.methods.hra import householder_product
from splice.adapters.mixed_kernels import RowSlots
from splice.adapters.mixed_structured import (
    BlockStack,
    KronStack,
    kron_cost,
    kron_update,
    reflection_form,
    rotate_input,
    structured_kind,
)

ATTN = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
FF = {"llama": ["down_proj"], "gpt2": ["c_fc"], "bert": ["intermediate.dense"]}


def structured_adapters(kind: str, count: int, seed: int) -> dict[str, tuple[str, dict]]:
    """``count`` adapters: LoKr (not on GPT-2's Conv1D), OFT, HRA with random options, and a
    few LoRA / IA3 (so the new kernels run next to the others in one layer)."""
    rng = random.Random(seed)
    attn, ff = ATTN[kind], FF[kind]
    types = ["oft", "hra", "lora", "ia3"] + ([] if kind == "gpt2" else ["lokr", "lokr"])
    out: dict[str, tuple[str, dict]] = {}
    for i in range(count):
        t = rng.choice(types)
        if t == "lokr":
            params = {
                "r": rng.choice([1, 2, 4]),
                "alpha": rng.choice([1, 4, 8]),
                "decompose_both": rng.random() < 0.5,
                "decompose_factor": rng.choice([-1, 2, 4]),
                "target_modules": attn + ff,
            }
        elif t == "oft":
            size = rng.choice([2, 4, 8])
            params = {
                "r": 0,
                "oft_block_size": size,
                "block_share": rng.random() < 0.3,
                "use_cayley_neumann": rng.random() < 0.5,
                "target_modules": attn + ff,
            }
        elif t == "hra":
            params = {
                "r": rng.choice([2, 3, 4, 10]),
                "apply_GS": rng.random() < 0.5,
                "target_modules": attn + ff,
            }
        elif t == "lora":
            params = {"r": rng.randint(2, 6), "target_modules": attn}
        else:
            params = {"target_modules": attn + ff, "feedforward_modules": ff}
        out[f"{t}{i}"] = (t, params)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_random_assignments_of_structured_adapters(kind: str, monkeypatch) -> None:
    """Property: random rows ← adapters (10 of LoKr / OFT / HRA with random options, some
    LoRA / IA3, or the base); every row equals the row alone; no row runs per segment."""
    setups = structured_adapters(kind, 10, seed=5)
    am = model_with(kind, setups)
    for _, layer in am.adapted_layers():  # every adapter of these options has a kernel
        for name, module in layer.adapters.items():
            assert mixed_kernels.kernel_kind(module, layer.base_layer) is not None, name
    check_random_assignments(am, list(setups), seed=4, trials=5, mp=monkeypatch)


PAIRS = {  # two adapters of one type, different options
    # W2 factored (rank 2), both factored, W2 dense (r = 4 ≥ 8 / 2)
    "lokr": [
        {"r": 2, "alpha": 4},
        {"r": 1, "decompose_both": True, "decompose_factor": 2},
        {"r": 4, "alpha": 2},
    ],
    "oft": [{"r": 0, "oft_block_size": 4}, {"r": 0, "oft_block_size": 8, "block_share": True}],
    "hra": [{"r": 4}, {"r": 3, "apply_GS": True}],
}


@pytest.mark.parametrize("label", ["lokr", "oft", "hra"])
def test_one_adapter_on_every_row_and_on_few_rows(label: str) -> None:
    """All rows one adapter (the uniform path), and one row of many (the gathered subset)."""
    targets = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
    setups = {f"{label}{i}": (label, {**p, **targets}) for i, p in enumerate(PAIRS[label])}
    am = model_with("llama", setups)
    first, second, *more = setups
    for name in (first, *more):
        check_rows(am, [name] * 3)
    check_rows(am, [first, "__base__", "__base__", "__base__", second])
    check_rows(am, [*setups, *setups, "__base__"])
    check_rows(am, [first, first, second, second, "__base__", "__base__", first])  # runs


def test_kron_update_hand_computed() -> None:
    """W1 = [[1, 2]] (1×2), W2 = [[1], [3]] (2×1), s = 0.5: ΔW = 0.5 [[1, 2], [3, 6]]; for
    x = (1, 1): ΔW x = (1.5, 4.5); the zero slot gives 0. Both product orders."""
    w1 = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]]) * 0.5
    w2 = torch.tensor([[[1.0], [3.0]], [[0.0], [0.0]]])
    x = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])  # 2 rows, 1 position, in = 2
    rs = RowSlots(torch.tensor([0, 1]), None)
    for w1_first in (True, False):
        got = kron_update(x, KronStack({"k": 0}, w1, w2, w1_first), rs)
        torch.testing.assert_close(got, torch.tensor([[[1.5, 4.5]], [[0.0, 0.0]]]))
    # per token: W2 first costs b·c·(d + a), W1 first a·d·(c + b)
    assert kron_cost(4, 8, 2, 2) == (4 * 2 * 10, True)  # W2 first: 2·8·6 = 96
    assert kron_cost(8, 4, 2, 2) == (2 * 4 * 10, False)  # W1 first: 8·2·6 = 96


@pytest.mark.parametrize("order", ["w1_first", "w2_first", "factored"])
def test_kron_update_equals_the_kronecker_product(order: str) -> None:
    """Every product order, returned or accumulated in place, on all rows or a subset:
    s (W1 ⊗ W2) x per token, against ``torch.kron`` (W2 = U2 V2 of rank 2 when factored)."""
    g = torch.Generator().manual_seed(0)
    a, c, b, d, n, k = 3, 4, 5, 2, 2, 2
    w1 = torch.randn(n + 1, a, c, generator=g, dtype=torch.float64)
    u2 = torch.randn(n + 1, b, k, generator=g, dtype=torch.float64)
    v2 = torch.randn(n + 1, k, d, generator=g, dtype=torch.float64)
    w1[n], u2[n], v2[n] = 0, 0, 0
    w2 = u2 @ v2
    if order == "factored":
        stack = KronStack({"p": 0, "q": 1}, w1, v2, False, u2)
    else:
        stack = KronStack({"p": 0, "q": 1}, w1, w2, order == "w1_first")
    x = torch.randn(4, 3, c * d, generator=g, dtype=torch.float64)  # 4 rows, 3 positions
    slots = [1, n, 0, 1]
    want = torch.stack([x[r] @ torch.kron(w1[s], w2[s]).T for r, s in enumerate(slots)])
    all_rows = RowSlots(torch.tensor(slots), None)
    torch.testing.assert_close(kron_update(x, stack, all_rows), want)
    start = torch.randn(4, 3, a * b, generator=g, dtype=torch.float64)
    got = kron_update(x, stack, all_rows, into=start.clone())
    torch.testing.assert_close(got, start + want)
    subset = RowSlots(torch.tensor([0, 1]), torch.tensor([2, 3]))
    torch.testing.assert_close(kron_update(x, stack, subset), want[2:])
    uniform = RowSlots(torch.tensor([1] * 4), None, uniform=1)  # all positions as one row
    want = x @ torch.kron(w1[1], w2[1]).T
    torch.testing.assert_close(kron_update(x, stack, uniform), want)
    got = kron_update(x, stack, uniform, into=start.clone())
    torch.testing.assert_close(got, start + want)


def test_rotate_input_runs_and_gathered_equal_the_block_diagonal() -> None:
    """OFT rows: the CPU path (one ``bmm`` per run of rows, strided views) and the gathered
    einsum (other devices; here with no runs) both give x_r R_bd(a(r)); rows of the
    identity slot are unchanged."""
    g = torch.Generator().manual_seed(0)
    nb, k = 3, 2
    blocks = torch.randn(3, nb, k, k, generator=g)
    blocks[2] = torch.eye(k)
    stack = BlockStack({"p": 0, "q": 1}, blocks)
    x = torch.randn(5, 2, nb * k, generator=g)
    slots = [0, 0, 2, 1, 1]
    want = torch.stack([x[r] @ torch.block_diag(*blocks[s]) for r, s in enumerate(slots)])
    runs = [(0, 2, 0), (2, 3, 2), (3, 5, 1)]
    for rs in (
        RowSlots(torch.tensor(slots), None, runs=runs),
        RowSlots(torch.tensor(slots), None),
        RowSlots(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 3, 4]), runs=runs),
        RowSlots(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 3, 4])),
    ):
        got = rotate_input(x, stack, rs)
        torch.testing.assert_close(got, want)
        assert torch.equal(got[2], x[2])
    assert (
        mixed_kernels.row_slots({"p": 0, "q": 1}, ["p", "p", None, "q", "q"], x.device).runs == runs
    )


def test_reflection_form_is_the_householder_product() -> None:
    """H = H_1 ⋯ H_r = I − B Aᵀ, so x Hᵀ = x − (x A) Bᵀ (compact WY; Gram–Schmidt:
    I − 2 Q Qᵀ). By hand: u = 2 e_1 gives diag(−1, 1); u_1 = u_2 gives I (a pair cancels)."""
    a, b = reflection_form(torch.tensor([[2.0], [0.0]]), apply_gs=False)
    torch.testing.assert_close(
        torch.eye(2, dtype=a.dtype) - b @ a.T, torch.diag(torch.tensor([-1.0, 1.0], dtype=a.dtype))
    )
    pair = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]])
    a, b = reflection_form(pair, apply_gs=False)
    torch.testing.assert_close(b @ a.T, torch.zeros(3, 3, dtype=a.dtype), atol=1e-12, rtol=0)
    u = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    for gs in (False, True):
        a, b = reflection_form(u, gs)
        want = householder_product(u.double(), gs)
        torch.testing.assert_close(torch.eye(7, dtype=a.dtype) - b @ a.T, want)
        assert (b @ a.T - a @ b.T).abs().max() > 1e-3 or gs  # H is not symmetric (no GS)


def test_kinds_that_run_per_segment() -> None:
    """COFT (rewrites its parameter at every forward), OFT dropout in training, HRA in
    another dtype than the base, a LoKr costing more than the dense ΔW: no kernel; their
    rows are still right."""
    attn = ["q_proj", "v_proj"]
    setups = {
        "coft": ("oft", {"r": 0, "oft_block_size": 4, "coft": True, "target_modules": attn}),
        "drop": (
            "oft",
            {"r": 0, "oft_block_size": 4, "module_dropout": 0.5, "target_modules": attn},
        ),
        "h64": ("hra", {"r": 2, "target_modules": attn}),
        # W1 1×1, W2 dense out×in (r ≥ in / 2): the Kronecker form costs more than ΔW
        "big": ("lokr", {"r": 16, "decompose_factor": 1, "target_modules": attn}),
        # the same with W2 of rank 2 (a LoRA in LoKr form): its factors are cheap
        "thin": ("lokr", {"r": 2, "decompose_factor": 1, "target_modules": attn}),
        "ok": ("oft", {"r": 0, "oft_block_size": 4, "target_modules": attn}),
    }
    am = model_with("llama", setups)
    layer = next(layer for _, layer in am.adapted_layers())
    layer.adapters["h64"].double()
    kinds = {n: structured_kind(m, layer.base_layer) for n, m in layer.adapters.items()}
    assert kinds == {
        "coft": None,
        "drop": "oft",
        "h64": None,
        "big": None,
        "thin": "lokr",
        "ok": "oft",
    }
    layer.adapters["drop"].train()
    assert structured_kind(layer.adapters["drop"], layer.base_layer) is None
    layer.adapters["drop"].eval()
    check_rows(am, ["coft", "drop", "ok", "__base__", "big", "h64", "thin"])


@pytest.mark.parametrize("what", ["lokr", "oft", "hra", "base_weight"])
def test_cache_follows_in_place_changes(what: str) -> None:
    attn = ["q_proj", "v_proj"]
    setups = {
        "lokr": ("lokr", {"r": 2, "alpha": 4, "target_modules": attn}),
        "oft": ("oft", {"r": 0, "oft_block_size": 4, "target_modules": attn}),
        "hra": ("hra", {"r": 2, "target_modules": attn}),
    }
    am = model_with("llama", setups)
    names = ["hra", "lokr", "oft", "__base__"]
    before = check_rows(am, names)[0]
    layer = next(layer for path, layer in am.adapted_layers() if path.endswith("v_proj"))
    with torch.no_grad():
        if what == "base_weight":
            layer.base_layer.weight.add_(0.3)
        else:
            next(iter(layer.adapters[what].parameters())).add_(0.3)  # HRA: not a rescaling
    after = check_rows(am, names)[0]
    assert (after - before).abs().max() > 1e-4
