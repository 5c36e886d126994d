"""`splice stats`: Fisher / Gram statistics of an HF folder on named data, checked against
values computed by hand, usable by a recipe, and refused cleanly on bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parents[1]))
from cli_checks import fails_cleanly
from splice.cli import main
from splice.merge.data_stats import load_statistics
from tiny_hf import save_tiny_llama_classifier_folder, save_tiny_llama_folder

LM_TEXTS = ["hello world", "a cat sat", "the dog ran far", "go home"]
CLS_ROWS = [("good day", "pos"), ("bad day", "neg"), ("very nice", "pos"), ("awful", "neg")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    lm = save_tiny_llama_folder(root / "lm", seed=0)
    lm1 = save_tiny_llama_folder(root / "lm1", seed=1)
    cls = save_tiny_llama_classifier_folder(root / "cls", seed=0)
    (root / "lm.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LM_TEXTS))
    (root / "cls.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLS_ROWS)
    )
    return {"root": root, "lm": lm, "lm1": lm1, "cls": cls}


def _stats(kind, model, data, out, *extra):
    return main(
        ["stats", kind, str(model), "--data", str(data), "--out", str(out), "--quiet", *extra]
    )


def _one_example_grads(folder, text):
    """∂ℓ/∂θ of one example, ℓ = mean next-token NLL of BOS+text+EOS (by hand)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    ids_t = torch.tensor([ids])
    logits = model(input_ids=ids_t).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids_t[0, 1:])  # mean over targets
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads, strict=True))


def test_fisher_of_a_causal_lm_is_the_mean_per_example_squared_gradient(folders, tmp_path):
    out = tmp_path / "f.safetensors"
    assert (
        _stats("fisher", folders["lm"], folders["root"] / "lm.jsonl", out, "--batch-size", "3") == 0
    )
    got = load_statistics(out)
    per_example = [_one_example_grads(folders["lm"], t) for t in LM_TEXTS]
    assert set(got) == set(per_example[0])
    for name, value in got.items():
        expected = sum(g[name].square() for g in per_example) / len(LM_TEXTS)
        assert torch.allclose(value, expected, rtol=1e-4, atol=1e-9), name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "fisher" and meta["examples"] == "4" and meta["per_example"] == "true"


def test_batch_fisher_squares_the_summed_gradient(folders, tmp_path):
    data = folders["root"] / "lm.jsonl"
    exact, one, two = (tmp_path / f"{k}.safetensors" for k in ("exact", "one", "two"))
    assert _stats("fisher", folders["lm"], data, exact) == 0
    assert _stats("fisher", folders["lm"], data, one, "--batch-fisher", "--batch-size", "1") == 0
    assert _stats("fisher", folders["lm"], data, two, "--batch-fisher", "--batch-size", "2") == 0
    exact, one, two = load_statistics(exact), load_statistics(one), load_statistics(two)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(one[name], exact[name], rtol=1e-4, atol=1e-10)  # batches of one: equal
    # batches of two: ((g1 + g2)² + (g3 + g4)²) / 4 (the cross terms 2 g1 g2, 2 g3 g4 added)
    g = [_one_example_grads(folders["lm"], t)[name] for t in LM_TEXTS]
    expected = ((g[0] + g[1]).square() + (g[2] + g[3]).square()) / 4
    assert torch.allclose(two[name], expected, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(two[name], exact[name], rtol=1e-3)


def test_gram_of_a_classifier_by_hand(folders, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "g.safetensors"
    data = folders["root"] / "cls.jsonl"
    assert _stats("gram", folders["cls"], data, out, "--batch-size", "4", "--exclude", "score") == 0
    got = load_statistics(out)
    assert "score.weight" not in got and "model.layers.1.mlp.down_proj.weight" in got
    tok = AutoTokenizer.from_pretrained(folders["cls"])
    model = AutoModelForSequenceClassification.from_pretrained(folders["cls"]).eval()
    # one batch of the 4 rows in file order, padded to the longest
    enc = tok([t for t, _ in CLS_ROWS], padding=True, return_tensors="pt")
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(enc["input_ids"]))
    rows = x.reshape(-1, x.shape[-1])  # every position, padding included
    expected = rows.T @ rows / rows.shape[0]
    assert torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-5)


