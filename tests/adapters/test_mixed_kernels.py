"""The batched mixed-batch kernels (`splice.adapters.mixed_kernels`): many LoRA / DoRA / IA3 /
VeRA adapters of mixed ranks and scalings in one batch, each row equal to the row run alone;
the kernels really run (no per-segment forward); the cache follows in-place changes of the
adapters and of the base weight; the single-adapter fast path."""

from __future__ import annotations

import random

import pytest
import torch
from test_mixed_batch import check_random_assignments, check_rows, model_with
from tiny import inputs, randomize

from splice.adapters import make_config, mixed_kernels
from splice.adapters.layer import AdaptedLayer
from splice.adapters.mixed_kernels import rank_bucket

ATTN = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
FF = {"llama": ["down_proj"], "gpt2": ["c_fc"]}


def many_adapters(kind: str, count: int, seed: int) -> dict[str, tuple[str, dict]]:
    """``count`` adapters of random kernel types, ranks (2..20: several rank buckets),
    alphas, rsLoRA on or off, rank patterns."""
    rng = random.Random(seed)
    attn, ff = ATTN[kind], FF[kind]
    out = {}
    for i in range(count):
        kind_of = rng.choice(["lora", "lora", "lora", "dora", "ia3", "vera"])
        r = rng.randint(2, 20)
        if kind_of in ("lora", "dora"):
            params = {
                "r": r,
                "lora_alpha": rng.choice([1, 8, 16, 32]),
                "use_rslora": rng.random() < 0.5,
                "use_dora": kind_of == "dora",
                "target_modules": attn + ff,
            }
            if rng.random() < 0.3:
                params["rank_pattern"] = {attn[0]: rng.randint(1, 12)}
            out[f"{kind_of}{i}"] = ("lora", params)
        elif kind_of == "ia3":
            out[f"ia3{i}"] = ("ia3", {"target_modules": attn + ff, "feedforward_modules": ff})
        else:  # one projection key: the VeRA adapters share A', B' (one group)
            out[f"vera{i}"] = ("vera", {"r": 4, "target_modules": attn})
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_random_assignments_of_many_adapters(kind: str, monkeypatch) -> None:
    """Property: random rows ← adapters (12 of mixed types and ranks, or the base); every
    row equals the row alone; no row goes through the per-segment path."""
    setups = many_adapters(kind, 12, seed=7)
    am = model_with(kind, setups)
    check_random_assignments(am, list(setups), seed=3, trials=4, mp=monkeypatch)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_random_weighted_sets_of_many_ranks(kind: str, monkeypatch) -> None:
    """Property: per-row weighted sets (1–5 of 12 adapters of mixed types and rank buckets,
    weights in [−2, 2]) next to single-adapter and base rows; every row equals the row alone
    with its entry (`set_alone`: each adapter's own forward). In float64: with these large
    random adapters the tiny models amplify float32 rounding of either path past 1e-5 (both
    paths differ from the float64 result by up to ~1e-4 in float32, and agree to ~1e-14 in
    float64); the float32 check is `test_random_weighted_sets_run_in_the_kernels`."""
    from test_mixed_batch import check_entries, outputs

    setups = many_adapters(kind, 12, seed=5)
    am = model_with(kind, setups).double()
    rng = random.Random(4)
    for trial in range(3):
        entries: list = [rng.choice([*setups, "__base__"]) for _ in range(rng.randint(1, 4))]
        entries += [
            {n: rng.uniform(-2, 2) for n in rng.sample(list(setups), rng.randint(1, 5))}
            for _ in range(rng.randint(2, 5))
        ]
        rng.shuffle(entries)
        batch = inputs(seed=trial, batch=len(entries))
        with torch.no_grad():
            hidden = outputs(am, batch, adapter_names=entries)[1]
        check_entries(am, batch, hidden, entries, monkeypatch, atol=1e-10)


