"""`splice search --objective adamerging`: AdaMerging from a recipe whose models name their
unlabeled texts. The λ equal the Python `adamerging()` call's on the same models, texts and
seed; the written recipe, run by `splice merge`, gives θ0 + Σ_k λ_k τ_k computed by hand;
every bad input fails with one `splice: error:` line before any training, writing nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1]))
from cli_checks import fails_cleanly, no_output
from splice.cli import main
from splice.errors import SpliceError
from tiny_hf import save_tiny_llama_classifier_folder, save_tiny_llama_folder, tiny_llama_config

TEXTS = ["good day", "bad day", "very nice", "awful", "so so", "the cat sat", "hello world"]
LABELS = [("neg", "pos"), ("a", "b", "c")]  # each expert its own head and label set


def _expert(root: Path, i: int, base_weights: dict, labels: tuple[str, ...]) -> Path:
    """A Llama classifier whose backbone is the base's plus seeded noise (a 'fine-tune')."""
    folder = save_tiny_llama_classifier_folder(root / f"expert{i}", seed=10 + i, labels=labels)
    w = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(i)
    for n in w:
        if n.startswith("model."):
            w[n] = base_weights[n] + 0.2 * torch.randn(w[n].shape, generator=g)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _recipe(path: Path, base: Path, models: list[dict], **extra) -> Path:
    doc = {"method": "task_arithmetic", "base_model": str(base), "models": models, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    """A causal-LM base (its backbone `model.*` and an `lm_head`), two classifier experts
    (heads of 2 and 3 labels), one unlabeled JSONL file per task, the recipe."""
    root = tmp_path_factory.mktemp("adamerging-cli")
    base = save_tiny_llama_folder(root / "base", seed=0)
    bw = load_file(str(base / "model.safetensors"))
    out = {"root": root, "base": base}
    models = []
    for i, labels in enumerate(LABELS):
        out[f"e{i}"] = _expert(root, i, bw, labels)
        data = root / f"task{i}.jsonl"
        data.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for t in TEXTS))
        out[f"d{i}"] = data
        models.append({"model": str(out[f"e{i}"]), "data": {"source": str(data), "batch_size": 3}})
    out["recipe"] = _recipe(root / "ada.yaml", base, models)
    return out


STEPS = ["--steps", "4", "--lr", "0.05", "--batches-per-step", "1", "--seed", "3"]


def _learn(pool, tmp_path, granularity, *extra) -> tuple[dict, Path]:
    out = tmp_path / f"{granularity}.yaml"
    argv = ["search", str(pool["recipe"]), "--objective", "adamerging", "--out", str(out)]
    argv += [*STEPS, "--granularity", granularity, "--quiet", "--json", *extra]
    return argv, out


