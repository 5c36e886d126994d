"""`splice align`: folders in, the permuted model out (atomic, same names / shapes / dtypes,
config and tokenizer copied, a record of the match), and clean errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_checks import fails_cleanly, no_output
from splice.cli import main
from splice.merge.align import apply_permutation, llama_spec, mlp_spec
from tiny_hf import save_tiny_llama_folder


def mlp_state(seed, hidden=6):
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(hidden, 3, generator=g),
        "net.0.bias": torch.randn(hidden, generator=g),
        "net.2.weight": torch.randn(2, hidden, generator=g),
        "net.2.bias": torch.randn(2, generator=g),
    }


def folder(path, state):
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "mlp"}')
    return str(path)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_align_recovers_a_permuted_mlp(tmp_path, capsys):
    a = mlp_state(0)
    spec = mlp_spec(shapes(a))
    b = apply_permutation(spec, {"P_0": torch.tensor([3, 0, 5, 1, 4, 2])}, a)
    ref, model, out = folder(tmp_path / "a", a), folder(tmp_path / "b", b), tmp_path / "out"
    assert main(["align", "--reference", ref, "--model", model, "--out", str(out)]) == 0
    assert "1 permutations" in capsys.readouterr().out
    written = load_file(str(out / "model.safetensors"))
    assert written.keys() == a.keys()
    for name in a:
        assert torch.equal(written[name], a[name]), name
    assert (out / "config.json").read_text() == '{"model_type": "mlp"}'
    record = json.loads((out / "splice_alignment.json").read_text())
    assert record["spec"] == "mlp" and record["units"] == {"P_0": 6} and record["converged"]
    assert record["objective_after"] > record["objective_before"]


@pytest.mark.parametrize("spec", ["llama", "llama-residual"])
def test_align_llama_folder_keeps_the_function(tmp_path, spec):
    from transformers import LlamaForCausalLM

    ref = save_tiny_llama_folder(tmp_path / "a", seed=0)
    model = save_tiny_llama_folder(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    argv = ["align", "--reference", str(ref), "--model", str(model), "--out", str(out)]
    assert main([*argv, "--spec", spec]) == 0
    record = json.loads((out / "splice_alignment.json").read_text())
    units = {"mlp_0": 64, "heads_0": 2, "mlp_1": 64, "heads_1": 2}
    assert record["units"] == (units if spec == "llama" else {**units, "residual": 32})
    assert (out / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = LlamaForCausalLM.from_pretrained(model).eval()(ids).logits
        after = LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    original = load_file(str(tmp_path / "b" / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert not torch.equal(
        written["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"]
    )
    assert llama_spec(shapes(written), 4, 2).unit_counts(shapes(written))["heads_0"] == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown spec", "unknown spec 'resnet' (known: mlp, llama, llama-residual)"),
        ("shape mismatch", "tensor 'net.0.bias' has shape [6] in the reference and [7] in the"),
        ("llama spec on an mlp", "no '*.layers.N.mlp.down_proj.weight' tensor"),
        ("mlp spec on a llama", "is not a linear layer's 2-D weight"),
        ("nan", "tensor 'net.0.bias' has 6 non-finite values"),
        ("missing model", "does not exist"),
        ("max iter", "--max-iter must be at least 1"),
        ("seed", "--seed must be >= 0"),
    ],
)
def test_errors_are_one_line_and_leave_no_output(tmp_path, capsys, case, message):
    a = mlp_state(0)
    ref = folder(tmp_path / "a", a)
    other = {
        "shape mismatch": lambda: folder(tmp_path / "b", mlp_state(1, hidden=7)),
        "nan": lambda: folder(tmp_path / "b", {**a, "net.0.bias": torch.full((6,), torch.nan)}),
        "mlp spec on a llama": lambda: None,
        "missing model": lambda: str(tmp_path / "nowhere"),
    }.get(case, lambda: folder(tmp_path / "b", mlp_state(1)))()
    if case == "mlp spec on a llama":
        ref = str(save_tiny_llama_folder(tmp_path / "l0", seed=0))
        other = str(save_tiny_llama_folder(tmp_path / "l1", seed=1))
    out = tmp_path / "out"
    argv = ["align", "--reference", ref, "--model", other, "--out", str(out)]
    argv += {
        "unknown spec": ["--spec", "resnet"],
        "llama spec on an mlp": ["--spec", "llama"],
        "max iter": ["--max-iter", "0"],
        "seed": ["--seed", "-1"],
    }.get(case, [])
    err = fails_cleanly(argv, capsys)
    assert message in err, err
    no_output(out)
