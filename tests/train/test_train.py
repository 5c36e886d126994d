"""splice train: config validation, classification and causal-LM runs on tiny models."""

import json

import pytest
import torch

from splice.cli import main
from splice.train import TrainConfigError, parse_train_config, run_training
from splice.train.loop import linear_schedule


def test_config_unknown_keys_and_bad_values():
    base = {"model": "m", "task": "seq_cls", "data": {"train": "x.csv"}}
    parse_train_config(base)
    with pytest.raises(TrainConfigError, match=r"'seeds'.*did you mean 'seed'"):
        parse_train_config({**base, "seeds": 1})
    with pytest.raises(TrainConfigError, match=r"'data.trian'.*did you mean 'train'"):
        parse_train_config({**base, "data": {"trian": "x"}})
    with pytest.raises(TrainConfigError, match="'batch_size'"):
        parse_train_config({**base, "batch_size": 0})
    from splice.adapters import AdapterConfigError

    with pytest.raises(AdapterConfigError, match="did you mean 'lora_alpha'"):
        parse_train_config({**base, "adapter": {"method": "lora", "lora_alfa": 4}})
    with pytest.raises(AdapterConfigError, match="unknown adapter method 'lorra'"):
        parse_train_config({**base, "adapter": {"method": "lorra"}})


def test_linear_schedule_values():
    f = linear_schedule(10, 0.2)  # warm-up 2 steps: 0.5, 1.0; then (10 - s) / 8
    assert [round(f(s), 4) for s in range(10)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]


def test_seq_cls_lora_learns_and_loads_in_peft(tiny_bert_dir, fruit_csv, tmp_path):
    cfg = parse_train_config(
        {
            "model": str(tiny_bert_dir),
            "task": "seq_cls",
            "data": {"train": str(fruit_csv)},
            "adapter": {
                "method": "lora",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["query", "value"],
            },
            "steps": 80,
            "lr": 1e-2,
            "batch_size": 8,
            "seed": 0,
        }
    )
    out = tmp_path / "run"
    res = run_training(cfg, out, progress=False)
    assert res.after["test"]["accuracy"] == 1.0  # separable by word identity
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "eval.json",
            "splice_train.yaml",
            "splits.json",
            "splice_output.json",
            "train_log.jsonl",
        ]
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 81))
    assert not (tmp_path / "run.splice-partial").exists()
    # the saved folder is a PEFT adapter: PEFT and splice give the same logits
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from splice.adapters import load_adapter_model

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok(["apple fig is red", "wolf lion is red"], return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)

    def base():
        return AutoModelForSequenceClassification.from_pretrained(
            tiny_bert_dir, num_labels=2
        ).eval()

    with torch.no_grad():
        p = PeftModel.from_pretrained(base(), out).eval()(**enc).logits
        s = load_adapter_model(base(), out).eval()(**enc).logits
    torch.testing.assert_close(s, p, atol=1e-5, rtol=0)
    assert p.argmax(-1).tolist() == [
        res.label_names.index("fruit"),
        res.label_names.index("animal"),
    ]


def test_causal_lm_lowers_heldout_loss_via_cli(tiny_llama_dir, lm_jsonl, tmp_path, capsys):
    out = tmp_path / "lm"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--task",
            "causal_lm",
            "--data",
            str(lm_jsonl),
            "--method",
            "lora",
            "--param",
            "r=4",
            "--param",
            "target_modules=all-linear",
            "--steps",
            "60",
            "--lr",
            "1e-2",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["after"]["test"]["loss"] < 0.6 * res["before"]["test"]["loss"]
    assert "held-out loss" in capsys.readouterr().out


def test_existing_output_is_kept(tiny_bert_dir, fruit_csv, tmp_path, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "x").write_text("mine")
    rc = main(
        [
            "train",
            "--model",
            str(tiny_bert_dir),
            "--task",
            "seq_cls",
            "--data",
            str(fruit_csv),
            "--steps",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 1
    assert "exists" in capsys.readouterr().err
    assert (out / "x").read_text() == "mine"


def test_missing_model_is_clear(fruit_csv, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--model",
            str(tmp_path / "nope"),
            "--task",
            "seq_cls",
            "--data",
            str(fruit_csv),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 1
    assert "no such folder or file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.splice-partial").exists()
