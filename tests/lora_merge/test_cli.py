"""`splice lora ...` end to end on tiny adapters and checkpoints."""

import torch
from lora_test_util import make_adapter, tiny_llama

from splice.cli import main
from splice.peft import read_lora_adapters


def test_lora_merge_cli(tmp_path, capsys):
    a1, a2 = make_adapter(tmp_path / "a1", seed=1), make_adapter(tmp_path / "a2", seed=2)
    out = tmp_path / "m"
    code = main(
        [
            "lora",
            "merge",
            "--method",
            "svd",
            "--rank",
            "2",
            "--weights",
            "0.5,2",
            str(a1),
            str(a2),
            "--out",
            str(out),
        ]
    )
    assert code == 0 and "ranks: 2" in capsys.readouterr().out
    got = read_lora_adapters([out])[0]
    assert {f.rank for f in got.modules.values()} == {2}
    # a bad option is one line on stderr and exit code 1, nothing written
    code = main(
        [
            "lora",
            "merge",
            "--method",
            "concat",
            "--density",
            "0.5",
            str(a1),
            str(a2),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 1
        and "'lora:concat' has no parameter 'density'" in err
        and not (tmp_path / "x").exists()
    )


def test_lora_extract_rmm_compeft_cli(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight.add_(torch.ones(32, 32) * 0.01)
    base.save_pretrained(tmp_path / "ft")
    code = main(
        [
            "lora",
            "extract",
            "--base",
            str(tmp_path / "base"),
            "--model",
            str(tmp_path / "ft"),
            "--energy",
            "0.9",
            "--out",
            str(tmp_path / "ex"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "q_proj.weight\trank 1\t" in out  # a rank-1 delta (all ones)
    a1, a2 = make_adapter(tmp_path / "a1", seed=1), make_adapter(tmp_path / "a2", seed=2)
    assert main(["lora", "rmm", str(a1), str(a2), "--k", "2", "--out", str(tmp_path / "s")]) == 0
    assert (
        main(
            [
                "lora",
                "rmm-recover",
                str(tmp_path / "s"),
                "--task",
                "1",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    rec, orig = read_lora_adapters([tmp_path / "r", a2])
    for k, f in orig.modules.items():
        torch.testing.assert_close(rec.modules[k].to_dense(), f.to_dense(), atol=1e-5, rtol=0)
    assert main(["lora", "compeft", str(a1), "--density", "0.1", "--out", str(tmp_path / "c")]) == 0
    assert "entropy-coded" in capsys.readouterr().out
