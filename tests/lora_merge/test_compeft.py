"""ComPEFT: top-k sparsification + ternary sign × α·σ, sizes and errors, on a PEFT adapter."""

import math

import pytest
import torch
from lora_test_util import load_peft, make_adapter

from splice.compress.compeft import (
    compeft_adapter,
    compeft_bits,
    compeft_compress,
    relative_error,
)
from splice.compress.registry import get_compression_method
from splice.errors import MergeValidationError
from splice.peft import read_lora_adapters


def test_compress_hand_computed():
    # Δ = [4, -3, 0.5, -0.2]; density 0.5 keeps 4 and -3.
    # σ (Bessel): mean 0.325; squared deviations 13.505625 + 11.055625 + 0.030625 + 0.275625
    # = 24.8675; / 3 = 8.2891667; √ = 2.879091. α = 1 -> Δ̂ = [σ, -σ, 0, 0].
    d = torch.tensor([4.0, -3.0, 0.5, -0.2])
    c = compeft_compress(d, 0.5)
    sigma = math.sqrt(24.8675 / 3)
    assert c.signs.tolist() == [1, -1, 0, 0] and c.signs.dtype == torch.int8
    assert c.gamma == pytest.approx(sigma, rel=1e-6)
    torch.testing.assert_close(c.to_dense(), torch.tensor([sigma, -sigma, 0, 0]))
    # α = 2 doubles the scale
    assert compeft_compress(d, 0.5, alpha=2.0).gamma == pytest.approx(2 * sigma, rel=1e-6)
    # official-code variant: σ of the sparsified Δ = std([4, -3, 0, 0]):
    # mean .25, sq. dev. 14.0625 + 10.5625 + .0625 + .0625 = 24.75, /3 = 8.25 -> 2.872281
    assert compeft_compress(d, 0.5, std_of="sparse").gamma == pytest.approx(8.25**0.5, rel=1e-6)
    # sizes: n=4, k=2: dense 4·32; 2-bit 8 + 32; entropy 4·H(.5) + 2 + 32 = 38
    assert compeft_bits(c, 32) == {"dense": 128.0, "ternary_2bit": 40.0, "entropy": 38.0}
    # error ‖[4-σ, -3+σ, .5, -.2]‖ / ‖Δ‖
    want = math.sqrt((4 - sigma) ** 2 + (sigma - 3) ** 2 + 0.25 + 0.04) / math.sqrt(25.29)
    assert relative_error(d, c.to_dense()) == pytest.approx(want, rel=1e-6)


def test_bad_parameters(tmp_path):
    method = get_compression_method("compeft")
    with pytest.raises(MergeValidationError, match=r"'density' = 1\.5 is invalid: Input should be"):
        method.resolve({"density": 1.5}, 1)
    with pytest.raises(MergeValidationError, match="'alpha' = 0 is invalid: Input should be gre"):
        method.resolve({"density": 0.5, "alpha": 0}, 1)
    with pytest.raises(MergeValidationError, match="'std_of' = 'dense' is invalid"):
        compeft_adapter(tmp_path / "missing", tmp_path / "o", density=0.5, std_of="dense")
    assert not (tmp_path / "o").exists()


def test_compeft_adapter_loads_in_peft(tmp_path):
    ad = make_adapter(tmp_path / "a", seed=1)
    entries, errors = compeft_adapter(ad, tmp_path / "c", density=0.25)
    assert all(e.nnz == round(0.25 * e.numel) for e in entries)
    assert all(e.bits["entropy"] < e.bits["dense"] / 10 for e in entries)
    assert all(0 < err < 1.5 for err in errors.values())
    out = read_lora_adapters([tmp_path / "c"])[0]
    for f in out.modules.values():
        b_vals = set(f.b.unique().abs().tolist())
        assert len(b_vals - {0.0}) == 1  # ternary B (scale folded in): one magnitude
    load_peft(tmp_path / "c")  # PEFT loads it