def _record(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.loads(printed[printed.index("{") :])


def _python_lambdas(pool, granularity: str, ties_density: float | None = None) -> torch.Tensor:
    """The same AdaMerging through the Python API: the states read from the files, each
    task's texts tokenized in batches of 3 by its expert's tokenizer, its own head."""
    from torch.func import functional_call
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from splice.train.adamerging import adamerging

    base_all = load_file(str(pool["base"] / "model.safetensors"))
    names = [n for n in load_file(str(pool["e0"] / "model.safetensors")) if n.startswith("model.")]
    base = {n: base_all[n] for n in names}
    experts, models, batches = [], [], []
    for i in range(len(LABELS)):
        w = load_file(str(pool[f"e{i}"] / "model.safetensors"))
        experts.append({n: w[n] for n in names})
        m = AutoModelForSequenceClassification.from_pretrained(pool[f"e{i}"]).eval()
        models.append(m.requires_grad_(False))
        tok = AutoTokenizer.from_pretrained(pool[f"e{i}"])
        texts = [f"{t} {i}" for t in TEXTS]
        batches.append(
            [
                {k: v for k, v in tok(texts[j : j + 3], padding=True, return_tensors="pt").items()}
                for j in range(0, len(texts), 3)
            ]
        )

    def forward(params, k, batch):
        return functional_call(models[k], dict(params), args=(), kwargs=batch).logits

    result = adamerging(
        base,
        experts,
        batches,
        forward,
        granularity=granularity,
        steps=4,
        lr=0.05,
        batches_per_step=1,
        ties_density=ties_density,
        seed=3,
    )
    return result.coefficients


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_cli_lambdas_equal_the_python_call(pool, tmp_path, capsys, granularity):
    argv, _ = _learn(pool, tmp_path, granularity)
    assert main(argv) == 0
    record = _record(capsys)
    expected = _python_lambdas(pool, granularity)
    if granularity == "task":
        got = torch.tensor([record["coefficients"][str(pool[f"e{i}"])] for i in range(2)])
    else:
        rows = [record["coefficients"][str(pool[f"e{i}"])] for i in range(2)]
        assert list(rows[0]) == [n for n in rows[0] if n.startswith("model.")]
        got = torch.tensor([list(r.values()) for r in rows])
    assert torch.equal(got, expected.to(got.dtype))
    assert not torch.allclose(expected, torch.full_like(expected, 0.3))  # λ moved
    assert record["steps"] == 4 and len(record["losses"]) == 4


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_written_recipe_merges_to_theta0_plus_lambda_tau(pool, tmp_path, capsys, granularity):
    merged_dir = tmp_path / "merged"
    argv, out = _learn(pool, tmp_path, granularity, "--merged", str(merged_dir))
    assert main(argv) == 0
    record = _record(capsys)
    recipe = yaml.safe_load(out.read_text())
    assert recipe["on_missing"] == "base" and recipe["method"] == "task_arithmetic"
    assert all("data" not in m for m in recipe["models"])
    again = tmp_path / "again"
    assert main(["merge", str(out), "--out", str(again), "--quiet"]) == 0
    got = load_file(str(again / "model.safetensors"))
    base = load_file(str(pool["base"] / "model.safetensors"))
    experts = [load_file(str(pool[f"e{i}"] / "model.safetensors")) for i in range(2)]
    lam = [record["coefficients"][str(pool[f"e{i}"])] for i in range(2)]
    assert set(got) == set(base)  # the base's model: no expert head (`score.weight`)
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])  # base-only: copied
    for n in base:
        if not n.startswith("model."):
            continue
        by_hand = base[n].clone()
        for k in range(2):
            weight = lam[k] if granularity == "task" else lam[k][n]
            by_hand += weight * (experts[k][n] - base[n])
        assert torch.allclose(got[n], by_hand, rtol=0, atol=1e-6), n
    if granularity == "task":
        assert [m["parameters"]["weight"] for m in recipe["models"]] == lam
    merged = load_file(str(merged_dir / "model.safetensors"))  # --merged = `splice merge`
    assert set(merged) == set(got) and all(torch.equal(merged[n], got[n]) for n in got)


