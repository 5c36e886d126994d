"""Mixed-adapter batches (`splice.adapters.mixed_batch`): each row of one forward runs its own
adapter, "__base__" or a weighted set; rows equal the row run alone with that adapter active,
weighted sets equal the base with the weighted sum of the deltas folded in."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny import FACTORIES, inputs, randomize

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    AdapterStateError,
    make_config,
)

# module names per tiny model: attention projections, a feed-forward layer, a layer norm,
# the token embedding, the head
NAMES = {
    "llama": (["q_proj", "v_proj"], ["down_proj"], ["input_layernorm"], "embed_tokens", "lm_head"),
    "gpt2": (["c_attn"], ["c_fc"], ["ln_1"], "wte", "lm_head"),
    "bert": (["query", "value"], ["intermediate.dense"], ["attention.output.LayerNorm"],
             "word_embeddings", "classifier"),
}  # fmt: skip


def configs(kind: str) -> dict[str, tuple[str, dict]]:
    """Two-adapter setups per type: label -> (method, params)."""
    attn, ff, ln, embed, head = NAMES[kind]
    return {
        "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": attn + ff}),
        "lora_rslora_pattern": (
            "lora",
            {"r": 4, "use_rslora": True, "rank_pattern": {attn[0]: 2}, "target_modules": attn},
        ),
        "lora_embedding": ("lora", {"r": 3, "target_modules": [embed, *attn]}),
        "dora": ("lora", {"r": 2, "use_dora": True, "target_modules": attn + ff}),
        "ia3": ("ia3", {"target_modules": attn + ff, "feedforward_modules": ff}),
        "vera": ("vera", {"r": 4, "target_modules": attn}),
        "loha": ("loha", {"r": 2, "alpha": 4, "target_modules": attn + ff}),
        "lokr": ("lokr", {"r": 2, "alpha": 4, "target_modules": attn + ff}),
        "oft": ("oft", {"r": 4, "oft_block_size": 0, "target_modules": attn[:1] + ff}),
        "hra": ("hra", {"r": 2, "target_modules": attn[:1] + ff}),
        "bitfit": ("bitfit", {"add_missing_bias": True, "target_modules": attn}),
        "ln_tuning": ("ln_tuning", {"target_modules": ln}),
        "modules_to_save": ("lora", {"r": 2, "target_modules": attn, "modules_to_save": [head]}),
        "bottleneck": ("bottleneck", {"bottleneck_size": 4, "target_modules": ff}),
    }


NOT_ON = {"gpt2": {"loha", "lokr"}}  # LoHa / LoKr have no GPT-2 Conv1D layer (as PEFT)


def cases() -> list[tuple[str, str]]:
    return [(k, lab) for lab in configs("llama") for k in NAMES if lab not in NOT_ON.get(k, ())]


def model_with(kind: str, setups: dict[str, tuple[str, dict]], seed: int = 0) -> AdapterModel:
    am = AdapterModel(FACTORIES[kind](seed)).eval()
    for i, (name, (method, params)) in enumerate(setups.items()):
        am.add_adapter(name, make_config(method, params))
        randomize(am.adapter_parameters(name), seed=11 + i, scale=0.2)
    return am


def outputs(am: AdapterModel, batch: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state): BERT's logits see the first token only, weakly."""
    out = am(**batch, output_hidden_states=True, **kw)
    return out.logits, out.hidden_states[-1]


@torch.no_grad()
def row_alone(am: AdapterModel, batch: dict, row: int, name: str) -> tuple[torch.Tensor, ...]:
    one = {k: v[row : row + 1] for k, v in batch.items()}
    if name == "__base__":
        with am.disabled():
            return outputs(am, one)
    am.set_active(name)
    return outputs(am, one)


def check_rows(am: AdapterModel, names: list, seed: int = 1) -> tuple[torch.Tensor, ...]:
    batch = inputs(seed=seed, batch=len(names))
    with torch.no_grad():
        mixed = outputs(am, batch, adapter_names=names)
    for row, name in enumerate(names):
        for got, want in zip(mixed, row_alone(am, batch, row, name), strict=True):
            torch.testing.assert_close(got[row : row + 1], want, atol=1e-5, rtol=0)
    return mixed


