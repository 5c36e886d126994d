"""The one streaming driver: ordered statistic passes, steps writing several outputs, side
and extra files, one names/shapes check; the typed whole-model statistic requests."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import splice
from splice.compress.emr import EmrKernel
from splice.engine.driver import Output, Sources, Stream, passes, side_files, write_stream
from splice.errors import MergeValidationError
from splice.io import TensorInfo
from splice.merge import DepthScale, KeepRule, MergeContext, TopKThreshold


def test_passes_give_results_in_step_order_whatever_finishes_first():
    last_done = threading.Event()

    def fn(i: int) -> int:
        if i == 0:  # the first step finishes last
            assert last_done.wait(10)
        if i == 3:
            last_done.set()
        return i * i

    assert passes(fn, range(4), threads=4) == [0, 1, 4, 9]


def test_a_failing_step_stops_an_inline_pass():
    ran = []

    def fn(i: int) -> int:
        ran.append(i)
        if i == 1:
            raise ValueError("step 1")
        return i

    with pytest.raises(ValueError, match="step 1"):
        passes(fn, range(4))
    assert ran == [0, 1]


def _checkpoint(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text("{}")
    return str(path)


def test_steps_write_several_outputs_then_extra_and_side_files(tmp_path):
    a = _checkpoint(tmp_path / "a", {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([3.0])})
    outputs = [
        TensorInfo("x", (2,), torch.float32),
        TensorInfo("x.twice", (2,), torch.float32),
        TensorInfo("y", (1,), torch.float32),
        TensorInfo("y.twice", (1,), torch.float32),
    ]
    seen: list[str] = []

    def step(i: int) -> list[Output]:
        name = ["x", "y"][i]
        t = src.read(a, name)
        seen.append(name)
        return [Output(name, t), Output(name + ".twice", t * 2)]

    def extra() -> dict[str, bytes]:  # asked after the last step
        return {"steps.json": json.dumps(seen).encode()}

    spec = Stream(
        outputs=outputs,
        metadata={"note": "n"},
        step_outputs=[["x", "x.twice"], ["y", "y.twice"]],
        side_files=side_files(tmp_path / "nowhere", a),  # the first with a model folder
    )
    with Sources.open([a], allow_nonfinite=False) as src:
        report = write_stream(tmp_path / "out", spec, src, step, extra_files=extra)
    out = tmp_path / "out"
    assert (report.tensors, report.skipped, report.bytes_read, report.bytes_written) == (
        2,
        0,
        12,
        24,
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("y.twice").tolist() == [6.0]
        assert f.get_tensor("x.twice").tolist() == [2.0, 4.0]
        assert f.metadata() == {
            "format": "pt",
            "splice_version": splice.__version__,
            "note": "n",
        }
    assert json.loads((out / "steps.json").read_text()) == ["x", "y"]
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'


def test_check_same_tensors_names_the_difference(tmp_path):
    base = _checkpoint(tmp_path / "b", {"w": torch.zeros(2, 3), "v": torch.zeros(3)})
    other = _checkpoint(tmp_path / "o", {"w": torch.zeros(3, 2), "v": torch.zeros(3)})
    fewer = _checkpoint(tmp_path / "f", {"w": torch.zeros(2, 3)})
    with Sources.open([base, other, fewer], allow_nonfinite=False) as src:
        src.check_same_tensors(base, base, "itself")
        with pytest.raises(MergeValidationError, match=r"'w' has shape \[3, 2\] in model o"):
            src.check_same_tensors(base, other, "model o")
        with pytest.raises(MergeValidationError, match="first difference: 'v'"):
            src.check_same_tensors(base, fewer, "model f")


def test_emr_rescalers_sum_each_tensors_share_in_order():
    # two tensors, two tasks: λ_t = Σ_n before / Σ_n after; a task with no agreeing entry: 1
    shares = [[(1.0, 0.5), (2.0, 0.0)], [(3.0, 1.5), (4.0, 0.0)]]
    assert EmrKernel().scales(shares) == [4.0 / 2.0, 1.0]
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    uni, masks, share = EmrKernel()(torch.zeros(2), [d1, d2])
    # Σ = (4, 0) elects (+, −); τ_uni = (3, −2); M_1 = (1, 1), M_2 = (1, 0)
    assert uni.tolist() == [3.0, -2.0]
    assert [m.tolist() for m in masks] == [[True, True], [True, False]]
    assert share == [(1.5, 2.5), (2.5, 1.5)]


def test_statistic_requests_are_answered_by_request():
    req = TopKThreshold(model_index=1, density=0.25)
    ctx = MergeContext(tensor_name="t", model_stats={req: KeepRule(0.5, 2)}, layer_index=1)
    assert ctx.stat(TopKThreshold(1, 0.25)) == KeepRule(0.5, 2)  # equal requests, one key
    with pytest.raises(MergeValidationError, match=r"'t'.*did not answer.*density=0\.5"):
        ctx.stat(TopKThreshold(1, 0.5))
    # a depth scale is answered from the layer fields the engine fills in
    assert ctx.stat(DepthScale(0.1, 0.9)) == 0.1  # the layer count is unknown: α
    ctx.num_layers = 4
    assert ctx.stat(DepthScale(0.1, 0.9)) == pytest.approx(0.1 + 0.9 / 3)
