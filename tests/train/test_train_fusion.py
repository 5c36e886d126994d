"""splice train's fusion mode: AdapterFusion over frozen adapters on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from splice.cli import main
from splice.train import TrainConfigError, parse_train_config


@pytest.fixture
def two_adapters(tiny_llama_dir, tmp_path):
    """Two bottleneck adapters (random weights) saved for the tiny Llama."""
    from transformers import AutoModelForCausalLM

    from splice.adapters import AdapterModel, make_config, save_adapter

    am = AdapterModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    folders = {}
    for i, name in enumerate(["a", "b"]):
        am.add_adapter(name, make_config("bottleneck", {"placement": "houlsby"}))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        folders[name] = save_adapter(am, tmp_path / name, name)
    return folders


def test_fusion_training_lowers_the_loss_and_loads_back(
    tiny_llama_dir, lm_jsonl, two_adapters, tmp_path, capsys
):
    out = tmp_path / "fusion"
    args = ["train", "--model", str(tiny_llama_dir), "--task", "causal_lm"]
    args += ["--data", str(lm_jsonl), "--steps", "20", "--lr", "2e-2", "--batch-size", "8"]
    args += ["--method", "fusion", "--expert", f"a={two_adapters['a']}"]
    args += ["--expert", f"b={two_adapters['b']}"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert "fusion written to" in capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    # only the fusion trains: 4 layers (o_proj, down_proj x 2) of Q, K (32x32 + 32), V (32x32)
    assert res["trainable_params"] == 4 * (3 * 32 * 32 + 2 * 32)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5

    # the folder loads back: the same held-out loss as at the end of training
    from transformers import AutoModelForCausalLM

    from splice.adapters import AdapterModel
    from splice.compose import Fuse, load_fusion

    am = AdapterModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    assert load_fusion(am, out) == Fuse("a", "b", name="fusion")
    trained = am.fusions["fusion"].layers[0].value.weight
    assert not torch.allclose(trained, torch.eye(32), atol=1e-3)  # V moved from I
    cfg = parse_train_config(json.loads(json.dumps(_saved_config(out))))
    from splice.train import data as D
    from splice.train.loop import evaluate_lm
    from splice.train.models import load_for_task

    _, tok, _ = load_for_task(str(tiny_llama_dir), "causal_lm", None, None)
    parts = D.lm_splits(cfg)
    again = evaluate_lm(am, D.lm_batches(parts["test"], tok, 8, cfg.max_length, None))
    assert again["loss"] == pytest.approx(res["after"]["test"]["loss"], rel=1e-5)


def test_seq_cls_fusion_trains_the_head_and_loads_back(tiny_bert_dir, fruit_csv, tmp_path):
    """On a sequence classifier the new head trains with the fusion and is saved with it:
    the folder loaded into a fresh classifier (another random head) gives the same test
    loss as at the end of training."""
    from transformers import AutoModelForSequenceClassification

    from splice.adapters import AdapterModel, make_config, save_adapter
    from splice.compose import load_fusion
    from splice.train import data as D
    from splice.train.loop import evaluate_classification
    from splice.train.models import load_for_task
    from splice.train.run import run_training

    am = AdapterModel(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir))
    folders = {}
    for i, name in enumerate(["a", "b"]):
        lora = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
        am.add_adapter(name, make_config("lora", lora))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        folders[name] = str(save_adapter(am, tmp_path / name, name))
    cfg = parse_train_config(
        {
            "model": str(tiny_bert_dir),
            "task": "seq_cls",
            "data": {"train": str(fruit_csv)},
            "adapter": {"method": "fusion", "experts": folders},
            "steps": 30,
            "lr": 1e-2,
            "batch_size": 8,
        }
    )
    out = tmp_path / "fusion"
    res = run_training(cfg, out, progress=False)
    # the fusion (2 layers x query, value: Q, K 32x32 + 32, V 32x32) and the head (32x2 + 2)
    assert res.trainable_params == 4 * (3 * 32 * 32 + 2 * 32) + (32 * 2 + 2)
    assert (out / "head.safetensors").is_file()
    assert json.loads((out / "fusion_config.json").read_text())["head"] == "classifier"

    torch.manual_seed(123)  # another fresh head than training's
    model, tok, _ = load_for_task(str(tiny_bert_dir), "seq_cls", 2, ["animal", "fruit"])
    fresh = AdapterModel(model.eval())
    load_fusion(fresh, out)
    parts = D.classification_splits(cfg)["parts"]
    p = parts["test"]
    again = evaluate_classification(fresh, D.cls_batches(p.texts, p.labels, tok, 8, 64, None))
    assert again["loss"] == pytest.approx(res.after["test"]["loss"], rel=1e-5)
    assert again["accuracy"] == res.after["test"]["accuracy"]

    # a head of another size is refused, and the model is left as it was
    from splice.adapters import AdapterStateError
    from splice.compose import CompositionError

    other, _, _ = load_for_task(str(tiny_bert_dir), "seq_cls", 3, ["a", "b", "c"])
    am3 = AdapterModel(other)
    with pytest.raises(AdapterStateError, match=r"classifier.weight: saved shape \(2, 32\)"):
        load_fusion(am3, out)
    assert not am3.fusions and not am3.configs
    meta = json.loads((out / "fusion_config.json").read_text())
    (out / "fusion_config.json").write_text(json.dumps({**meta, "head": "nohead"}))
    with pytest.raises(CompositionError, match="the saved head 'nohead' is not a module"):
        load_fusion(AdapterModel(load_for_task(str(tiny_bert_dir), "seq_cls", 2)[0]), out)


def _saved_config(out):
    import yaml

    return yaml.safe_load((out / "splice_train.yaml").read_text())


def test_fusion_config_errors(two_adapters):
    base = {"model": "m", "task": "causal_lm", "data": {"train": "x.jsonl"}}
    fusion = {"method": "fusion", "experts": {k: str(v) for k, v in two_adapters.items()}}
    parse_train_config({**base, "adapter": fusion})
    parse_train_config({**base, "adapter": {**fusion, "composition": {"fuse": ["b", "a"]}}})
    parse_train_config({**base, "task": "seq_cls", "adapter": fusion})  # with a head
    with pytest.raises(TrainConfigError, match=r"'regularisation': unknown key \(did you mean"):
        parse_train_config({**base, "adapter": {**fusion, "regularisation": 0}})
    with pytest.raises(TrainConfigError, match="adapter: 'experts': Field required"):
        parse_train_config({**base, "adapter": {"method": "fusion"}})
    bad = {**fusion, "composition": {"fuse": ["a", "c"]}}
    with pytest.raises(TrainConfigError, match="must be the same adapters"):
        parse_train_config({**base, "adapter": bad})
    bad = {**fusion, "composition": {"stack": ["a", "b"]}}
    with pytest.raises(TrainConfigError, match="trains a Fuse over adapters"):
        parse_train_config({**base, "adapter": bad})
    bad = {**fusion, "composition": {"fuse": {"nam": "x"}}}
    with pytest.raises(TrainConfigError, match=r"adapter.composition.fuse: unknown key 'nam'"):
        parse_train_config({**base, "adapter": bad})


def test_fuse_flag_errors(tmp_path, capsys):
    args = ["train", "--model", "m", "--task", "causal_lm", "--data", "x.jsonl"]
    rc = main([*args, "--method", "fusion", "--expert", "nofolder", "--out", str(tmp_path / "o")])
    assert rc != 0
    assert "--expert 'nofolder': expected NAME=PATH" in capsys.readouterr().err