def check_random_assignments(
    am: AdapterModel, names: list[str], seed: int, trials: int, mp
) -> None:
    """Property check: ``trials`` batches of 2..9 rows, each row a random adapter of ``names``
    or the base (never all one name); every row equals the row alone, and no adapter runs on
    the per-segment path (``AdaptedLayer.forward_alone`` patched to fail through ``mp``, a
    pytest ``monkeypatch``)."""
    from splice.adapters.layer import AdaptedLayer

    def no_segment_path(*_a, **_k):
        raise AssertionError("a kernel adapter ran per segment")

    rng = random.Random(seed)
    for trial in range(trials):
        row_names = [rng.choice([*names, "__base__"]) for _ in range(rng.randint(2, 9))]
        if len(set(row_names)) == 1:
            row_names.append("__base__")
        with mp.context() as m:
            m.setattr(AdaptedLayer, "forward_alone", no_segment_path)
            with torch.no_grad():
                am(**inputs(seed=trial, batch=len(row_names)), adapter_names=row_names)
        check_rows(am, row_names, seed=trial)


@pytest.mark.parametrize(("kind", "label"), cases())
def test_rows_equal_each_row_alone(kind: str, label: str) -> None:
    setup = configs(kind)[label]
    am = model_with(kind, {"a": setup, "b": setup})
    _, hidden = check_rows(am, ["a", "__base__", "b", "a", "b"])
    # the adapters matter: the rows of each adapter differ from the base row (same input)
    base_hidden = row_alone(am, inputs(seed=1, batch=5), 0, "__base__")[1]
    assert (hidden[0:1] - base_hidden).abs().max() > 1e-3
    assert all(layer.mixed_plan is None for _, layer in am.adapted_layers())


MIXED_TYPES = ["lora", "dora", "ia3", "vera", "loha", "lokr", "oft", "hra", "bitfit",
               "ln_tuning", "bottleneck", "lora_rslora_pattern"]  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_random_assignments_of_mixed_types(kind: str) -> None:
    """Property: for random assignments of adapters of different types (and the base) to
    rows, every row equals that row run alone with its adapter."""
    setups = configs(kind)
    labels = [label for label in MIXED_TYPES if label not in NOT_ON.get(kind, ())]
    am = model_with(kind, {label: setups[label] for label in labels})
    rng = random.Random(0)
    for trial in range(4):
        rows = rng.randint(1, 7)
        names = [rng.choice([*labels, "__base__"]) for _ in range(rows)]
        check_rows(am, names, seed=trial + 2)


