"""Every number a user gives is finite and in its documented range, or the command refuses
it before any tensor is read (issue 9, "non-finite numbers accepted").

The model references in these recipes do not exist: the refusal must come first, naming the
key, flag or file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from splice.adapters import AdapterConfigError, make_config
from splice.adapters.config import AdapterConfig
from splice.bench.config import BenchConfigError, parse_bench_config
from splice.bench.methods import check_overrides
from splice.cli import main
from splice.engine.continual import STATE_FILE, load_state
from splice.errors import CheckpointError, DataError, MergeValidationError, RecipeError
from splice.merge import get_method
from splice.numbers import check_number, check_numbers, first_nonfinite, is_finite_number
from splice.recipe.schema import parse_recipe
from splice.train import TrainConfigError, parse_train_config

NAN, INF = float("nan"), float("inf")


# -- the helpers ------------------------------------------------------------------------


def test_check_number_finite_and_ranges():
    assert check_number(0.5, "density", gt=0, le=1) == 0.5
    assert check_number(1, "density", gt=0, le=1) == 1
    assert check_number(-3.5, "weight") == -3.5
    for bad in (NAN, INF, -INF, "0.5", None, True):
        with pytest.raises(MergeValidationError, match=r"^x = .* must be a finite number$"):
            check_number(bad, "x")
    with pytest.raises(MergeValidationError, match=r"density = 0 must be in \(0, 1\]"):
        check_number(0, "density", gt=0, le=1)
    with pytest.raises(MergeValidationError, match=r"dropout = 1 must be in \[0, 1\)"):
        check_number(1, "dropout", ge=0, lt=1)
    with pytest.raises(DataError, match="k = 0 must be at least 1"):
        check_number(0, "k", ge=1, integer=True, error=DataError)
    with pytest.raises(MergeValidationError, match=r"rank = 2\.0 must be an integer"):
        check_number(2.0, "rank", ge=1, integer=True)
    with pytest.raises(MergeValidationError, match=r"w\[2\] = inf must be a finite number"):
        check_numbers([1, 2.5, INF], "w")
    assert [is_finite_number(v) for v in (1, 1e308, 1e309, NAN, False)] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_first_nonfinite_names_the_path():
    assert first_nonfinite({"ties": {"density": 0.2, "lambda": [1.0, 2.0]}}) is None
    path, value = first_nonfinite({"ties": {"density": 0.2, "lambda": [1.0, -INF]}})
    assert path == "ties.lambda[1]" and value == -INF
    path, value = first_nonfinite([{"a": "nan"}, {"b": NAN}])
    assert path == "[1].b" and math.isnan(value)


# -- recipes ----------------------------------------------------------------------------

BASE = {"merge_method": "task_arithmetic", "base_model": "/no/base", "models": [{"model": "/no/a"}]}


@pytest.mark.parametrize(
    "recipe, where, value",
    [
        ({**BASE, "models": [{"model": "/no/a", "parameters": {"weight": NAN}}]},
         "models.0.parameters.weight", "nan"),
        ({**BASE, "parameters": {"lambda": INF}}, "parameters.lambda", "inf"),
        ({**BASE, "parameters": {"lambda": -INF}}, "parameters.lambda", "-inf"),
        # a gradient (list interpolated over layers)
        ({**BASE, "parameters": {"lambda": [0.5, NAN, 1.0]}}, "parameters.lambda.1", "nan"),
        # filtered settings
        ({**BASE, "parameters": {"lambda": [{"filter": "mlp", "value": INF}, {"value": 1}]}},
         "parameters.lambda.0.value", "inf"),
        ({**BASE, "parameters": {"lambda": {"filter": "mlp", "value": [1.0, NAN]}}},
         "parameters.lambda.value.1", "nan"),
        # slices
        ({"merge_method": "linear", "slices": [{"sources": [
            {"model": "/no/a", "layer_range": [0, 2], "parameters": {"weight": INF}}]}]},
         "slices.0.sources.0.parameters.weight", "inf"),
        # the LiNeS post-step
        ({**BASE, "lines": {"alpha": NAN, "beta": 0.5}}, "lines.alpha", "nan"),
        ({**BASE, "lines": {"alpha": 0.5, "beta": -INF}}, "lines.beta", "-inf"),
    ],
)  # fmt: skip
def test_recipe_non_finite_numbers_name_the_key(recipe, where, value):
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe)
    msg = str(e.value)
    assert f"{where}: Input should be a finite number, got {value}" in msg
    assert "valid boolean" not in msg and "valid string" not in msg  # union noise hidden


def test_recipe_yaml_nan_inf_refused_before_opening_models(tmp_path, capsys):
    """YAML's .nan / .inf / -.Inf through `splice merge`: exit 1 naming the key; the
    (missing) models are never opened; no output."""
    for text, where in [
        ("parameters: {weight: .nan}", "models.0.parameters.weight"),
        ("parameters: {weight: .inf}", "models.0.parameters.weight"),
        ("parameters: {weight: [0.1, -.Inf]}", "models.0.parameters.weight.1"),
    ]:
        p = tmp_path / "r.yaml"
        p.write_text(
            f"merge_method: linear\nmodels:\n  - model: /no/such/model\n    {text}\n"
            "  - model: /no/such/other\n"
        )
        out = tmp_path / "out"
        assert main(["merge", str(p), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert where in err and "finite number" in err and "does not exist" not in err
        assert not out.exists()


def test_method_parameters_refuse_non_finite_strings_and_library_calls():
    """Strings pydantic would parse to NaN / inf ('nan', '1e400') and direct calls."""
    ta = get_method("task_arithmetic")
    for value in ("nan", "inf", "-Infinity", "1e400", NAN, INF):
        with pytest.raises(MergeValidationError, match="finite number"):
            ta.param("lambda").validate(value, "test")
    assert ta.param("lambda").validate("0.5", "test") == 0.5  # finite strings still parse
    import torch

    with pytest.raises(MergeValidationError, match=r"parameter 'weight'.*finite number"):
        ta(torch.zeros(2), [torch.ones(2)], weight=NAN)


# -- train and bench configs ------------------------------------------------------------

TRAIN = {"model": "m", "task": "seq_cls", "data": {"train": "x.csv"}}


@pytest.mark.parametrize(
    "change, where",
    [
        ({"epochs": INF}, "'epochs'"),
        ({"epochs": NAN}, "'epochs'"),
        ({"lr": NAN}, "'lr'"),
        ({"lr": INF}, "'lr'"),
        ({"weight_decay": INF}, "'weight_decay'"),
        ({"grad_clip": NAN}, "'grad_clip'"),
        ({"warmup_ratio": NAN}, "'warmup_ratio'"),
    ],
)
def test_train_config_refuses_non_finite(change, where):
    with pytest.raises(TrainConfigError, match=f"{where}: Input should be a finite number"):
        parse_train_config({**TRAIN, **change})


def test_train_adapter_params_refuse_non_finite():
    for key, value in [("lora_alpha", NAN), ("lora_alpha", INF), ("lora_dropout", NAN)]:
        adapter = {"method": "lora", key: value}
        with pytest.raises(AdapterConfigError, match=f"'{key}': Input should be a finite"):
            parse_train_config({**TRAIN, "adapter": adapter})
    for method, key in [("loha", "alpha"), ("bottleneck", "scaling"), ("vera", "d_initial")]:
        with pytest.raises(AdapterConfigError, match=f"'{key}': Input should be a finite"):
            make_config(method, {key: INF})


@pytest.mark.parametrize(
    "flags, where",
    [
        (["--epochs", "inf"], "'epochs'"),
        (["--epochs", "nan"], "'epochs'"),
        (["--lr", "nan"], "'lr'"),
        (["--lr=-inf"], "'lr'"),
        (["--param", "lora_alpha=.nan"], "'lora_alpha'"),
        (["--param", "lora_dropout=inf"], "'lora_dropout'"),
    ],
)
def test_train_flags_refuse_non_finite(flags, where, tmp_path, capsys):
    """Refused while parsing the config, before the model or the data is looked at."""
    out = tmp_path / "out"
    argv = ["train", "--model", "/no/model", "--task", "seq_cls", "--data", "/no/data.csv"]
    assert main([*argv, *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert where in err and "finite number" in err and not out.exists()


def test_train_integer_flags_refuse_zero(tmp_path, capsys):
    argv = ["train", "--model", "/no/model", "--task", "seq_cls", "--data", "/no/d.csv"]
    for flag in ("--steps", "--batch-size", "--max-train-examples", "--threads"):
        assert main([*argv, flag, "0", "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert flag.lstrip("-").replace("-", "_") in err or flag in err, err


def test_bench_config_refuses_non_finite():
    base = {"tasks": ["a", "b"]}
    for change, where in [
        ({"training": {"epochs": INF}}, "'training.epochs': Input should be a finite number"),
        ({"training": {"head_lr": NAN}}, "'training.head_lr': Input should be a finite"),
        ({"full": {"lr": INF}}, "'full.lr': Input should be a finite number"),
        ({"lora": {"alpha": NAN}}, "'lora.alpha': Input should be a finite number"),
        ({"lora": {"dropout": NAN}}, "'lora.dropout': Input should be a finite number"),
        (
            {"merge": {"params": {"ties": {"density": NAN}}}},
            "'merge.params': ties.density = nan must be a finite number",
        ),
        (
            {"merge": {"grids": {"ties": {"lambda": [0.5, INF]}}}},
            "'merge.grids': ties.lambda[1] = inf must be a finite number",
        ),
    ]:
        with pytest.raises(BenchConfigError) as e:
            parse_bench_config({**base, **change})
        assert where in str(e.value)


def test_bench_overrides_checked_against_the_method_before_training():
    """String values and out-of-range values reach the method's own schema up front."""
    with pytest.raises(MergeValidationError, match=r"'density'.*less than or equal to 1"):
        check_overrides({"ties": {"density": 5}}, {})
    with pytest.raises(MergeValidationError, match=r"'lambda' = 'nan'.*finite number"):
        check_overrides({}, {"ties": {"lambda": [1.0, "nan"]}})
    check_overrides({"ties": {"density": 0.2}}, {"ties": {"lambda": [0.5, 1.0]}})