@pytest.mark.parametrize("rows_set", [[0], [0, 2]])  # one row of 3: gathered; two: in place
def test_lora_sets_kernel_by_hand(rows_set: list[int]) -> None:
    """`add_lora_sets_` on 1-dimensional factors: adapter 0 A = [1, 2], B = [1, 0] with DoRA's
    c = [2, 1]; adapter 1 A = [0, 1], B = [0, 3], c = 1; bias [1, 1]. A row {0: 0.5, 1: −2}
    with x = [1, 1], base [10, 20]: + 0.5 [1·3, 0] − 2 [0, 3·1] + 0.5 (c_0 − 1)(base − b) =
    [1.5 + 4.5, −6]; rows without a set are unchanged."""
    a = torch.zeros(3, 8, 2)
    b = torch.zeros(3, 2, 8)
    a[0, 0], b[0, :, 0] = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    a[1, 0], b[1, :, 0] = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])
    c = torch.tensor([[2.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    stack = mixed_kernels.LoraStack({"p": 0, "q": 1}, a, b, c)
    sets = [[("p", 0.5), ("q", -2.0)] if r in rows_set else None for r in range(3)]
    ss = mixed_kernels.set_slots(stack.slots, sets, torch.device("cpu"), torch.float32)
    assert ss is not None and (ss.rows is None) == (len(rows_set) == 2)
    x = torch.tensor([[[1.0, 1.0]], [[5.0, 7.0]], [[1.0, 1.0]]])
    base = torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]], [[10.0, 20.0]]])
    out = base.clone()
    mixed_kernels.add_lora_sets_(out, x, base, torch.ones(2), stack, ss)
    want = base.clone()
    for r in rows_set:
        want[r, 0] += torch.tensor([6.0, -6.0])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_ranks_bucketed_and_stacks_hold_factor_bytes() -> None:
    setups = {
        "r2": ("lora", {"r": 2, "target_modules": ["q_proj"]}),
        "r8": ("lora", {"r": 8, "target_modules": ["q_proj"]}),
        "r9": ("lora", {"r": 9, "target_modules": ["q_proj"]}),
    }
    am = model_with("llama", setups)
    check_rows(am, ["r2", "r9", "r8", "__base__"])
    layer = next(layer for _, layer in am.adapted_layers())
    stacks = mixed_kernels.layer_kernels(layer).lora
    assert [tuple(s.slots) for s in stacks] == [("r2", "r8"), ("r9",)]
    assert [s.a.shape[1] for s in stacks] == [8, 16]
    assert (rank_bucket(1), rank_bucket(8), rank_bucket(9), rank_bucket(64)) == (8, 8, 16, 64)
    # the factors of r2 sit in the first 2 ranks, the rest is zero padding; slot 2 is zero
    a2 = layer.adapters["r2"].lora_A.weight
    assert torch.equal(stacks[0].a[0, :2], a2)
    assert stacks[0].a[0, 2:].abs().max() == 0 and stacks[0].a[2].abs().max() == 0