WEIGHT_SPACE = ["lora", "dora", "ia3", "vera", "loha", "lokr", "oft", "hra", "bitfit", "ln_tuning"]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_weighted_set_is_the_weighted_sum_of_deltas(kind: str) -> None:
    """A row {a_i: w_i} equals the base model with W + Σ w_i ΔW_i, for adapters of several
    types in one set; a list of names means weights 1."""
    setups = configs(kind)
    am = model_with(kind, {label: setups[label] for label in WEIGHT_SPACE})
    rng = random.Random(1)
    sets = [
        {label: rng.uniform(-1.5, 1.5) for label in rng.sample(WEIGHT_SPACE, 4)} for _ in range(2)
    ]
    sets.append(dict.fromkeys(["lora", "oft", "dora"], 1.0))
    entries = [sets[0], "lora", sets[1], ["lora", "oft", "dora"]]
    batch = inputs(seed=3, batch=len(entries))
    with torch.no_grad():
        mixed = am(**batch, adapter_names=entries).logits
    for row, weights in [(0, sets[0]), (2, sets[1]), (3, sets[2])]:
        merged = copy.deepcopy(am)  # its base weights + Σ w_i ΔW_i, run with adapters off
        with torch.no_grad():
            for name, w in weights.items():
                for key, d in am.deltas(name).items():
                    path, pname = key.rsplit(".", 1)
                    param = getattr(merged.model.get_submodule(path).base_layer, pname)
                    param += w * d
            with merged.disabled():
                want = merged(**{k: v[row : row + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(mixed[row : row + 1], want, atol=1e-5, rtol=0)
        assert (mixed[row] - mixed[1]).abs().max() > 1e-4
    want = row_alone(am, batch, 1, "lora")[0]
    torch.testing.assert_close(mixed[1:2], want, atol=1e-5, rtol=0)


# adapters whose weighted sets run in the batched kernels (`ADDITIVE_KINDS`) and others
PAIRED = ["lora", "lora_rslora_pattern", "dora", "loha", "vera", "lokr", "ia3_out"]
UNPAIRED = ["oft", "hra", "ia3", "bitfit", "bottleneck"]


@torch.no_grad()
def set_alone(am: AdapterModel, batch: dict, row: int, entry, mp) -> torch.Tensor:
    """The row alone with its entry, every adapter on the per-segment path (the kernels
    off): f(x) + Σ w_i (f_{a_i}(x) − f(x)) at each layer, from each adapter's own forward."""
    from splice.adapters.mixed_batch import MixedBatchPlan

    one = {k: v[row : row + 1] for k, v in batch.items()}
    with mp.context() as m:
        m.setattr(MixedBatchPlan, "kernels", lambda self, layer: None)
        return outputs(am, one, adapter_names=[entry])[1]


def check_entries(am: AdapterModel, batch: dict, hidden: torch.Tensor, entries: list, mp,
                  atol: float) -> None:  # fmt: skip
    """Each row of a mixed forward's ``hidden`` equals that row alone with its entry: a name
    with that adapter active (`row_alone`), a weighted set per segment (`set_alone`)."""
    for row, entry in enumerate(entries):
        if isinstance(entry, str):
            want = row_alone(am, batch, row, entry)[1]
        else:
            want = set_alone(am, batch, row, entry, mp)
        torch.testing.assert_close(hidden[row : row + 1], want, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_random_weighted_sets_run_in_the_kernels(kind: str, monkeypatch) -> None:
    """Property: random per-row weighted sets (1–4 adapters, weights in [−1.5, 1.5] with some
    exactly 0) of additive kernel kinds, mixed with single-adapter rows of every kind, base
    rows and sets holding a non-kernel adapter: every row equals the row alone with its
    entry, and no additive kernel adapter runs on the per-segment path unless its set holds
    a non-kernel adapter."""
    from splice.adapters.layer import AdaptedLayer
    from splice.adapters.mixed_batch import ADDITIVE_KINDS
    from splice.adapters.mixed_kernels import kernel_kind

    setups = configs(kind)
    setups["ia3_out"] = ("ia3", {"target_modules": NAMES[kind][0], "feedforward_modules": []})
    paired = [label for label in PAIRED if label not in NOT_ON.get(kind, ())]
    am = model_with(kind, {label: setups[label] for label in paired + UNPAIRED})
    original = AdaptedLayer.forward_alone

    def checked(layer, adapter, *args):
        if kernel_kind(adapter, layer.base_layer) in ADDITIVE_KINDS:
            raise AssertionError("an additive kernel adapter ran per segment")
        return original(layer, adapter, *args)

    rng = random.Random(7)
    for trial in range(5):
        entries: list = []
        for _ in range(rng.randint(3, 8)):
            u = rng.random()
            if u < 0.5:
                names = rng.sample(paired, rng.randint(1, 4))
                entries.append({n: rng.choice([0.0, rng.uniform(-1.5, 1.5)]) for n in names})
            elif u < 0.8:
                entries.append(rng.choice([*paired, *UNPAIRED]))
            else:
                entries.append("__base__")
        entries.append({paired[0]: 0.7, paired[-1]: -0.4})  # at least one set in the kernels
        batch = inputs(seed=trial, batch=len(entries))
        with monkeypatch.context() as m, torch.no_grad():
            m.setattr(AdaptedLayer, "forward_alone", checked)
            hidden = outputs(am, batch, adapter_names=entries)[1]
        # sets with a non-kernel adapter still run (per segment), with the same values
        entries_mixed = [*entries, {rng.choice(UNPAIRED): 0.5, paired[0]: -1.0}]
        batch_mixed = inputs(seed=trial, batch=len(entries_mixed))
        with torch.no_grad():
            hidden_mixed = outputs(am, batch_mixed, adapter_names=entries_mixed)[1]
        torch.testing.assert_close(hidden_mixed[:-1], hidden, atol=1e-5, rtol=0)
        check_entries(am, batch_mixed, hidden_mixed, entries_mixed, monkeypatch, atol=1e-5)
    # the sets matter: a set's row differs from the base row
    base_row = row_alone(am, batch_mixed, len(entries) - 1, "__base__")[1]
    assert (hidden_mixed[len(entries) - 1] - base_row).abs().max() > 1e-3


def test_bottleneck_weighted_set_sums_residuals() -> None:
    """Bottleneck adapters (no weight delta): h + Σ w_i r_i(h) at each adapted layer."""
    setup = configs("llama")["bottleneck"]
    am = model_with("llama", {"a": setup, "b": setup})
    _, layer = next(iter(am.adapted_layers()))
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        am(**inputs(seed=4, batch=2), adapter_names=[{"a": 0.3, "b": -2.0}, "__base__"])
        x = seen["x"]
        h = layer.base_layer(x)
        r = {n: layer.adapters[n].transform_output(x, h, layer.base_layer) - h for n in "ab"}
    assert r["a"].abs().max() > 1e-3
    want = h[:1] + 0.3 * r["a"][:1] - 2.0 * r["b"][:1]
    torch.testing.assert_close(seen["y"][:1], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["y"][1:], h[1:], atol=0, rtol=0)


def test_peft_parity_lora_adapter_names(tmp_path) -> None:
    """PEFT's own adapter_names forward on two LoRA adapters equals splice's."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from splice.adapters import load_adapter

    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    pm = get_peft_model(FACTORIES["llama"](0), PeftLoraConfig(**cfg), adapter_name="one")
    pm.add_adapter("two", PeftLoraConfig(**{**cfg, "r": 2}))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n], seed=5, scale=0.2)
    pm.eval()
    pm.save_pretrained(tmp_path)
    names = ["two", "one", "__base__", "one", "two"]
    batch = inputs(seed=6, batch=len(names))
    with torch.no_grad():
        want = pm(**batch, adapter_names=names).logits
    am = AdapterModel(FACTORIES["llama"](0)).eval()
    load_adapter(am, tmp_path / "one", "one")
    load_adapter(am, tmp_path / "two", "two")
    with torch.no_grad():
        got = am(**batch, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-4


# -- errors, all before any compute -------------------------------------------------------


@pytest.fixture
def two_loras() -> AdapterModel:
    lora = configs("llama")["lora"]
    am = model_with("llama", {"sst": lora, "style": lora})

    def no_compute(*_):
        raise AssertionError("the model ran")

    am.model.register_forward_pre_hook(no_compute)
    return am


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["sst", "stlye"], r"row 1: no adapter named 'stlye' \(did you mean 'style'\?\)"),
        (["sst"], "1 entries for a batch of 2 rows"),
        ("sst", "one entry per row"),
        (["sst", {}], "row 1: an empty adapter set"),
        (["sst", ["sst", "sst"]], "row 1: adapter 'sst' named twice"),
        (["sst", {"sst": float("nan")}], "row 1: weight of 'sst' must be a finite number"),
        (["sst", {"__base__": 1.0}], "row 1: '__base__' in a weighted set"),
        (["sst", 3], "row 1: expected an adapter name"),
    ],
)
def test_bad_adapter_names_fail_before_compute(two_loras, names, message) -> None:
    with pytest.raises(AdapterStateError, match=message):
        two_loras(**inputs(batch=2), adapter_names=names)
    assert all(layer.mixed_plan is None for _, layer in two_loras.adapted_layers())


def test_folded_and_disabled_are_refused(two_loras) -> None:
    two_loras.fold("sst")
    with pytest.raises(AdapterStateError, match="row 0: adapter 'sst' is folded into"):
        two_loras(**inputs(batch=2), adapter_names=["sst", "style"])
    two_loras.unfold()
    with two_loras.disabled(), pytest.raises(AdapterStateError, match="inside disabled"):
        two_loras(**inputs(batch=2), adapter_names=["sst", "style"])


@pytest.mark.parametrize(
    ("method", "entry"),
    [
        ("prompt_tuning", ["a", "p"]),
        ("prompt_tuning", {"p": 0.5}),  # alone, but weighted
        ("prefix_tuning", {"a": 0.5, "p": 0.5}),
    ],
)
def test_model_level_adapter_in_a_weighted_set_refused(method: str, entry) -> None:
    """Prompt / prefix tuning rows stand alone with weight 1 (tests/adapters/
    test_mixed_prompts.py); in a weighted set: one clear error naming the row and the
    adapter, before any compute."""
    am = model_with("llama", {"a": configs("llama")["lora"]})
    am.add_adapter("p", make_config(method, {"num_virtual_tokens": 3}))
    am.model.register_forward_pre_hook(lambda *_: pytest.fail("the model ran"))
    with pytest.raises(
        AdapterStateError,
        match=rf"row 1: adapter 'p' \({method}\) is a model-level adapter .* not in a weighted set",
    ):
        am(**inputs(batch=2), adapter_names=["a", entry])


def test_base_name_is_reserved() -> None:
    am = AdapterModel(FACTORIES["llama"](0))
    with pytest.raises(AdapterConfigError, match="__base__"):
        am.add_adapter("__base__", make_config("lora", {"target_modules": ["q_proj"]}))


def test_plan_cleared_after_a_failing_forward(two_loras) -> None:
    """A forward that fails mid-way leaves no plan behind (the next forward is normal)."""
    with pytest.raises(AssertionError, match="the model ran"):
        two_loras(**inputs(batch=2), adapter_names=["sst", "style"])
    assert all(layer.mixed_plan is None for _, layer in two_loras.adapted_layers())
