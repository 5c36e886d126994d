import pytest
import torch

from splice.compress.packed import Manifest, pack_masks, packed_width, unpack_mask
from splice.errors import CheckpointError


def test_pack_is_numpy_packbits_high_bit_first():
    masks = [
        torch.tensor([True, True, True, True]),  # 1111 0000 = 240
        torch.tensor([True, True, False, True]),  # 1101 0000 = 208
        torch.tensor([False, False, False, True]),  # 0001 0000 = 16
    ]
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[240], [208], [16]]
    for t, m in enumerate(masks):
        assert torch.equal(unpack_mask(packed, t, (4,)), m)


def test_round_trip_odd_sizes_and_shapes():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (17,), (2, 3, 4), (0,)]:
        masks = [torch.rand(shape, generator=g) > 0.5 for _ in range(3)]
        packed = pack_masks(masks)
        n = masks[0].numel()
        assert packed.shape == (3, packed_width(n)) == (3, (n + 7) // 8)
        for t, m in enumerate(masks):
            assert torch.equal(unpack_mask(packed, t, shape), m)


def test_manifest_round_trip_and_task_lookup(tmp_path):
    m = Manifest(method="tall", tasks=["a", "b"], scales=[1.0, 1.0], base="/x")
    (tmp_path / "splice_compress.json").write_bytes(m.to_json())
    loaded = Manifest.load(tmp_path)
    assert loaded == m
    assert loaded.task_index("b") == 1 and loaded.task_index("0") == 0
    with pytest.raises(CheckpointError, match=r"no task 'c'.*0=a, 1=b"):
        loaded.task_index("c")
    with pytest.raises(CheckpointError, match="no task '2'"):
        loaded.task_index("2")


def test_manifest_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a compressed folder"):
        Manifest.load(tmp_path)
    (tmp_path / "splice_compress.json").write_text('{"method": "tall"}')
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        Manifest.load(tmp_path)
