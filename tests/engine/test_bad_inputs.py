"""Bad input gets one clear error, exit code 1, and leaves no output behind.

Each case writes a recipe (and sometimes a broken checkpoint) and runs `splice merge`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_tensors, write_folder

from splice.cli import main


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/splice-pwned",))


def _single_file(models, tmp_path: Path) -> Path:
    """ft0 as one .safetensors file."""
    src = Path(models["ft0"])
    folder = tmp_path / "one"
    write_folder(folder, models["tensors"]["ft0"], tokenizer=False)
    assert src.exists()
    return folder / "model.safetensors"


def _truncated(models, tmp_path):
    f = _single_file(models, tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    return {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [{"model": str(f)}],
    }


def _bad_header(models, tmp_path):
    f = _single_file(models, tmp_path)
    data = bytearray(f.read_bytes())
    data[8:12] = b"}}}}"
    f.write_bytes(bytes(data))
    return {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [{"model": str(f)}],
    }


def _huge_header(models, tmp_path):
    f = _single_file(models, tmp_path)
    data = bytearray(f.read_bytes())
    data[0:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    return {"merge_method": "linear", "models": [{"model": str(f)}]}


def _shape_mismatch(models, tmp_path):
    t = dict(models["tensors"]["ft0"])
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(12, 9)
    p = write_folder(tmp_path / "odd", t)
    return {
        "method": "ties",
        "base_model": models["base"],
        "models": [{"model": models["ft1"]}, {"model": p}],
        "parameters": {"density": 0.5},
    }


def _missing_tensor(models, tmp_path):
    t = dict(models["tensors"]["ft0"])
    del t["model.norm.weight"]
    p = write_folder(tmp_path / "less", t)
    return {"method": "task_arithmetic", "base_model": models["base"], "models": [{"model": p}]}


def _extra_tensor(models, tmp_path):
    t = dict(models["tensors"]["ft0"])
    t["extra.weight"] = torch.zeros(2)
    p = write_folder(tmp_path / "more", t)
    return {"method": "task_arithmetic", "base_model": models["base"], "models": [{"model": p}]}


def _pickle(models, tmp_path):
    f = tmp_path / "evil.bin"
    with open(f, "wb") as fh:
        pickle.dump({"model.norm.weight": Boom()}, fh)
    return {"merge_method": "linear", "models": [{"model": str(f)}]}


def _missing_shard(models, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(models["ft1"], dst)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    return {"merge_method": "linear", "models": [{"model": str(dst)}, {"model": models["ft0"]}]}


def _recipe(**kw):
    def make(models, tmp_path):
        base = {
            "method": "ties",
            "base_model": models["base"],
            "models": [{"model": models["ft0"]}, {"model": models["ft1"]}],
        }
        base.update(kw)
        for k in [k for k, v in kw.items() if v is None]:
            del base[k]
        return base

    return make


CASES = {
    "truncated file": (_truncated, "truncated"),
    "corrupt header": (_bad_header, "header"),
    "header larger than file": (_huge_header, "header"),
    "shape mismatch": (_shape_mismatch, "shape mismatch for tensor 'model.layers.1.mlp.up_proj"),
    "tensor missing from an input": (_missing_tensor, "'model.norm.weight' is missing from"),
    "extra tensor in an input": (_extra_tensor, "has tensors that"),
    "pickle with arbitrary object": (_pickle, "unpickl"),
    "index names a missing shard": (_missing_shard, "model-00002"),
    "missing model path": (_recipe(models=[{"model": "/nonexistent/model"}]), "does not exist"),
    "unknown recipe key": (_recipe(base_modle="x"), "did you mean 'base_model'"),
    "unknown method": (_recipe(method="tiez"), "did you mean 'ties'"),
    "unknown parameter": (_recipe(parameters={"densty": 0.5}), "did you mean 'density'"),
    "density out of range": (_recipe(parameters={"density": 1.5}), "'density'"),
    "bad choice": (_recipe(parameters={"density": 0.5, "scope": "global"}), "'scope'"),
    "missing base": (_recipe(base_model=None), "needs a base_model"),
    "global parameter on a model": (
        _recipe(models=[{"model": "M0", "parameters": {"lambda": 2}}]),
        "global parameter",
    ),
    "slerp with two models": (_recipe(method="slerp", parameters={"t": 0.5}), "exactly 1"),
    "whole-model trim with varying density": (
        _recipe(parameters={"density": [0.1, 0.9], "scope": "model"}),
        "same density",
    ),
    "data-aware method without statistics": (
        _recipe(method="regmean", base_model=None),
        "needs `statistics:` (a safetensors file",
    ),
    "layer range beyond the model": (
        lambda m, p: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": m["ft0"], "layer_range": [2, 5]}]}],
        },
        "has no layer 3",
    ),
    "bad LoRA adapter reference": (
        lambda m, p: {"merge_method": "linear", "models": [{"model": m["base"] + "+" + str(p)}]},
        "adapter_config.json",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_clear_error_and_no_output(case, models, tmp_path, capsys):
    make, fragment = CASES[case]
    recipe = make(models, tmp_path)
    for e in recipe.get("models", []):
        if e["model"] == "M0":
            e["model"] = models["ft0"]
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    rc = main(["merge", str(rp), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("splice: error: ") and "Traceback" not in err
    assert fragment in err, err
    assert not out.exists() and not (tmp_path / "merged.splice-partial").exists()
    assert not Path("/tmp/splice-pwned").exists()


def test_existing_output_is_not_overwritten(models, tmp_path, capsys):
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": models["ft0"]}]}))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(rp), "--out", str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # one --overwrite replaces only a previous splice output; this folder is not one
    assert main(["merge", str(rp), "--out", str(out), "--quiet", "--overwrite"]) == 1
    assert "not written by splice" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(rp), "--out", str(out), "--quiet", "--overwrite", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    # now it is one: a single --overwrite replaces it
    assert main(["merge", str(rp), "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_bad_shard_size_and_debug_traceback(models, tmp_path, capsys):
    rp = tmp_path / "recipe.yaml"
    rp.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": models["ft0"]}]}))
    assert main(["merge", str(rp), "--out", str(tmp_path / "o"), "--shard-size", "2XB"]) == 1
    assert "2XB" in capsys.readouterr().err
    assert main(["--debug", "merge", str(tmp_path / "none.yaml"), "--out", "x"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_base_dtype_tensor_and_int_buffers_copied(tmp_path):
    # integer buffers are copied from the reference model, floats merged
    t = tiny_tensors(0)
    t["model.position_ids"] = torch.arange(5)
    a = write_folder(tmp_path / "a", t)
    t2 = {n: (v + 1 if v.is_floating_point() else v) for n, v in t.items()}
    b = write_folder(tmp_path / "b", t2)
    rp = tmp_path / "r.yaml"
    rp.write_text(
        yaml.safe_dump(
            {"method": "linear", "models": [{"model": a}, {"model": b}], "out_dtype": "bfloat16"}
        )
    )
    assert main(["merge", str(rp), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    from splice.reference import open_checkpoint

    r = open_checkpoint(str(tmp_path / "o"))
    assert r.read("model.position_ids").dtype == torch.int64
    assert r.info("model.norm.weight").dtype == torch.bfloat16
    torch.testing.assert_close(
        r.read("model.norm.weight").float(), (t["model.norm.weight"] + 0.5).bfloat16().float()
    )
    r.close()
