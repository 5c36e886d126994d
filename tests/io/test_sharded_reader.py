import json

import pytest
import torch
from io_test_util import write_tensors

from splice.errors import CheckpointError
from splice.io import ShardedReader
from splice.reference import open_checkpoint


def _sharded(folder, kind="safetensors"):
    shard_a = {"model.embed.weight": torch.randn(4, 3), "model.l0.weight": torch.randn(3, 3)}
    shard_b = {"model.l1.weight": torch.randn(3, 3), "lm_head.weight": torch.randn(4, 3)}
    folder.mkdir(exist_ok=True)
    if kind == "safetensors":
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        write_tensors(folder / names[0], shard_a)
        write_tensors(folder / names[1], shard_b)
        index = folder / "model.safetensors.index.json"
    else:
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        torch.save(shard_a, folder / names[0])
        torch.save(shard_b, folder / names[1])
        index = folder / "pytorch_model.bin.index.json"
    weight_map = {n: names[0] for n in shard_a} | {n: names[1] for n in shard_b}
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, shard_a | shard_b


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_reads_all_shards(tmp_path, kind):
    index, tensors = _sharded(tmp_path / "m", kind)
    for r in (ShardedReader(index), open_checkpoint(str(tmp_path / "m"))):
        assert r.names() == list(tensors)
        for n, t in tensors.items():
            assert r.info(n).shape == tuple(t.shape)
            assert torch.equal(r.read(n), t)
        r.close()


def test_missing_shard(tmp_path):
    index, _ = _sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: lists shard 'model-00002-of-00002\.safetensors', which does not exist",
    ):
        ShardedReader(index)


def test_tensor_not_in_its_shard(tmp_path):
    index, _ = _sharded(tmp_path / "m")
    data = json.loads(index.read_text())
    data["weight_map"]["model.l1.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.l1.weight' is mapped to shard 'model-00001-of-00002.safetensors', "
        "but that shard does not contain it",
    ):
        ShardedReader(index)


def test_bad_index_json(tmp_path):
    index, _ = _sharded(tmp_path / "m")
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ShardedReader(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        ShardedReader(index)


def test_index_path_traversal_refused(tmp_path):
    index, _ = _sharded(tmp_path / "m")
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        ShardedReader(index)


def test_corrupt_shard_reported_at_open(tmp_path):
    index, _ = _sharded(tmp_path / "m")
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*truncated"):
        ShardedReader(index)
