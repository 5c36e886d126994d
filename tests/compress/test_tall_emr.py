"""TALL-mask and EMR compression / restore on hand-computed safetensors checkpoints."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.cli import main
from splice.compress import Manifest, compress, restore
from splice.errors import CheckpointError, MergeValidationError


def write(path, w, b):
    save_file({"w": torch.tensor(w), "b": torch.tensor(b), "ids": torch.arange(3)}, str(path))
    return str(path)


@pytest.fixture
def ckpts(tmp_path):
    """Base 0; three fine-tuned models with task vectors (w, b) as below."""
    base = write(tmp_path / "base.safetensors", [0.0] * 4, [0.0, 0.0])
    models = [
        write(tmp_path / "t1.safetensors", [1.0, 0.2, 3.0, -1.0], [1.0, 1.0]),
        write(tmp_path / "t2.safetensors", [1.0, 0.2, -1.0, 1.0], [1.0, 1.0]),
        write(tmp_path / "t3.safetensors", [0.0, 0.1, -1.0, 0.5], [-1.0, 0.0]),
    ]
    return base, models


def restored(folder, task, out):
    restore(folder, task, out)
    return load_file(str(out / "model.safetensors"))


def test_tall_masks_and_restore(ckpts, tmp_path):
    base, models = ckpts
    report = compress("tall", base, models, tmp_path / "c", params={"lambda": 0.5})
    # w: tau_MTL [2,.5,1,.5]; masks (see test_consensus) m1 [TTTT], m2 [TTFT], m3 [FFFT]
    # b: tau_MTL [1,2]; m_t = |tau_t| > .5 |tau_MTL - tau_t|:
    #    m1: [1,1] > .5*[0,1] -> [T,T];  m2 the same;  m3: [1,0] > .5*[2,2] -> [F,F]
    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    torch.testing.assert_close(stored["w"], torch.tensor([2.0, 0.5, 1.0, 0.5]))
    assert stored["__mask__.w"].tolist() == [[0b11110000], [0b11010000], [0b00010000]]
    assert stored["__mask__.b"].tolist() == [[0b11000000], [0b11000000], [0]]
    assert "ids" not in stored and "__mask__.ids" not in stored
    manifest = Manifest.load(tmp_path / "c")
    assert manifest.tasks == ["t1", "t2", "t3"] and manifest.scales == [1.0, 1.0, 1.0]
    assert report.tensors == 2 and report.bytes_written == 6 * 4 + 6

    # theta_t = base + m_t * tau_MTL
    t2 = restored(tmp_path / "c", "t2", tmp_path / "r2")
    torch.testing.assert_close(t2["w"], torch.tensor([2.0, 0.5, 0.0, 0.5]))
    torch.testing.assert_close(t2["b"], torch.tensor([1.0, 2.0]))
    assert torch.equal(t2["ids"], torch.arange(3))
    t3 = restored(tmp_path / "c", "2", tmp_path / "r3")  # by index
    torch.testing.assert_close(t3["w"], torch.tensor([0.0, 0.0, 0.0, 0.5]))
    torch.testing.assert_close(t3["b"], torch.tensor([0.0, 0.0]))


def test_tall_per_model_lambda(ckpts, tmp_path):
    base, models = ckpts
    compress("tall", base, models, tmp_path / "c", params={"lambda": [0.5, 0.5, 0.0]})
    # lambda 0: m3 = |tau_3| > 0 -> w [F,T,T,T], b [T,F]
    t3 = restored(tmp_path / "c", "t3", tmp_path / "r")
    torch.testing.assert_close(t3["w"], torch.tensor([0.0, 0.5, 1.0, 0.5]))
    torch.testing.assert_close(t3["b"], torch.tensor([1.0, 0.0]))


def test_emr_whole_model_rescalers(ckpts, tmp_path):
    base, models = ckpts
    compress("emr", base, models, tmp_path / "c")
    # w: tau_uni [2,.5,3,1]?  sums [2,.5,1,.5] -> all +; agreeing maxima [1, .2, 3, 1]
    #    M1 [T,T,T,F], M2 [T,T,F,T], M3 [F,T,F,T] -> tau_uni = [1, .2, 3, 1]
    # b: sums [1,2] -> +; M1 [T,T], M2 [T,T], M3 [F,F]; tau_uni = [1, 1]
    # lambda_t = (mean|tau_t,w| + mean|tau_t,b|) / (mean|M_t tau_uni,w| + mean|M_t tau_uni,b|)
    #   t1: (5.2/4 + 1) / (4.2/4 + 1) = 2.3 / 2.05
    #   t2: (3.2/4 + 1) / (2.2/4 + 1) = 1.8 / 1.55
    #   t3: (1.6/4 + .5) / (1.2/4 + 0) = 0.9 / 0.3 = 3
    manifest = Manifest.load(tmp_path / "c")
    assert manifest.method == "emr"
    torch.testing.assert_close(
        torch.tensor(manifest.scales), torch.tensor([2.3 / 2.05, 1.8 / 1.55, 3.0])
    )
    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    torch.testing.assert_close(stored["w"], torch.tensor([1.0, 0.2, 3.0, 1.0]))
    # theta_3 = base + 3 * M3 * tau_uni
    t3 = restored(tmp_path / "c", "t3", tmp_path / "r")
    torch.testing.assert_close(t3["w"], torch.tensor([0.0, 0.6, 0.0, 3.0]))
    torch.testing.assert_close(t3["b"], torch.tensor([0.0, 0.0]))


def test_bad_inputs(ckpts, tmp_path):
    base, models = ckpts
    with pytest.raises(MergeValidationError, match="at least 2"):
        compress("tall", base, models[:1], tmp_path / "c")
    with pytest.raises(MergeValidationError, match="2 values of 'lambda' for 3 models"):
        compress("tall", base, models, tmp_path / "c", params={"lambda": [0.1, 0.2]})
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(4), "b": torch.zeros(3), "ids": torch.arange(3)}, str(odd))
    with pytest.raises(MergeValidationError, match="'b' has shape"):
        compress("emr", base, [*models, str(odd)], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    compress("tall", base, models, tmp_path / "c")
    with pytest.raises(CheckpointError, match="no task 'x'"):
        restore(tmp_path / "c", "x", tmp_path / "r")
    with pytest.raises(CheckpointError, match="exists"):
        compress("tall", base, models, tmp_path / "c")


def test_cli_round_trip_on_a_tiny_hf_model(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(cfg)
    model.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(tmp_path / f"ft{i}")
        paths.append(str(tmp_path / f"ft{i}"))
    base = str(tmp_path / "base")
    args = ["compress", "tall", "--base", base, "--models", *paths, "--out", str(tmp_path / "c")]
    assert main([*args, "--lambda", "0.3"]) == 0
    assert "compressed 3 models" in capsys.readouterr().out
    assert (
        main(["restore", str(tmp_path / "c"), "--task", "ft1", "--out", str(tmp_path / "r")]) == 0
    )
    assert (tmp_path / "r" / "config.json").is_file()
    back = transformers.BertModel.from_pretrained(tmp_path / "r")
    # the restored model is base + m_1 * tau_MTL, with m_1 recomputed here
    b = load_file(str(tmp_path / "base" / "model.safetensors"))
    fts = [load_file(f"{p}/model.safetensors") for p in paths]
    name = "encoder.layer.0.attention.self.query.weight"
    taus = [f[name] - b[name] for f in fts]
    total = taus[0] + taus[1] + taus[2]
    mask = taus[1].abs() > 0.3 * (total - taus[1]).abs()
    got = back.state_dict()[name]
    torch.testing.assert_close(got, b[name] + mask * total, atol=1e-6, rtol=0)
    assert (
        main(["compress", "emr", "--base", base, "--models", *paths, "--out", str(tmp_path / "e")])
        == 0
    )
    assert main(["restore", str(tmp_path / "e"), "--task", "0", "--out", str(tmp_path / "re")]) == 0
    assert main(["restore", str(tmp_path / "e"), "--task", "9", "--out", str(tmp_path / "x")]) == 1
