"""`splice.io.finite`: the NaN / ±inf checks where tensors enter (FiniteReader through
`open_checkpoint(check_finite=True)`) and leave (`ShardedWriter.write`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from splice.errors import CheckpointError, MergeValidationError
from splice.io import SafetensorsReader, ShardedWriter, TensorInfo, plan_shards
from splice.io.finite import (
    FiniteReader,
    NonFiniteError,
    all_finite,
    check_output,
    describe_nonfinite,
    numerical_errors,
)
from splice.reference import open_checkpoint

NAN, INF = float("nan"), float("inf")
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FLOATS + FLOAT8)
def test_all_finite_every_float_dtype(dtype):
    t = torch.linspace(-2, 2, 1000).to(dtype)
    assert all_finite(t)
    for pos in (0, 517, 999):  # first, middle, last: the reduction sees every element
        bad = t.clone()
        bad[pos] = NAN
        assert not all_finite(bad)
        assert describe_nonfinite(bad) == "1 non-finite value (1 NaN)"
    if dtype not in (torch.float8_e4m3fn,):  # e4m3fn has no inf
        bad = t.clone()
        bad[3], bad[4] = INF, -INF
        assert not all_finite(bad)
        assert describe_nonfinite(bad) == "2 non-finite values (2 inf)"


def test_all_finite_ignores_non_float_and_empty():
    assert all_finite(torch.arange(5))
    assert all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.empty(0, 4))
    mixed = torch.tensor([NAN, INF, 1.0, NAN])
    assert describe_nonfinite(mixed) == "3 non-finite values (2 NaN, 1 inf)"


def test_finite_reader_names_tensor_and_source(tmp_path):
    f = tmp_path / "m.safetensors"
    tensors = {"ok": torch.ones(3), "bad": torch.tensor([1.0, NAN, -INF]), "ids": torch.arange(3)}
    save_file(tensors, str(f))
    plain = open_checkpoint(str(f))
    assert isinstance(plain, SafetensorsReader)  # the default: the format's own reader
    assert plain.read("bad").isnan().sum() == 1  # (what `splice inspect` uses)
    r = open_checkpoint(str(f), check_finite=True)
    assert isinstance(r, FiniteReader)
    assert r.names() == plain.names() and r.info("bad") == plain.info("bad")
    assert r.path == plain.path
    torch.testing.assert_close(r.read("ok"), torch.ones(3))
    assert r.read("ids").tolist() == [0, 1, 2]
    with pytest.raises(NonFiniteError) as e:
        r.read("bad")
    assert str(e.value) == (
        f"{f}: tensor 'bad' has 2 non-finite values (1 NaN, 1 inf); "
        "pass --allow-nonfinite to use them anyway"
    )
    assert isinstance(e.value, CheckpointError)
    r.close()
    plain.close()


def _writer(tmp_path, tensors):
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    return ShardedWriter(tmp_path / "out", plan_shards(infos, 10**6), {})


def test_writer_refuses_nonfinite_output_unless_allowed(tmp_path):
    tensors = {
        "a": torch.tensor([1.0, NAN]),
        "b": torch.tensor([7e4, 1.0]).to(torch.float16),  # overflow: inf
        "c": torch.tensor([INF], dtype=torch.bfloat16),
    }
    w = _writer(tmp_path, tensors)
    with pytest.raises(NonFiniteError) as e:
        w.write("a", tensors["a"])
    assert str(e.value) == (
        "output tensor 'a' has 1 non-finite value (1 NaN) in float32; "
        "pass --allow-nonfinite to write them anyway"
    )
    with pytest.raises(NonFiniteError) as e:
        w.write("b", tensors["b"])
    assert "'b' has 1 non-finite value (1 inf) in float16, whose range is ±65504 (larger " in (
        str(e.value)
    )
    with pytest.raises(NonFiniteError, match=r"in bfloat16, whose range is ±3\.38953e\+38"):
        w.write("c", tensors["c"])
    for n, t in tensors.items():  # nothing was written above: each can still be written once
        w.write(n, t, allow_nonfinite=True)
    out = w.finalize()
    from safetensors.torch import load_file

    got = load_file(str(next(out.glob("*.safetensors"))))
    assert got["a"].isnan().tolist() == [False, True] and got["b"].isinf().tolist() == [True, False]


def test_numerical_errors_names_the_tensor():
    match = r"^tensor 'x': linalg\.svd.*non-finite"
    with pytest.raises(MergeValidationError, match=match), numerical_errors("tensor 'x'"):
        torch.linalg.svd(torch.full((3, 3), NAN))
    with numerical_errors("tensor 'x'"):  # no error: nothing happens
        pass
    with pytest.raises(ValueError, match="not ours"), numerical_errors("tensor 'x'"):
        raise ValueError("not ours")  # other errors pass unchanged


def test_check_output_passes_finite_tensors():
    check_output(torch.tensor([65504.0], dtype=torch.float16), "max")
    check_output(torch.arange(3), "ints")
