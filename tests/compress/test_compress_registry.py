"""The compression registry: signature-as-schema parameters, errors before any output, the
`splice compress METHOD` flags generated from the parameters, and restore by stored method."""

import json
from typing import Annotated, Literal

import pytest
import torch
from pydantic import Field
from safetensors.torch import save_file

from splice.cli import build_parser, main
from splice.commands.compress import method_parser
from splice.compress import compress, get_compression_method, restore
from splice.compress import registry as reg
from splice.compress.tall import TallKernel
from splice.errors import CheckpointError, MergeValidationError
from splice.merge.registry import PerModel


@pytest.fixture
def ckpts(tmp_path):
    def write(name, w):
        save_file({"w": torch.tensor(w)}, str(tmp_path / name))
        return str(tmp_path / name)

    base = write("base.safetensors", [0.0, 0.0, 0.0])
    return base, [write("a.safetensors", [1.0, 0.1, 0.0]), write("b.safetensors", [0.0, 1.0, 0.2])]


@pytest.fixture
def probe(monkeypatch):
    """A registered test method with a global float, a choice and a per-model float."""
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    reg._load_builtin_methods()

    @reg.compression_method("probe")
    def probe(
        *,
        strength: Annotated[float, Field(gt=0, description="how strong")] = 2.0,
        mode: Literal["fast", "exact"] = "exact",
        lambda_: PerModel[float] = 0.25,
    ) -> TallKernel:
        """A probe method."""
        return TallKernel(lambda_)

    return probe


def test_unknown_method_says_did_you_mean(ckpts, tmp_path, capsys):
    base, models = ckpts
    with pytest.raises(MergeValidationError, match=r"'tal' \(did you mean 'tall'\?\); avail"):
        compress("tal", base, models, tmp_path / "c")
    assert main(["compress", "emrr", "--base", base, "--models", *models, "--out", "x"]) == 1
    assert "unknown compression method 'emrr' (did you mean 'emr'?)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lambda": -0.1}, "parameter 'lambda' = [-0.1, -0.1] is invalid: Input should be greater"),
        ({"lambda": float("nan")}, "parameter 'lambda' = [nan, nan] is invalid: Input should be a"),
        ({"lambda": "inf"}, "is invalid: Input should be a finite number"),
        ({"lambda": [0.1, 0.2, 0.3]}, "3 values of 'lambda' for 2 models"),
        ({"lamda": 0.1}, "parameter(s) ['lamda'] (did you mean 'lambda'?); it takes ['lambda']"),
        ({"lambda": 0.1, "x": 1}, "no parameter(s) ['x']; it takes ['lambda']"),
    ],
)
def test_bad_parameters_are_refused_before_any_output(ckpts, tmp_path, params, message):
    base, models = ckpts
    with pytest.raises(MergeValidationError, match="compression method 'tall'") as e:
        compress("tall", base, models, tmp_path / "c", params=params)
    assert message in str(e.value)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["nan", "-1", "abc"])
def test_cli_refuses_a_bad_flag_value(ckpts, tmp_path, capsys, value):
    base, models = ckpts
    argv = ["compress", "tall", "--base", base, "--models", *models, "--out", str(tmp_path / "c")]
    assert main([*argv, "--lambda", value]) == 1
    assert "parameter 'lambda'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_flags_are_generated_from_the_parameters(probe):
    parser = method_parser(probe)
    help_text = " ".join(parser.format_help().split())
    assert "A probe method." in help_text
    assert "--strength STRENGTH how strong (2.0)" in help_text
    assert "--mode MODE 'fast' / 'exact' ('exact')" in help_text
    assert "--lambda LAMBDA [LAMBDA ...] float (0.25)" in help_text
    opts = parser.parse_args(["--base", "b", "--models", "m", "--out", "o", "--lambda", "1", "2"])
    assert (opts.strength, opts.mode, opts.lambda_) == (None, None, ["1", "2"])


def test_cli_values_reach_the_method_and_the_manifest(probe, ckpts, tmp_path):
    base, models = ckpts
    argv = ["compress", "probe", "--base", base, "--models", *models, "--mode", "fast"]
    assert main([*argv, "--lambda", "0.5", "0", "--out", str(tmp_path / "c")]) == 0
    manifest = json.loads((tmp_path / "c" / "splice_compress.json").read_text())
    assert manifest["method"] == "probe"
    assert manifest["params"] == {"strength": 2.0, "mode": "fast", "lambda": [0.5, 0.0]}
    assert main([*argv, "--strength", "0", "--out", str(tmp_path / "d")]) == 1
    assert main([*argv, "--mode", "slow", "--out", str(tmp_path / "d")]) == 1
    assert not (tmp_path / "d").exists()


def test_one_cli_value_of_a_per_model_parameter_applies_to_every_model(ckpts, tmp_path):
    base, models = ckpts
    argv = ["compress", "tall", "--base", base, "--models", *models, "--lambda", "0.3"]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    manifest = json.loads((tmp_path / "c" / "splice_compress.json").read_text())
    assert manifest["params"] == {"lambda": [0.3, 0.3]}


def test_the_listing_matches_the_registry(capsys):
    assert main(["compress", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "- `tall`: TALL masks over the task-arithmetic vector." in listing
    assert "| `tall` | `lambda` | model | float | `0.4` |" in listing
    assert "| `emr` | – | | | |" in listing
    assert "| `compeft` | `density` | global | float | required |" in listing
    assert "| | `alpha` | global | float | `1.0` |" in listing
    assert "- `compeft`: ComPEFT: top-k" in listing and "(`splice lora compeft`)" in listing
    assert main(["methods"]) == 0
    assert listing.strip() in capsys.readouterr().out
    assert get_compression_method("tall").params[0].default == 0.4


def test_restore_finds_the_stored_method(ckpts, tmp_path):
    base, models = ckpts
    compress("emr", base, models, tmp_path / "c")
    path = tmp_path / "c" / "splice_compress.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "method": "tal"}))
    with pytest.raises(CheckpointError, match=r"compression method 'tal' \(did you mean 'tall'"):
        restore(tmp_path / "c", "0", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_registration_rules(probe):
    with pytest.raises(ValueError, match="'probe' is already registered"):
        reg.compression_method("probe")(lambda *, x=1.0: None)
    with pytest.raises(TypeError, match="keyword parameters only"):
        reg.compression_method("other")(lambda x=1.0: None)
    with pytest.raises(TypeError, match="needs a type annotation"):
        reg.compression_method("other")(lambda *, x=1.0: None)


def test_compeft_is_registered_for_lora_adapters(ckpts, tmp_path, capsys):
    base, models = ckpts
    with pytest.raises(MergeValidationError, match="'compeft' runs as `splice lora compeft`"):
        compress("compeft", base, models, tmp_path / "c", params={"density": 0.5})
    assert main(["compress", "compeft", "--base", base, "--models", *models, "--out", "x"]) == 1
    assert "runs as `splice lora compeft`" in capsys.readouterr().err
    # `splice lora compeft` has one flag per parameter, with the registry's defaults
    args = build_parser().parse_args(["lora", "compeft", "a", "--density", "0.5", "--out", "o"])
    method = get_compression_method("compeft", "lora_adapter")
    assert {p.arg: getattr(args, p.arg) for p in method.params} == {
        "density": 0.5,
        **{p.arg: p.default for p in method.params if not p.required},
    }
