"""`BASE+ADAPTER` with a PEFT LoRA / DoRA on Conv2d (3×3 and 1×1 kernels) and Conv1d against
PEFT's own ``merge_and_unload``, and the reader's typed delta for a conv module."""

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from splice.delta import Folded, LowRank
from splice.errors import CheckpointError, MergeValidationError
from splice.io import SafetensorsReader
from splice.peft import LoraFoldedReader
from splice.peft.lora_reader import LoraFolder, read_lora_adapter

peft = pytest.importorskip("peft")


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.point = nn.Conv2d(4, 5, 1)
        self.line = nn.Conv1d(5, 3, 2)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(self.conv(x).relu()).mean(3)
        return self.head(self.line(h).mean(2))


def _build(tmp_path, use_dora=False):
    """(base file, adapter dir, PEFT's merged state dict)."""
    torch.manual_seed(0)
    model = TinyConvNet()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["conv", "point", "line"], use_dora=use_dora
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(tmp_path / "adapter")
        want = pm.merge_and_unload().state_dict()
    return base, tmp_path / "adapter", want


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv2d_lora_fold_matches_peft(tmp_path, use_dora):
    base, ad, want = _build(tmp_path, use_dora)
    reader = LoraFoldedReader(SafetensorsReader(base), ad)
    changed = [n for n in reader.names() if reader.is_modified(n)]
    assert sorted(changed) == ["conv.weight", "line.weight", "point.weight"]
    before = SafetensorsReader(base)
    for name in reader.names():
        got = reader.read(name)
        assert got.shape == want[name].shape and got.dtype == want[name].dtype
        if name in changed:
            assert (got - before.read(name)).abs().max() > 1e-2  # the fold did something
        # PEFT forms a k×k kernel's ΔW with a convolution, the 1×1 one with a matmul
        torch.testing.assert_close(got, want[name], atol=1e-6, rtol=0, msg=name)
    assert torch.equal(reader.read("point.weight"), want["point.weight"]) or use_dora
    reader.close()
    before.close()


def test_conv2d_reader_delta_is_reshaped_low_rank(tmp_path):
    _, ad, _ = _build(tmp_path)
    folder = LoraFolder.open(ad)
    delta = folder.delta("conv")
    assert isinstance(delta, LowRank) and delta.weight_shape == (4, 3, 3, 3)
    assert delta.b.shape == (4, 2) and delta.a.shape == (2, 27) and delta.scaling == 3.0
    b = folder.weights.read("base_model.model.conv.lora_B.weight")  # 4×2×1×1
    a = folder.weights.read("base_model.model.conv.lora_A.weight")  # 2×3×3×3
    want = 3.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(delta.to_dense(), want, atol=1e-6, rtol=0)
    assert folder.delta_shape("point") == (5, 4, 1, 1)
    folder.close()


def test_conv2d_dora_reader_delta(tmp_path):
    _, ad, _ = _build(tmp_path, use_dora=True)
    folder = LoraFolder.open(ad)
    delta = folder.delta("point")
    assert isinstance(delta, Folded) and delta.shape == (5, 4, 1, 1)
    assert delta.params["b"].shape == (5, 2) and delta.params["a"].shape == (2, 4)
    folder.close()


def test_conv2d_lora_is_refused_by_the_lora_native_merges(tmp_path):
    _, ad, _ = _build(tmp_path)
    with pytest.raises(MergeValidationError, match="'conv' is a convolution LoRA"):
        read_lora_adapter(ad)


def test_conv2d_lora_kernel_mismatch(tmp_path):
    base, ad, _ = _build(tmp_path)
    torch.manual_seed(0)
    other = TinyConvNet()
    other.conv = nn.Conv2d(3, 4, 5, padding=2)  # a 5×5 kernel where the adapter has 3×3
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, base)
    with pytest.raises(CheckpointError, match=r"'conv.weight'.* is \[4, 3, 3, 3\], the base"):
        LoraFoldedReader(SafetensorsReader(base), ad)