def test_a_head_the_base_shares_keeps_the_base_value(tmp_path, capsys):
    """A classifier base with the experts' head name and shape: its head gets weight 0 (the
    written recipe merges only the backbone)."""
    base = save_tiny_llama_classifier_folder(tmp_path / "base", seed=0)
    bw = load_file(str(base / "model.safetensors"))
    models = []
    for i in range(2):
        e = _expert(tmp_path, i, bw, ("neg", "pos"))
        (tmp_path / f"t{i}.jsonl").write_text(json.dumps({"text": TEXTS[i]}) + "\n")
        models.append({"model": str(e), "data": str(tmp_path / f"t{i}.jsonl")})
    recipe = _recipe(tmp_path / "r.yaml", base, models)
    out = tmp_path / "l.yaml"
    argv = ["search", str(recipe), "--objective", "adamerging", "--out", str(out)]
    assert main([*argv, "--granularity", "task", "--steps", "2", "--quiet"]) == 0
    weight = yaml.safe_load(out.read_text())["models"][0]["parameters"]["weight"]
    assert weight[0] == {"filter": "re:^(?:score\\.weight)$", "value": 0.0}
    assert main(["merge", str(out), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert torch.equal(got["score.weight"], bw["score.weight"])


@pytest.fixture(scope="module")
def odd(pool) -> dict[str, Path]:
    """Folders for the error cases: a causal LM 'expert', a Qwen2 classifier, a Llama
    classifier of another width, an expert missing a backbone tensor, bad data files."""
    from transformers import (
        LlamaForSequenceClassification,
        Qwen2Config,
        Qwen2ForSequenceClassification,
    )

    root = pool["root"] / "odd"
    root.mkdir()
    out = {"lm": save_tiny_llama_folder(root / "lm", seed=1)}
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 64, "pad_token_id": 0}
    qwen = Qwen2Config(**sizes, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForSequenceClassification(qwen).save_pretrained(root / "qwen")
    out["qwen"] = root / "qwen"
    wide = tiny_llama_config(intermediate_size=48, pad_token_id=0, num_labels=2)
    LlamaForSequenceClassification(wide).save_pretrained(root / "wide")
    out["wide"] = root / "wide"
    cut = root / "cut"
    cut.mkdir()
    w = load_file(str(pool["e0"] / "model.safetensors"))
    del w["model.norm.weight"]
    save_file(w, str(cut / "model.safetensors"), metadata={"format": "pt"})
    (cut / "config.json").write_text((pool["e0"] / "config.json").read_text())
    out["cut"] = cut
    out["cls_base"] = save_tiny_llama_classifier_folder(root / "cls_base", seed=0)
    w = load_file(str(pool["base"] / "model.safetensors"))
    for name, keep in (("bare", "model."), ("bare_lm", "")):
        # a bare backbone: the base's `model.` tensors without the prefix (bare_lm: and the
        # lm_head, a tensor the experts lack)
        folder = root / name
        folder.mkdir()
        tensors = {n.removeprefix("model."): t for n, t in w.items() if n.startswith(keep)}
        tensors["position_ids"] = torch.arange(16)[None]  # an integer buffer: not compared
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((pool["base"] / "config.json").read_text())
        out[name] = folder
    half = root / "half"  # `model.norm.weight` bare, the other backbone tensors prefixed
    half.mkdir()
    names = {n: "norm.weight" if n == "model.norm.weight" else n for n in w}
    save_file({names[n]: t for n, t in w.items()}, str(half / "model.safetensors"))
    (half / "config.json").write_text((pool["base"] / "config.json").read_text())
    out["half"] = half
    (root / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}))
    out["empty"] = root / "empty.jsonl"
    return out


def _bad_recipe(pool, odd, case: str) -> Path:
    d0 = {"source": str(pool["d0"])}
    good = [{"model": str(pool["e0"]), "data": d0}, {"model": str(pool["e1"]), "data": d0}]
    second = {
        "no-data": {"model": str(pool["e1"])},
        "no-text": {"model": str(pool["e1"]), "data": str(odd["empty"])},
        "not-classifier": {"model": str(odd["lm"]), "data": d0},
        "architecture": {"model": str(odd["qwen"]), "data": d0},
        "shape": {"model": str(odd["wide"]), "data": d0},
        "names": {"model": str(odd["cut"]), "data": d0},
        "prefix": {"model": str(pool["e1"]), "data": d0, "tensor_prefix": "model."},
    }.get(case)
    models = [good[0], second] if second else good
    extra = {"method": "ties"} if case == "method" else {}
    bases = {"head-clash": "cls_base", "half-bare-base": "half", "bare-extra": "bare_lm"}
    base = odd[bases[case]] if case in bases else pool["base"]
    return _recipe(pool["root"] / f"bad-{case}.yaml", base, models, **extra)