@pytest.mark.parametrize("what", ["lora_B", "magnitude", "base_weight", "ia3", "vera"])
def test_cache_follows_in_place_changes(what: str) -> None:
    """Changing an adapter (or the base weight) in place after a mixed forward: the next
    mixed forward uses the new values (rows equal alone again)."""
    setups = {
        "lora": ("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
        "dora": ("lora", {"r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
        "ia3": ("ia3", {"target_modules": ["q_proj", "v_proj"], "feedforward_modules": []}),
        "vera": ("vera", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    }
    am = model_with("llama", setups)
    names = ["dora", "lora", "ia3", "vera", "__base__"]
    before = check_rows(am, names)[0]
    layer = next(layer for path, layer in am.adapted_layers() if path.endswith("v_proj"))
    with torch.no_grad():
        if what == "lora_B":
            layer.adapters["lora"].lora_B.weight.mul_(3)
        elif what == "magnitude":
            layer.adapters["dora"].lora_magnitude_vector.mul_(1.5)
        elif what == "base_weight":
            layer.base_layer.weight.add_(0.3)
        elif what == "ia3":
            layer.adapters["ia3"].ia3_l.mul_(2)
        else:
            layer.adapters["vera"].vera_lambda_b.mul_(3)
    after = check_rows(am, names)[0]
    assert (after - before).abs().max() > 1e-4


def test_single_adapter_fast_path_runs_the_plain_forward(monkeypatch) -> None:
    """All rows one (LoRA) adapter: no stacks are built, no rows gathered. All rows one DoRA
    adapter: the kernel with its cached scale (equal to the plain forward)."""
    setups = {
        "a": ("lora", {"r": 4, "target_modules": ["q_proj"]}),
        "d": ("lora", {"r": 4, "use_dora": True, "target_modules": ["q_proj"]}),
    }
    am = model_with("llama", setups)
    mixed_kernels.clear_cache()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("rows gathered"))
        with torch.no_grad():
            out = am(**inputs(batch=3), adapter_names=["a"] * 3).logits
    assert not any(layer in mixed_kernels._CACHE for _, layer in am.adapted_layers())
    with torch.no_grad():
        dora = am(**inputs(batch=3), adapter_names=["d"] * 3).logits
    assert all(layer in mixed_kernels._CACHE for _, layer in am.adapted_layers())
    for name, got in (("a", out), ("d", dora)):
        am.set_active(name)
        with torch.no_grad():
            want = am(**inputs(batch=3)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (out - dora).abs().max() > 1e-3


def test_gradients_flow_through_a_mixed_batch() -> None:
    """With gradients on (the newest adapter is trainable), the per-segment path runs: the
    gradient of a row's output equals the gradient of that row run alone."""
    lora = ("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    am = model_with("llama", {"a": lora, "b": lora})
    batch = inputs(batch=3)
    am(**batch, adapter_names=["b", "__base__", "a"]).logits[0].sum().backward()
    params = am.adapter_parameters("b")
    mixed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    am.set_active("b")
    am(**{k: v[:1] for k, v in batch.items()}).logits[0].sum().backward()
    assert max(g.abs().max() for g in mixed) > 1e-3
    for got, p in zip(mixed, params, strict=True):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=0)


def test_loha_runs_as_a_lora_of_rank_r_squared(monkeypatch) -> None:
    """LoHa (linear base) joins the LoRA stacks in its exact LoRA form ΔW = s U V (rank r²):
    rows equal alone, no per-segment forward, and the stacked factors multiply to the dense
    ΔW the adapter itself computes."""
    setups = {
        "h1": ("loha", {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}),
        "h2": ("loha", {"r": 3, "alpha": 2, "target_modules": ["q_proj", "v_proj"]}),
        "l": ("lora", {"r": 4, "target_modules": ["q_proj"]}),
    }
    am = model_with("llama", setups)
    names = ["h2", "__base__", "h1", "l", "h1"]
    with monkeypatch.context() as m:
        m.setattr(AdaptedLayer, "forward_alone", lambda *a, **k: pytest.fail("per segment"))
        with torch.no_grad():
            am(**inputs(seed=1, batch=len(names)), adapter_names=names)
    check_rows(am, names)
    check_rows(am, ["h2"] * 3)  # one adapter on every row: the kernel's flat path
    layer = next(layer for path, layer in am.adapted_layers() if path.endswith("q_proj"))
    kernels = mixed_kernels.layer_kernels(layer)
    assert kernels.kinds == {"h1": "loha", "h2": "loha", "l": "lora"}
    stack = next(s for s in kernels.lora if "h2" in s.slots)
    slot = stack.slots["h2"]
    dense = layer.adapters["h2"].raw_delta()
    torch.testing.assert_close(stack.b[slot] @ stack.a[slot], dense, atol=1e-6, rtol=0)
    assert stack.a.shape[1] == rank_bucket(9)


def test_loha_too_large_for_its_lora_form_runs_per_segment() -> None:
    """r² (in + out) ≥ in · out: the LoRA form would cost more than the dense ΔW, so the
    adapter runs per segment (and its rows are still right)."""
    am = model_with("llama", {"big": ("loha", {"r": 16, "target_modules": ["q_proj"]})})
    layer = next(layer for _, layer in am.adapted_layers())
    assert mixed_kernels.kernel_kind(layer.adapters["big"], layer.base_layer) is None
    check_rows(am, ["big", "__base__"])


def test_cache_checks_the_batch_adapters_and_the_layer_structure() -> None:
    """An adapter changed while outside the batch is found when a batch names it; an adapter
    deleted and re-added under the same name (new modules) rebuilds the stacks."""
    lora = ("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    am = model_with("llama", {"a": lora, "b": lora, "c": lora})
    check_rows(am, ["a", "b", "__base__"])
    with torch.no_grad():
        for p in am.adapter_parameters("c"):
            p.mul_(2)
    check_rows(am, ["a", "b"])  # c not read: its slot may be stale
    check_rows(am, ["c", "a"])  # now it is read: rebuilt
    am.delete_adapter("b")
    am.add_adapter("b", make_config(*lora))
    randomize(am.adapter_parameters("b"), seed=99, scale=0.2)
    check_rows(am, ["b", "a", "c"])


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mixed_batch_under_autocast(kind: str, monkeypatch) -> None:
    """Under CPU bfloat16 autocast (the bench's precision on CPUs with bf16 matmuls), rows of
    every adapter type and weighted sets of additive ones run (autocast used to turn the
    kernels' ``bmm`` bfloat16 before an in-place float32 ``baddbmm_``: a dtype error) and
    each row stays within bfloat16 rounding of the same row in float32 (no autocast): the
    kernels compute the adapters in their float32 stacks."""
    from test_mixed_batch import configs, outputs

    setups = configs(kind)
    am = model_with(kind, setups)
    rng = random.Random(2)
    names = list(setups)
    additive = [n for n in names if n.startswith(("lora", "dora", "vera", "loha", "lokr"))]
    entries: list = [rng.choice([*names, "__base__"]) for _ in range(6)]
    entries += [{n: rng.uniform(-1, 1) for n in rng.sample(additive, 2)} for _ in range(3)]
    batch = inputs(seed=0, batch=len(entries))
    with torch.no_grad():
        want = outputs(am, batch, adapter_names=entries)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = outputs(am, batch, adapter_names=entries)[1]
    scale = float(want.abs().max())
    err = float((got.float() - want).abs().max())
    assert 0 < err <= 0.05 * scale, (err, scale)  # bf16 rounding, not an exact f32 rerun
