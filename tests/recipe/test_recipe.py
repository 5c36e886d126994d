"""Recipe parsing: strict keys with helpful errors, mergekit's format, setting resolution."""

import pytest

from splice.errors import RecipeError
from splice.recipe.schema import load_recipe, parse_recipe
from splice.recipe.settings import MISSING, evaluate_setting, resolve

MK = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m1"}]}


def test_mergekit_recipe_parses_unchanged():
    r = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "a", "parameters": {"density": [0.2, 0.8], "weight": 0.5}},
                {
                    "model": "b",
                    "parameters": {"density": [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]},
                },
            ],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
            "out_dtype": "float16",
        }
    )
    assert r.dialect == "mergekit" and r.method_name == "ties"
    assert r.models[1].parameters["density"][0].filter == "mlp"


def test_native_dialect_by_key():
    r = parse_recipe({"method": "ties", "base_model": "b", "models": [{"model": "m"}], "seed": 3})
    assert r.dialect == "splice" and r.seed == 3


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({**MK, "base_modle": "x"}, "unknown key 'base_modle' (did you mean 'base_model'?)"),
        (
            {**MK, "models": [{"modle": "m1"}]},
            "unknown key 'models.0.modle' (did you mean 'model'?)",
        ),
        (
            {
                **MK,
                "models": [{"model": "m", "parameters": {"density": [{"filtr": "x", "value": 1}]}}],
            },
            "(did you mean 'filter'?)",
        ),
        (
            {
                "merge_method": "ties",
                "slices": [{"sources": [{"model": "m", "layer_range": [0, 2], "paramters": {}}]}],
            },
            "unknown key 'slices.0.sources.0.paramters' (did you mean 'parameters'?)",
        ),
        ({**MK, "method": "ties"}, "exactly one of 'method'"),
        ({"merge_method": "ties"}, "exactly one of 'models' or 'slices'"),
        ({**MK, "dtype": "float8"}, "dtype"),
        ({**MK, "tokenizer_source": "union"}, "not supported"),
        ({**MK, "models": [{"model": {"path": "x"}}]}, "PATH+LORA_ADAPTER_PATH"),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "m", "layer_range": [3, 1]}]}],
            },
            "layer_range",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "b", "layer_range": [0, 3]},
                        ]
                    }
                ],
            },
            "same number of layers",
        ),
        (["not", "a", "mapping"], "a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_give_clear_errors(data, fragment):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    assert fragment in str(e.value)


def test_load_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_gradient_interpolates_like_mergekit():
    # [0, 1, 0.5] at t=0.25 -> position 0.5 between 0 and 1 -> 0.5; at t=0.75 -> 0.75
    assert evaluate_setting([0.0, 1.0, 0.5], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.5], "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting([0.0, 1.0, 0.5], "x", 1.0) == pytest.approx(0.5)
    assert evaluate_setting(["a", "b"], "x", 0.9) == "a"  # non-numbers pick int(t*(n-1))
    assert evaluate_setting(["a", "b"], "x", 1.0) == "b"


def test_filters_substring_regex_and_fallthrough():
    r = parse_recipe(
        {
            **MK,
            "parameters": {
                "density": [
                    {"filter": "re:layers\\.[01]\\.mlp", "value": 0.1},
                    {"filter": "self_attn", "value": 0.2},
                ]
            },
        }
    )
    setting = r.parameters["density"]
    assert evaluate_setting(setting, "model.layers.1.mlp.up.weight", 0) == 0.1
    assert evaluate_setting(setting, "model.layers.2.mlp.up.weight", 0) is None
    assert evaluate_setting(setting, "model.layers.2.self_attn.q.weight", 0) == 0.2
    # narrowest scope first; a scope whose filters don't match falls through to the next
    assert (
        resolve(
            "density", ({"density": setting}, {"density": 0.9}), "model.layers.2.mlp.up.weight", 0
        )
        == 0.9
    )
    assert resolve("density", ({}, None), "x", 0) is MISSING
