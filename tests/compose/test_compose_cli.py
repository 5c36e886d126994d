"""`splice lorahub` and `splice retrieve` on tiny model folders: outputs and clean errors."""

from __future__ import annotations

import json

import pytest
import torch

from cli_checks import fails_cleanly, no_output
from splice.adapters import AdapterModel, LoraConfig, save_adapter
from splice.cli import main
from tiny_hf import save_tiny_llama_folder, tiny_bert_config, tiny_llama, tiny_tokenizer


def _lora(path, seed, r=2):
    am = AdapterModel(tiny_llama(max_position_embeddings=64).eval())
    am.add_adapter("default", LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters("default"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(am, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_llama_folder(root / "base")
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_hidden_layers=1)).save_pretrained(root / "embedder")
    tiny_tokenizer().save_pretrained(root / "embedder")
    rows = [{"prompt": f"q{i}: abc", "completion": f"ans {i}"} for i in range(4)]
    (root / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["abc cab", "bca"])
    )
    (root / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["123 321", "231"])
    )
    return {
        "root": root,
        "base": str(base),
        "embedder": str(root / "embedder"),
        "a": _lora(root / "lora_a", 1),
        "b": _lora(root / "lora_b", 2),
        "r3": _lora(root / "lora_r3", 3, r=3),
    }


def test_lorahub_cli_writes_the_composed_adapter(files, tmp_path, capsys):
    out = tmp_path / "hub"
    argv = ["lorahub", files["base"], "--adapter", files["a"], "--adapter", files["b"]]
    argv += ["--data", str(files["root"] / "few.jsonl"), "--budget", "5", "--out", str(out)]
    assert main([*argv, "--quiet", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :])
    assert result["evaluations"] == 5
    assert len(result["weights"]) == 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["splice_lorahub"])["weights"] == result["weights"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "0"], "--budget"),
        (["--l1", "nan"], "--l1"),
        (["--adapter", "R3"], "equal ranks"),
        (["--data", "MISSING"], "no such file"),
    ],
)
def test_lorahub_cli_errors(files, tmp_path, capsys, extra, message):
    out = tmp_path / "hub"
    extra = [
        files["r3"] if e == "R3" else str(tmp_path / "no.jsonl") if e == "MISSING" else e
        for e in extra
    ]
    argv = ["lorahub", files["base"], "--adapter", files["a"], "--out", str(out)]
    argv += ["--data", str(files["root"] / "few.jsonl"), *extra]
    err = fails_cleanly(argv, capsys)
    assert message in err
    no_output(out)


def test_retrieve_centroid_route_and_generate(files, capsys):
    for key, data in (("a", "a.jsonl"), ("b", "b.jsonl")):
        argv = ["retrieve", "centroid", files[key], "--data", str(files["root"] / data)]
        assert main([*argv, "--embedder", files["embedder"]]) == 0
    assert "centroid of 2 input(s)" in capsys.readouterr().out
    library = ["--adapter", f"A={files['a']}", "--adapter", f"B={files['b']}"]
    argv = ["retrieve", "route", *library, "--text", "cab abc", "--text", "312", "--k", "1"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["adapters"] for x in lines] == [{"A": 1.0}, {"B": 1.0}]
    argv = ["retrieve", "generate", files["base"], *library, "--prompt", "abc", "--prompt", "123"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [next(iter(x["adapters"])) for x in lines] == ["A", "B"]


def test_retrieve_cli_errors(files, tmp_path, capsys):
    bare = _lora(tmp_path / "bare", 5)
    err = fails_cleanly(["retrieve", "route", "--adapter", bare, "--text", "x"], capsys)
    assert "has no splice_centroid.safetensors" in err
    argv = ["retrieve", "route", "--adapter", files["a"], "--text", "x", "--data", "f.jsonl"]
    assert "--text" in fails_cleanly(argv, capsys)
    argv = ["retrieve", "centroid", files["a"], "--data", str(files["root"] / "few.jsonl")]
    err = fails_cleanly([*argv, "--column", "nope", "--embedder", files["embedder"]], capsys)
    assert "column 'nope'" in err
    argv = ["retrieve", "centroid", str(tmp_path), "--data", str(files["root"] / "a.jsonl")]
    assert "adapter_config.json" in fails_cleanly(argv, capsys)