@pytest.mark.parametrize(
    ("case", "flags", "message"),
    [
        ("no-data", [], "AdaMerging needs `data:` on every model"),
        ("no-text", [], "no unlabeled text"),
        ("not-classifier", [], "not a sequence classifier"),
        ("architecture", [], "model_type 'qwen2'"),
        ("shape", [], "has shape [32, 48], the base [32, 64]"),
        ("names", [], "backbone tensors differ"),
        ("prefix", [], "tensor_prefix cannot be combined with `statistics:` / `data:`"),
        ("half-bare-base", [], "names some backbone tensors with the experts' 'model.' prefix"),
        ("bare-extra", [], "experts lack, e.g. ['lm_head.weight'] (1 in all) (a bare backbone"),
        ("method", [], "`method: task_arithmetic`"),
        # a classifier base whose 2-label head clashes with expert 1's 3 labels
        ("head-clash", [], "could not run the learned recipe: shape mismatch for tensor 'score"),
        ("good", ["--steps", "0"], "--steps = 0"),
        ("good", ["--lr", "nan"], "--lr"),
        ("good", ["--lr", "-1"], "--lr = -1"),
        ("good", ["--lr", "inf"], "--lr"),
        ("good", ["--granularity", "block"], "--granularity must be 'task' or 'layer'"),
        ("good", ["--data", "x.txt"], "--data applies to --objective lm-loss"),
        ("good", ["--budget", "3"], "--budget applies to --objective lm-loss"),
    ],
)
def test_errors_before_any_training_write_nothing(
    pool, odd, tmp_path, capsys, monkeypatch, case, flags, message
):
    import splice.train.adamerging as ada
    import splice.train.models as models

    def never(*a, **k):
        raise AssertionError("a model was loaded or trained")

    monkeypatch.setattr(ada, "adamerging", never)
    monkeypatch.setattr(models, "load_for_task", never)
    recipe = _bad_recipe(pool, odd, case)
    out, merged = tmp_path / "l.yaml", tmp_path / "m"
    argv = ["search", str(recipe), "--objective", "adamerging", "--out", str(out)]
    err = fails_cleanly([*argv, "--merged", str(merged), "--quiet", *flags], capsys)
    assert message in err, err
    no_output(out, merged)


def test_existing_outputs_are_refused_before_training(pool, tmp_path, capsys, monkeypatch):
    import splice.train.models as models

    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_for_task", never)
    out, merged = tmp_path / "l.yaml", tmp_path / "m"
    argv = ["search", str(pool["recipe"]), "--objective", "adamerging", "--out", str(out)]
    out.write_text("mine")
    assert "exists" in fails_cleanly([*argv, "--quiet"], capsys)
    out.unlink()
    merged.mkdir()
    (merged / "keep.txt").write_text("mine")
    assert "already exists" in fails_cleanly([*argv, "--merged", str(merged)], capsys)
    assert not out.exists() and (merged / "keep.txt").read_text() == "mine"


def test_lm_loss_flags_keep_their_defaults_and_refuse_adamerging_ones(pool, capsys):
    argv = ["search", str(pool["recipe"]), "--out", str(pool["root"] / "x.yaml")]
    assert "--steps applies to --objective adamerging" in fails_cleanly(
        [*argv, "--data", str(pool["d0"]), "--steps", "3"], capsys
    )
    assert "needs --data FILE" in fails_cleanly(argv, capsys)


def test_experts_are_read_from_their_files_not_held(pool, monkeypatch):
    """AdaMerging gets each expert's backbone as a `FileState` (read per lookup, nothing
    kept), whose values are the file's; the readers are closed afterwards."""
    import splice.train.adamerging as ada
    from splice.train import adamerging_recipe as ar

    seen = {}
    real = ada.adamerging

    def spy(base, experts, *a, **k):
        seen["experts"] = experts
        e0 = experts[0]
        assert isinstance(e0, ar.FileState) and not isinstance(e0, dict)
        stored = load_file(str(pool["e0"] / "model.safetensors"))
        first = e0.names[0]
        a1, a2 = e0[first], e0[first]
        assert torch.equal(a1, stored[first]) and a1.data_ptr() != a2.data_ptr()  # fresh reads
        assert "score.weight" not in e0 and set(e0) == {n for n in stored if n[:6] == "model."}
        return real(base, experts, *a, **k)

    monkeypatch.setattr(ada, "adamerging", spy)
    prepared = ar.prepare(pool["recipe"])
    ar.learn(prepared, granularity="task", steps=1, batches_per_step=1, progress=False)
    with pytest.raises(SpliceError, match="after close"):
        seen["experts"][0][seen["experts"][0].names[0]]
