"""The OPCM streaming driver on tiny HF folders, against an in-memory transcription of the
reference loop (FusionBench OPCMForCLIP.run)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from splice.engine.continual import STATE_FILE, opcm_add
from splice.errors import CheckpointError, MergeValidationError
from splice.reference import open_checkpoint

SHAPES = {
    "model.embed_tokens.weight": (6, 3),
    "model.layers.0.mlp.up_proj.weight": (4, 3),
    "model.layers.0.self_attn.o_proj.weight": (3, 3),
    "model.layers.0.input_layernorm.weight": (3,),
}


def tensors(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}
    out["model.position_ids"] = torch.arange(4)
    return out


def folder(path, t):
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(path)


def load(path):
    r = open_checkpoint(str(path))
    try:
        return {n: r.read(n) for n in r.names()}
    finally:
        r.close()


def reference(base, models, alpha):
    """FusionBench's loop, on float64 state dicts."""
    base = {n: t.double() for n, t in base.items() if t.is_floating_point()}
    tvs = [{n: m[n].double() - base[n] for n in base} for m in models]

    def norm(tv):
        return torch.cat([t.reshape(-1) for t in tv.values()]).norm().item()

    merged, prev_lambda, norms = dict(tvs[0]), 1.0, [norm(tvs[0])]
    for tv in tvs[1:]:
        norms.append(norm(tv))
        avg = sum(norms) / len(norms)
        new = {}
        for n, prev in merged.items():
            if prev.ndim == 2 and "embed" not in n:
                u, s, vh = torch.linalg.svd(prev, full_matrices=True)
                split = int(((s.cumsum(0) / s.sum()) > alpha).float().argmax())
                p = u.T @ tv[n] @ vh.T
                p.diagonal().fill_(0)
                p[:split, :split] = 0
                new[n] = prev_lambda * prev + u @ p @ vh
            else:
                new[n] = prev_lambda * prev + tv[n]
        total = norm(new)
        prev_lambda = total / avg
        merged = {n: t * (avg / total) for n, t in new.items()}
    return {n: base[n] + t for n, t in merged.items()}, prev_lambda


def test_three_models_match_the_reference_loop(tmp_path):
    base = tensors(0)
    fts = [
        {n: t + tensors(10 + i, 0.3)[n] if t.is_floating_point() else t for n, t in base.items()}
        for i in range(3)
    ]
    b = folder(tmp_path / "base", base)
    refs = [folder(tmp_path / f"ft{i}", ft) for i, ft in enumerate(fts)]
    state = None
    for i, ref in enumerate(refs):
        out = tmp_path / f"state{i}"
        report = opcm_add(b, state, ref, out, alpha=0.5 if i == 0 else None)
        state = str(out)
        assert report.models_merged == i + 1
    expected, lam = reference(base, fts, 0.5)
    got = load(state)
    for n, t in expected.items():
        torch.testing.assert_close(got[n].double(), t, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["model.position_ids"], base["model.position_ids"])
    meta = json.loads((tmp_path / "state2" / STATE_FILE).read_text())
    assert meta["lambda"] == pytest.approx(lam, rel=1e-5)
    assert meta["alpha"] == 0.5 and meta["models"] == refs
    assert (tmp_path / "state2" / "config.json").is_file()


def test_first_model_is_copied(tmp_path):
    base = tensors(0)
    ft = {n: t * 2 for n, t in base.items()}
    b, m = folder(tmp_path / "base", base), folder(tmp_path / "ft", ft)
    opcm_add(b, None, m, tmp_path / "s")
    got = load(tmp_path / "s")
    for n, t in ft.items():
        # float tensors: the model itself; integer buffers are copied from the base
        assert torch.equal(got[n], t if t.is_floating_point() else base[n])
    meta = json.loads((tmp_path / "s" / STATE_FILE).read_text())
    assert meta["lambda"] == 1.0 and len(meta["task_vector_norms"]) == 1


def test_bad_inputs(tmp_path):
    base = tensors(0)
    b = folder(tmp_path / "base", base)
    with pytest.raises(CheckpointError, match="not a continual-merge state"):
        opcm_add(b, b, b, tmp_path / "x")
    wrong = dict(base)
    wrong["model.layers.0.input_layernorm.weight"] = torch.zeros(5)
    w = folder(tmp_path / "wrong", wrong)
    with pytest.raises(MergeValidationError, match=r"shape mismatch.*input_layernorm"):
        opcm_add(b, None, w, tmp_path / "y")
    with pytest.raises(MergeValidationError, match=r"alpha = 2\.0 is invalid"):
        opcm_add(b, None, b, tmp_path / "z", alpha=2.0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError):
        opcm_add(b, None, b, tmp_path / "exists")