def test_bench_cli_refuses_non_finite_config(tmp_path, capsys):
    p = tmp_path / "bench.yaml"
    p.write_text(yaml.safe_dump({"tasks": ["a", "b"]}) + "training: {epochs: .inf}\n")
    assert main(["bench", str(p), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "'training.epochs': Input should be a finite number" in err
    assert not (tmp_path / "o").exists()


# -- adapter configs read from disk -----------------------------------------------------


def test_splice_adapter_config_from_peft_refuses_non_finite():
    cls = type(make_config("loha", {}))
    assert issubclass(cls, AdapterConfig)
    with pytest.raises(AdapterConfigError, match="'alpha': Input should be a finite number"):
        cls.from_peft({"peft_type": "LOHA", "r": 2, "alpha": NAN})
    with pytest.raises(AdapterConfigError, match=r"alpha_pattern.*finite number"):
        cls.from_peft({"peft_type": "LOHA", "r": 2, "alpha_pattern": {"q": INF}})


def test_peft_lora_config_refuses_non_finite(tmp_path):
    """JSON's NaN / Infinity in a PEFT adapter_config.json (Python's json accepts them)."""
    from splice.peft.lora_config import load_lora_config

    good = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    for change, match in [
        ({"lora_alpha": NAN}, r"'lora_alpha' = nan must be a finite number"),
        ({"lora_alpha": -INF}, r"'lora_alpha' = -inf must be a finite number"),
        ({"alpha_pattern": {"q_proj": NAN}}, r"alpha_pattern\['q_proj'\] = nan must be a pos"),
        ({"rank_pattern": {"q_proj": NAN}}, r"rank_pattern\['q_proj'\] = nan must be a pos"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] = 2.5 must be an int"),
    ]:
        d = tmp_path / "ad"
        d.mkdir(exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_lora_config(d)
    (d / "adapter_config.json").write_text(json.dumps({**good, "rank_pattern": {"q": 2.0}}))
    assert load_lora_config(d)[0].rank_for("q") == 2


# -- other inputs -----------------------------------------------------------------------


def test_continual_state_with_non_finite_scalars_is_refused(tmp_path):
    state = {"method": "opcm", "format": 1, "alpha": 0.5, "lambda": 1.0, "task_vector_norms": [1.0]}
    for change, match in [
        ({"alpha": NAN}, "alpha = nan must be a finite number"),
        ({"lambda": INF}, "lambda = inf must be a finite number"),
        ({"task_vector_norms": [1.0, NAN]}, r"task_vector_norms\[1\] = nan"),
    ]:
        (tmp_path / STATE_FILE).write_text(json.dumps({**state, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_state(tmp_path)
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert load_state(tmp_path).alpha == 0.5


def test_data_options_and_examples(tmp_path, capsys):
    data = Path(tmp_path / "d.csv")
    data.write_text("text,label\na,x\nb,y\n")
    for argv, match in [
        (["data", "show", str(data), "-o", "min_confidence=nan"], "is not a finite number"),
        (["data", "show", str(data), "-o", "x=-inf"], "is not a finite number"),
        (["data", "show", str(data), "--examples", "-1"], "--examples = -1 must be at least 0"),
        (["data", "split", str(data), "--out", "s.json", "--sizes", "nan,0.1,0.1"], "[0, 1]"),
    ]:
        assert main(argv) == 1
        assert match in capsys.readouterr().err
