"""End to end: the same mergekit YAML through mergekit 0.1.5 and through splice.

Tiny Llama-shaped Hugging Face folders (safetensors + a LlamaForCausalLM config.json, so
mergekit recognizes the architecture) are written once per module: a base and three
fine-tunes, in float32 and in bfloat16. Each case writes one recipe file, runs mergekit's
own ``run_merge`` (what ``mergekit-yaml`` calls) and splice's engine on that file, then
compares every output tensor: the same names, shapes and dtypes, values to atol 1e-6, and
the config.json layer count (which slices change).

float32 fine-tunes differ from the base by continuous noise, so no two magnitudes are
equal; the bfloat16 ones differ by a few units in the last place, so many magnitudes are
equal at the keep boundary and mergekit's tie order (its CPU sort) has to be matched too.
With ``dtype: bfloat16`` / ``float16`` (and without ``dtype``, where mergekit computes in the
inputs' dtype) every case is compared bit for bit (torch.equal): mergekit's arithmetic in
that dtype decides roundings and TIES sign elections. Random methods (dare_*) draw from
different generators and are not compared here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge as mergekit_run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file

from splice.engine import plan_merge, run_merge
from splice.recipe.schema import load_recipe

HIDDEN, INTER, LAYERS, VOCAB, HEADS = 16, 32, 3, 32, 2
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
MODELS = ("base", "ft0", "ft1", "ft2")


def llama_tensors(
    gen: torch.Generator, dims: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    d = {**CONFIG, **(dims or {})}
    h, f, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen) * 0.02}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = torch.randn(h, h, generator=gen) / h**0.5
        out[p + "mlp.gate_proj.weight"] = torch.randn(f, h, generator=gen) / h**0.5
        out[p + "mlp.up_proj.weight"] = torch.randn(f, h, generator=gen) / h**0.5
        out[p + "mlp.down_proj.weight"] = torch.randn(h, f, generator=gen) / f**0.5
        out[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        out[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    out["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
    out["lm_head.weight"] = torch.randn(v, h, generator=gen) * 0.02
    return out


def write_models(
    root: Path, dtype: torch.dtype, dims: dict[str, int] | None = None, spread: float = 0.01
) -> dict[str, Path]:
    """Base and fine-tunes (base + noise of ``spread`` times each tensor's std)."""
    gen = torch.Generator().manual_seed(1234)
    base = llama_tensors(gen, dims)
    paths = {}
    for name in MODELS:
        if name == "base":
            tensors = base
        else:
            # every entry changes, by different amounts per model
            tensors = {
                n: w + torch.randn(w.shape, generator=gen) * spread * w.std()
                for n, w in base.items()
            }
        d = root / name
        d.mkdir()
        save_file(
            {n: t.to(dtype).contiguous() for n, t in tensors.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        cfg = {**CONFIG, **(dims or {}), "torch_dtype": str(dtype).removeprefix("torch.")}
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        paths[name] = d
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 models: the deltas are continuous noise, so magnitudes have no ties."""
    return write_models(tmp_path_factory.mktemp("models"), torch.float32)


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bfloat16 models: deltas are a few units in the last place, so many |δ| are equal and
    the trim's tie rule matters (as with real bf16 fine-tunes)."""
    return write_models(tmp_path_factory.mktemp("bf16_models"), torch.bfloat16)


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_both(
    recipe: dict, tmp_path: Path, mergekit_threads: int | None = None
) -> tuple[Path, Path]:
    """Both tools on one recipe file; ``mergekit_threads``: torch's intra-op threads for
    mergekit's run (its ``--num-threads``), else the process's."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mk_out, sp_out = tmp_path / "mergekit", tmp_path / "splice"
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(mergekit_threads or old_threads)
    try:
        mergekit_run_merge(
            config,
            str(mk_out),
            options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False),
            config_source=path.read_text(),
        )
    finally:
        torch.set_num_threads(old_threads)
    parsed, text = load_recipe(path)
    plan = plan_merge(parsed)
    try:
        run_merge(plan, sp_out, shard_bytes=10_000_000, threads=2, progress=False, recipe_text=text)
    finally:
        plan.close()
    return mk_out, sp_out


def assert_same(mk_out: Path, sp_out: Path, atol: float = 1e-6, exact: bool = False) -> None:
    mk, sp = load_dir(mk_out), load_dir(sp_out)
    assert sorted(sp) == sorted(mk), (
        f"only mergekit: {sorted(set(mk) - set(sp))}, only splice: {sorted(set(sp) - set(mk))}"
    )
    bad = []
    for name in sorted(mk):
        a, b = mk[name], sp[name]
        assert b.shape == a.shape, f"{name}: shape {list(b.shape)} vs mergekit {list(a.shape)}"
        assert b.dtype == a.dtype, f"{name}: dtype {b.dtype} vs mergekit {a.dtype}"
        if exact:
            if not torch.equal(a, b):
                n = (a != b).sum().item()
                bad.append(f"{name}: {n} of {a.numel()} entries differ")
            continue
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        if not diff <= atol:
            bad.append(f"{name}: max |diff| {diff:.3g}")
    assert not bad, "tensors differ from mergekit:\n" + "\n".join(bad)
    mk_cfg = json.loads((mk_out / "config.json").read_text())
    sp_cfg = json.loads((sp_out / "config.json").read_text())
    assert sp_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


def models_recipe(
    m: dict[str, Path],
    method: str,
    per_model: list[dict] | None,
    params: dict | None = None,
    base: bool = True,
    n: int = 3,
    dtype: str | None = "float32",
) -> dict:
    recipe: dict = {"merge_method": method}
    if base:
        recipe["base_model"] = str(m["base"])
    entries = []
    for i in range(n):
        e: dict = {"model": str(m[f"ft{i}"])}
        if per_model is not None:
            e["parameters"] = per_model[i]
        entries.append(e)
    recipe["models"] = entries
    if params:
        recipe["parameters"] = params
    if dtype:
        recipe["dtype"] = dtype
    return recipe


W3 = [{"weight": 1.0}, {"weight": 0.8}, {"weight": 0.6}]
TIES3 = [
    {"weight": 1.0, "density": 0.2},
    {"weight": 0.8, "density": 0.3},
    {"weight": 0.6, "density": 0.5},
]

BREADCRUMBS3 = [
    {"weight": 1.0, "density": 0.5, "gamma": 0.05},
    {"weight": 0.8, "density": 0.7, "gamma": 0.1},
    {"weight": 0.6, "density": 0.9, "gamma": 0.01},
]

CASES = {
    "linear": lambda m: models_recipe(m, "linear", W3, base=False),
    "linear_no_normalize": lambda m: models_recipe(
        m, "linear", W3, {"normalize": False}, base=False
    ),
    "task_arithmetic": lambda m: models_recipe(m, "task_arithmetic", W3),
    "task_arithmetic_bf16_out": lambda m: {
        **models_recipe(m, "task_arithmetic", W3),
        "out_dtype": "bfloat16",
    },
    "linear_bf16_out": lambda m: {
        **models_recipe(m, "linear", W3, base=False),
        "out_dtype": "bfloat16",
    },
    "task_arithmetic_lambda": lambda m: models_recipe(
        m, "task_arithmetic", W3, {"normalize": True, "lambda": 0.7}
    ),
    "ties": lambda m: models_recipe(m, "ties", TIES3, {"normalize": True}),
    "ties_bf16_out": lambda m: {
        **models_recipe(m, "ties", TIES3, {"normalize": True}),
        "out_dtype": "bfloat16",
    },
    "ties_rescale": lambda m: models_recipe(
        m, "ties", TIES3, {"normalize": False, "rescale": True}
    ),
    "breadcrumbs": lambda m: models_recipe(m, "breadcrumbs", BREADCRUMBS3),
    "breadcrumbs_rescale": lambda m: models_recipe(
        m, "breadcrumbs", BREADCRUMBS3, {"rescale": True}
    ),
    "breadcrumbs_ties": lambda m: models_recipe(
        m,
        "breadcrumbs_ties",
        BREADCRUMBS3,
        {"normalize": True},
    ),
    "slerp": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m["base"]),
        "models": [{"model": str(m["base"])}, {"model": str(m["ft0"])}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    },
    "slerp_gradient_filter": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m["base"]),
        "models": [{"model": str(m["base"])}, {"model": str(m["ft0"])}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float32",
    },
    "model_stock": lambda m: models_recipe(m, "model_stock", None),
    "karcher": lambda m: models_recipe(m, "karcher", None, base=False),
    "multislerp": lambda m: models_recipe(m, "multislerp", W3, base=False),
    "model_stock_filter_wise": lambda m: models_recipe(
        m, "model_stock", None, {"filter_wise": True}
    ),
    "ties_gradient_filter": lambda m: models_recipe(
        m,
        "ties",
        [
            {"weight": 1.0, "density": [0.1, 0.9]},
            {
                "weight": [0.2, 0.8],
                "density": [{"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.4, 0.6]}],
            },
            {"weight": 0.6, "density": 0.5},
        ],
        {"normalize": True, "lambda": [{"filter": "self_attn", "value": 0.9}, {"value": 1.1}]},
    ),
    "task_arithmetic_gradient_filter": lambda m: models_recipe(
        m,
        "task_arithmetic",
        [
            {"weight": [0.1, 0.9]},
            {"weight": [{"filter": "layernorm", "value": 0.0}, {"value": [1.0, 0.5, 0.0]}]},
            {"weight": 0.6},
        ],
    ),
    "passthrough_slices": lambda m: {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(m["ft0"]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(m["ft1"]), "layer_range": [1, 3]}]},
        ],
    },
    "passthrough_slices_scale": lambda m: {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(m["ft0"]), "layer_range": [0, 3]}]},
            {
                "sources": [
                    {
                        "model": str(m["ft1"]),
                        "layer_range": [2, 3],
                        "parameters": {
                            "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]
                        },
                    }
                ]
            },
        ],
    },
    "slerp_slices": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m["ft0"]),
        "dtype": "float32",
        "parameters": {"t": [0.0, 0.5, 1.0]},
        "slices": [
            {
                "sources": [
                    {"model": str(m["ft0"]), "layer_range": [0, 3]},
                    {"model": str(m["ft1"]), "layer_range": [0, 3]},
                ]
            }
        ],
    },
    "ties_slices": lambda m: {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "dtype": "float32",
        "parameters": {"density": [0.2, 0.8], "weight": 0.5, "normalize": True},
        "slices": [
            {
                "sources": [
                    {"model": str(m["base"]), "layer_range": [0, 2]},
                    {"model": str(m["ft0"]), "layer_range": [0, 2]},
                    {"model": str(m["ft1"]), "layer_range": [0, 2]},
                ]
            },
            {
                "sources": [
                    {"model": str(m["base"]), "layer_range": [1, 3]},
                    {"model": str(m["ft1"]), "layer_range": [1, 3]},
                    {"model": str(m["ft2"]), "layer_range": [1, 3]},
                ]
            },
        ],
    },
}


# Each case's output layer count (slices change it).
LAYERS_OUT = {"passthrough_slices": 4, "passthrough_slices_scale": 4, "ties_slices": 4}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    mk_out, sp_out = run_both(CASES[case](models), tmp_path)
    assert_same(mk_out, sp_out)
    cfg = json.loads((sp_out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == LAYERS_OUT.get(case, LAYERS)


BF16_CASES = [
    "ties",
    "ties_bf16_out",
    "breadcrumbs",
    "breadcrumbs_ties",
    "task_arithmetic",
    "task_arithmetic_bf16_out",
    "linear_bf16_out",
    "model_stock",
]


@pytest.mark.parametrize("case", BF16_CASES)
def test_same_tensors_as_mergekit_bf16_inputs(
    case: str, bf16_models: dict[str, Path], tmp_path: Path
) -> None:
    mk_out, sp_out = run_both(CASES[case](bf16_models), tmp_path)
    assert_same(mk_out, sp_out)


# Random methods (dare_*) aside, every case: with ``dtype: bfloat16`` / ``float16`` mergekit
# does its arithmetic in that dtype (linear and slerp upcast to float32 inside), and the
# mergekit dialect must give the same bits.
LOW_PRECISION = ("bfloat16", "float16")


def with_dtype(recipe: dict, dtype: str) -> dict:
    return {**recipe, "dtype": dtype}


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bits_as_mergekit_in_low_precision(
    case: str, dtype: str, bf16_models: dict[str, Path], tmp_path: Path
) -> None:
    mk_out, sp_out = run_both(with_dtype(CASES[case](bf16_models), dtype), tmp_path)
    assert_same(mk_out, sp_out, exact=True)


@pytest.mark.parametrize("case", ["ties", "task_arithmetic", "model_stock", "linear", "slerp"])
def test_same_bits_as_mergekit_without_dtype(
    case: str, bf16_models: dict[str, Path], tmp_path: Path
) -> None:
    """No ``dtype``: mergekit merges bfloat16 models in bfloat16 (their promoted dtype), and
    so does the mergekit dialect."""
    recipe = CASES[case](bf16_models)
    del recipe["dtype"]
    mk_out, sp_out = run_both(recipe, tmp_path)
    assert_same(mk_out, sp_out, exact=True)


# Wider models: the embeddings and MLP weights have 40,960 entries, over the 2^15 from which
# torch splits a whole-tensor reduction over its threads, so mergekit's SLERP and Model Stock
# bits depend on its thread count (several same-shape tensors of each kind). The fine-tunes
# are further from the base (cos ≈ 0.995) so that SLERP interpolates on the sphere, not
# linearly (|cos| > 0.9995).
WIDE = {"hidden_size": 64, "intermediate_size": 640, "num_hidden_layers": 3, "vocab_size": 640}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("wide_models"), torch.bfloat16, WIDE, spread=0.1)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    "case",
    ["slerp", "model_stock", "model_stock_filter_wise", "ties_rescale", "breadcrumbs_rescale"],
)
def test_same_bits_as_mergekit_with_its_thread_count(
    case: str,
    dtype: str,
    threads: int,
    wide_models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mergekit run with ``threads`` intra-op threads, splice told so through
    SPLICE_MERGEKIT_THREADS (its own jobs run with other thread counts): the same bits."""
    monkeypatch.setenv("SPLICE_MERGEKIT_THREADS", str(threads))
    recipe = with_dtype(CASES[case](wide_models), dtype)
    mk_out, sp_out = run_both(recipe, tmp_path, mergekit_threads=threads)
    assert_same(mk_out, sp_out, exact=True)


def test_comparison_notices_a_difference(models: dict[str, Path], tmp_path: Path) -> None:
    """The check itself is not vacuous: other densities give other tensors."""
    mk_out, _ = run_both(CASES["ties"](models), tmp_path / "a")
    _, sp_out = run_both(
        models_recipe(
            models,
            "ties",
            [
                {"weight": 1.0, "density": 0.25},
                {"weight": 0.8, "density": 0.3},
                {"weight": 0.6, "density": 0.5},
            ],
            {"normalize": True},
        ),
        tmp_path / "b",
    )
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same(mk_out, sp_out)