def test_classifier_labels_map_to_the_head_by_name(folders, tmp_path):
    """A file whose class names sort differently from the head's ids: the Fisher of the head
    bias equals the one computed with the head's ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "f.safetensors"
    assert _stats("fisher", folders["cls"], folders["root"] / "cls.jsonl", out) == 0
    got = load_statistics(out)["score.weight"]
    tok = AutoTokenizer.from_pretrained(folders["cls"])
    model = AutoModelForSequenceClassification.from_pretrained(folders["cls"]).eval()
    head = {"neg": 0, "pos": 1}
    total = torch.zeros_like(model.score.weight)
    for text, label in CLS_ROWS:
        enc = tok([text], return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([head[label]]))
        (g,) = torch.autograd.grad(loss, [model.score.weight])
        total += g.square()
    assert torch.allclose(got, total / len(CLS_ROWS), rtol=1e-4, atol=1e-10)


def test_gram_files_feed_a_regmean_recipe(folders, tmp_path):
    data = folders["root"] / "lm.jsonl"
    entries = []
    for name in ("lm", "lm1"):
        out = tmp_path / f"{name}.gram.safetensors"
        assert _stats("gram", folders[name], data, out) == 0
        entries.append({"model": str(folders[name]), "statistics": str(out)})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": entries}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    from splice.reference import open_checkpoint

    r = open_checkpoint(str(tmp_path / "merged"))
    a, b = open_checkpoint(str(folders["lm"])), open_checkpoint(str(folders["lm1"]))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(r.read(q), (a.read(q) + b.read(q)) / 2, atol=1e-4)
    for x in (r, a, b):
        x.close()


def test_recipe_data_entries_collect_what_splice_stats_writes(folders, tmp_path):
    """`data:` in a recipe: the merge collects each model's statistics as `splice stats`
    with the same options would, so the output equals the merge of the written files."""
    from splice.reference import open_checkpoint

    data = str(folders["root"] / "lm.jsonl")
    for kind, method in (("gram", "regmean"), ("fisher", "fisher")):
        files = []
        for name in ("lm", "lm1"):
            out = tmp_path / f"{name}.{kind}.safetensors"
            assert _stats(kind, folders[name], data, out, "--batch-size", "3") == 0
            files.append(str(out))
        by_file = [
            {"model": str(folders[n]), "statistics": f} for n, f in zip(("lm", "lm1"), files)
        ]
        by_data = [  # the string shorthand and the mapping form
            {"model": str(folders["lm"]), "data": {"source": data, "batch_size": 3}},
            {"model": str(folders["lm1"]), "data": {"source": data, "batch_size": 3}},
        ]
        outs = []
        for tag, entries in (("file", by_file), ("data", by_data)):
            recipe = tmp_path / f"{method}-{tag}.yaml"
            recipe.write_text(yaml.safe_dump({"method": method, "models": entries}))
            outs.append(tmp_path / f"{method}-{tag}")
            assert main(["merge", str(recipe), "--out", str(outs[-1]), "--quiet"]) == 0
        a, b = (open_checkpoint(str(o)) for o in outs)
        assert a.names() == b.names()
        for n in a.names():
            assert torch.equal(a.read(n), b.read(n)), (method, n)
        a.close()
        b.close()
    files = []  # the string shorthand: `splice stats`' default options
    for name in ("lm", "lm1"):
        assert _stats("gram", folders[name], data, tmp_path / f"{name}.d.safetensors") == 0
        files.append(
            {"model": str(folders[name]), "statistics": str(tmp_path / f"{name}.d.safetensors")}
        )
    short = [{"model": str(folders[n]), "data": data} for n in ("lm", "lm1")]
    for tag, entries in (("short", short), ("files", files)):
        (tmp_path / f"{tag}.yaml").write_text(
            yaml.safe_dump({"method": "regmean", "models": entries})
        )
        assert (
            main(["merge", str(tmp_path / f"{tag}.yaml"), "--out", str(tmp_path / tag), "--quiet"])
            == 0
        )
    a, b = open_checkpoint(str(tmp_path / "short")), open_checkpoint(str(tmp_path / "files"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.read(q), b.read(q))
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"data": "missing.jsonl"}, "models[1].data"),
        ({"data": {"source": "x.jsonl", "batch_size": 0}}, "batch_size"),
        ({"data": {"source": "x.jsonl", "sorce": 1}}, "sorce"),
        ({"data": "x.jsonl", "statistics": "s.safetensors"}, "not both"),
        ({}, "or `data:`"),
    ],
)
def test_recipe_data_errors_before_any_model_runs(
    folders, tmp_path, capsys, monkeypatch, entry, message
):
    import splice.train.models as models

    def never(*a, **k):
        raise AssertionError("a model ran before every data entry was checked")

    monkeypatch.setattr(models, "load_for_task", never)
    good = {"model": str(folders["cls"]), "data": str(folders["root"] / "cls.jsonl")}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"method": "regmean", "models": [good, {"model": str(folders["cls"]), **entry}]}
        )
    )
    err = fails_cleanly(["merge", str(recipe), "--out", str(tmp_path / "m"), "--quiet"], capsys)
    assert message in err
    assert not (tmp_path / "m").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": [good, good]}))
    err = fails_cleanly(["merge", str(recipe), "--out", str(tmp_path / "taken")], capsys)
    assert "already exists" in err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    linear = tmp_path / "l.yaml"
    linear.write_text(yaml.safe_dump({"method": "linear", "models": [good, good]}))
    err = fails_cleanly(["merge", str(linear), "--out", str(tmp_path / "m"), "--quiet"], capsys)
    assert "models[0].data: method 'linear' reads no statistics" in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("label not in head", "not classes of the model's head"),
        ("missing data", "no such file"),
        ("exists", "pass --overwrite"),
        ("not safetensors", ".safetensors file name"),
        ("exclude with fisher", "gram statistics only"),
        ("bad regex", "not a regular expression"),
        ("bad batch size", "--batch-size"),
        ("no label column", "no 'label' column"),
        ("missing model", "no such folder"),
    ],
)
def test_bad_input_fails_before_the_model_runs(
    folders, tmp_path, capsys, monkeypatch, case, message
):
    import splice.train.models as models

    def never(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_for_task", never)
    root = folders["root"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "x", "label": "maybe"})
        + "\n"
        + json.dumps({"text": "y", "label": "pos"})
        + "\n"
    )
    out = tmp_path / "s.safetensors"
    model, data, extra = folders["cls"], root / "cls.jsonl", []
    if case == "label not in head":
        data = bad
    elif case == "missing data":
        data = tmp_path / "nope.jsonl"
    elif case == "exists":
        out.write_bytes(b"keep")
    elif case == "not safetensors":
        out = tmp_path / "s.bin"
    elif case == "exclude with fisher":
        extra = ["--exclude", "score"]
    elif case == "bad regex":
        extra = ["--exclude", "("]
    elif case == "bad batch size":
        extra = ["--batch-size", "0"]
    elif case == "no label column":
        data = root / "lm.jsonl"
    elif case == "missing model":
        model = tmp_path / "no_model"
    kind = "gram" if case == "bad regex" else "fisher"
    err = fails_cleanly(
        ["stats", kind, str(model), "--data", str(data), "--out", str(out), *extra], capsys
    )
    assert message in err
    if case == "exists":
        assert out.read_bytes() == b"keep"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*splice-partial"))


def test_a_built_in_task_uses_its_seeded_train_split(folders, tmp_path, monkeypatch):
    """A built-in task name (here bbc_news, replaced by a small dataset with the head's
    classes): the default split is the train part of `splice train`'s seeded split."""
    import splice.data
    from splice.data import make_splits
    from splice.data.dataset import TextClassificationDataset

    ds = TextClassificationDataset(
        texts=[f"text number {i}" for i in range(20)],
        labels=[i % 2 for i in range(20)],
        label_names=("pos", "neg"),  # the head's order is (neg, pos): mapped by name
        source="fake",
    )
    monkeypatch.setattr(splice.data, "load_task", lambda *a, **k: ds)
    out = tmp_path / "g.safetensors"
    assert _stats("gram", folders["cls"], "bbc_news", out, "--seed", "3") == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    train = make_splits(ds, seed=3).apply(ds)["train"]
    assert meta["split"] == "train" and meta["examples"] == str(len(train)) and len(train) < 20
    out2 = tmp_path / "g2.safetensors"
    assert _stats("gram", folders["cls"], "bbc_news", out2, "--split", "all") == 0
    with safe_open(str(out2), "pt") as f:
        assert f.metadata()["examples"] == "20"
