"""LoRA extraction from a full fine-tune: hand-computed spectra and a PEFT round trip."""

import pytest
import torch
from lora_test_util import load_peft, tiny_llama

from splice.errors import CheckpointError, MergeValidationError
from splice.lora_merge.extract import extract_lora, lowrank_delta


def test_energy_threshold_hand_computed():
    # ΔW = diag(3, 1, 0): σ² = 9, 1; total 10. energy 0.9 -> k=1 (9/10), error 1/√10;
    # energy 0.95 -> k=2, exact.
    d = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    f, err = lowrank_delta(d, energy=0.9)
    assert f.rank == 1 and err == pytest.approx(10**-0.5, rel=1e-6)
    torch.testing.assert_close(f.to_dense(), torch.diag(torch.tensor([3.0, 0, 0])))
    f, err = lowrank_delta(d, energy=0.95)
    assert f.rank == 2 and err == pytest.approx(0, abs=1e-7)
    f, err = lowrank_delta(d, energy=0.95, max_rank=1)  # capped
    assert f.rank == 1


def test_rank_mode_is_seeded_and_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    f, err = lowrank_delta(d, rank=3, seed=5)
    assert f.rank == 3 and err < 1e-5
    state = torch.get_rng_state()
    f1, _ = lowrank_delta(d + torch.randn(30, 20, generator=g), rank=2, seed=5)
    f2, _ = lowrank_delta(d + 0, rank=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert f1.rank == f2.rank == 2


def _fine_tune(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    ft = tiny_llama()
    g = torch.Generator().manual_seed(1)
    sd = ft.state_dict()
    planted = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = sd[name]
        delta = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
        planted[name] = delta * 0.05
    with torch.no_grad():
        for name, delta in planted.items():
            sd[name].add_(delta)
        sd["model.norm.weight"].add_(0.1)  # 1-D: skipped
        sd["model.embed_tokens.weight"].add_(0.01)  # embedding: excluded by default
    ft.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft", planted


def test_extract_round_trips_through_peft(tmp_path):
    base, ft, planted = _fine_tune(tmp_path)
    report = extract_lora(base, ft, tmp_path / "lora", rank=4)
    got = {t.name: t for t in report.tensors}
    assert set(got) == set(planted)
    assert all(t.rank == 4 and t.rel_error < 1e-5 for t in got.values())
    skipped = dict(report.skipped)
    assert "model.norm.weight" in skipped and "excluded" in skipped["model.embed_tokens.weight"]
    merged = load_peft(tmp_path / "lora").merge_and_unload().state_dict()
    want = tiny_llama().state_dict()
    for name, delta in planted.items():
        torch.testing.assert_close(merged[name], want[name] + delta, atol=1e-5, rtol=0)
    # energy mode picks rank 2 for a rank-2 delta
    report = extract_lora(base, ft, tmp_path / "lora_e", energy=0.999)
    assert {t.rank for t in report.tensors} == {2}


def test_extract_errors(tmp_path):
    base, ft, _ = _fine_tune(tmp_path)
    with pytest.raises(MergeValidationError, match="exactly one"):
        extract_lora(base, ft, tmp_path / "x")
    with pytest.raises(MergeValidationError, match="energy"):
        extract_lora(base, ft, tmp_path / "x", energy=1.5)
    with pytest.raises(MergeValidationError, match="no 2-D weight differs"):
        extract_lora(base, base, tmp_path / "x", rank=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        extract_lora(base, ft, tmp_path / "taken", rank=2)
