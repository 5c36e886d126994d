"""Bit-identity pins: the outputs of every merge method, LoRA merge, compression and extraction
command on fixed tiny inputs hash to the values recorded in `output_pins.json`.

Refactors of the engine, the delta layer or the registries must not change a single bit of any
output. A deliberate change of numbers re-records the pins (and says why in its commit):

    SPLICE_REPIN=1 python -m pytest tests/test_output_pins.py

Pin: SHA-256 over every tensor of every safetensors file in the output (sorted; name, dtype,
shape and raw bytes); side files and metadata are not hashed (they hold paths and versions).
Bits are compared on the machine kind that recorded them (torch version, CPU capability,
vendor and AMX: the vectorized kernels and LAPACK differ by all of these); elsewhere three
float64 checksums (sum, sum of |x|, a position-weighted sum) are compared to 1e-6 of the
output's sum of |x| (the signed sums cancel, so a relative tolerance on them would demand
more than float32 SVDs agree to across machines).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "engine"))
sys.path.insert(0, str(Path(__file__).parent / "lora_merge"))

from lora_test_util import make_adapter, save_base
from tiny_models import tiny_tensors, write_folder

from splice.cli import main

PINS = Path(__file__).with_name("output_pins.json")
REPIN = os.environ.get("SPLICE_REPIN") == "1"

_DENSE = [
    ("task_arithmetic", {"lambda": 0.7}, 3),
    ("linear", {}, 3),
    ("ties", {"density": 0.4}, 3),
    ("ties_model_scope", {"density": 0.4, "scope": "model"}, 3),
    ("dare_ties", {"density": 0.5}, 3),
    ("dare_linear", {"density": 0.5}, 3),
    ("della", {"density": 0.5, "epsilon": 0.1}, 3),
    ("della_linear", {"density": 0.5, "epsilon": 0.1}, 3),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}, 3),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}, 3),
    ("breadcrumbs_row_scope", {"density": 0.6, "gamma": 0.1, "scope": "row"}, 3),
    ("magnitude_prune", {"density": 0.5}, 3),
    ("magnitude_prune_model_scope", {"density": 0.5, "scope": "model"}, 3),
    ("consensus", {}, 3),
    ("emr", {}, 3),
    ("iso_c", {}, 3),
    ("iso_cts", {}, 3),
    ("karcher", {}, 3),
    ("lines", {"alpha": 0.5, "beta": 0.5}, 3),
    ("magmax", {}, 3),
    ("metrics_weighted", {"metric": [1.0, 2.0, 3.0]}, 3),
    ("model_stock", {}, 3),
    ("multislerp", {"weight": [1.0, 2.0, 3.0]}, 3),
    ("passthrough", {"scale": 0.5}, 1),
    ("pcb", {}, 3),
    ("slerp", {"t": 0.3}, 1),
    ("tsv", {}, 3),
]
_MERGEKIT = [
    ("ties", {"density": 0.5, "weight": 0.5}),
    ("dare_ties", {"density": 0.5, "weight": 0.5}),
    ("della", {"density": 0.5, "epsilon": 0.1, "weight": 0.5}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "weight": 0.5}),
]
_LORA = [
    ("concat", []),
    ("svd", ["--rank", "4"]),
    ("ties", ["--density", "0.5", "--rank", "4"]),
    ("dare", ["--density", "0.5", "--rank", "4"]),
    ("dare_ties", ["--density", "0.5", "--rank", "4"]),
    ("knots", ["--density", "0.5", "--rank", "4"]),
    ("knots_dare", ["--density", "0.5", "--rank", "4"]),
    ("lego", ["--rank", "4"]),
]


def _cpu_kind() -> str:
    """The CPU vendor, plus AMX when present: with the same instruction-set level, MKL's LAPACK
    and vector math take other code paths on AMD and Intel, and on Intel with AMX tiles
    (seen: SVD-based merges differ in the last bits between such machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    vendor = next(
        (ln.split(":")[1].strip() for ln in info.splitlines() if ln.startswith("vendor_id")), ""
    )
    flags = next(
        (ln.split(":")[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    return vendor + (" AMX" if "amx_tile" in flags else "")


MACHINE = f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {_cpu_kind()}"


def _digest(folder: Path) -> dict:
    h = hashlib.sha256()
    sums = torch.zeros(3, dtype=torch.float64)
    for file in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(file)
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{file.relative_to(folder)}|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
            x = t.reshape(-1).double()
            position = torch.cos(torch.arange(x.numel(), dtype=torch.float64))
            sums += torch.stack([x.sum(), x.abs().sum(), (x * position).sum()])
    return {"sha256": h.hexdigest(), "machine": MACHINE, "sums": sums.tolist()}


@pytest.fixture(scope="module")
def pins():
    recorded = json.loads(PINS.read_text()) if PINS.exists() else {}
    seen: dict[str, str] = {}
    yield recorded, seen
    if REPIN:
        PINS.write_text(json.dumps({**recorded, **seen}, indent=1, sort_keys=True) + "\n")


def _check(pins, key: str, folder: Path) -> None:
    recorded, seen = pins
    seen[key] = got = _digest(folder)
    if REPIN:
        return
    assert key in recorded, f"no pin for {key}: run with SPLICE_REPIN=1"
    want = recorded[key]
    if want["machine"] == MACHINE:
        assert got["sha256"] == want["sha256"], f"{key}: output changed bit-wise"
    else:
        scale = 1e-6 * abs(want["sums"][1]) + 1e-9
        assert got["sums"] == pytest.approx(want["sums"], rel=1e-6, abs=scale), key


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    base = tiny_tensors(0)
    paths = {"base": write_folder(root / "base", base)}
    for i in range(3):
        d = tiny_tensors(100 + i, scale=0.1)
        paths[f"ft{i}"] = write_folder(root / f"ft{i}", {n: base[n] + d[n] for n in base})
    return paths


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    base = save_base(root / "base")
    return str(base), [str(make_adapter(root / f"a{i}", seed=i)) for i in range(3)]


def _merge(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["merge", str(path), "--out", str(out), "--quiet", "--seed", "7"]) == 0
    return out


@pytest.mark.parametrize(("key", "params", "n"), _DENSE, ids=[k for k, _, _ in _DENSE])
def test_merge_method_outputs_are_pinned(pins, dense_models, tmp_path, key, params, n):
    method = key.split("_model_scope")[0].split("_row_scope")[0]
    models = [{"model": dense_models[f"ft{i}"]} for i in range(n)]
    recipe = {"method": method, "base_model": dense_models["base"], "models": models}
    recipe["parameters"] = params
    _check(pins, f"merge/{key}", _merge(tmp_path, recipe))


@pytest.mark.parametrize(("method", "params"), _MERGEKIT, ids=[m for m, _ in _MERGEKIT])
def test_mergekit_dialect_outputs_are_pinned(pins, dense_models, tmp_path, method, params):
    models = [{"model": dense_models[f"ft{i}"], "parameters": params} for i in range(3)]
    recipe = {"merge_method": method, "base_model": dense_models["base"], "models": models}
    recipe["dtype"] = "float32"
    _check(pins, f"mergekit/{method}", _merge(tmp_path, recipe))


@pytest.mark.parametrize(("method", "flags"), _LORA, ids=[m for m, _ in _LORA])
def test_lora_merge_outputs_are_pinned(pins, loras, tmp_path, method, flags):
    _, adapters = loras
    out = tmp_path / "out"
    args = ["lora", "merge", *adapters, "--method", method, "--weights", "1,0.5,0.25"]
    assert main([*args, *flags, "--seed", "3", "--out", str(out)]) == 0
    _check(pins, f"lora_merge/{method}", out)


def test_lora_in_recipe_output_is_pinned(pins, loras, tmp_path):
    base, adapters = loras
    models = [{"model": f"{base}+{a}"} for a in adapters]
    recipe = {"method": "ties", "base_model": base, "models": models}
    recipe["parameters"] = {"density": 0.5}
    _check(pins, "merge/ties_of_loras_folded", _merge(tmp_path, recipe))


def test_lora_extract_and_compeft_outputs_are_pinned(pins, loras, dense_models, tmp_path):
    base = dense_models["base"]
    out = tmp_path / "extract"
    args = ["lora", "extract", "--base", base, "--model", dense_models["ft0"], "--rank", "3"]
    assert main([*args, "--out", str(out)]) == 0
    _check(pins, "lora_extract/rank3", out)
    out = tmp_path / "compeft"
    assert main(["lora", "compeft", loras[1][0], "--density", "0.3", "--out", str(out)]) == 0
    _check(pins, "lora_compeft/d0.3", out)


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_compress_outputs_are_pinned(pins, dense_models, tmp_path, method):
    out = tmp_path / "out"
    models = [dense_models[f"ft{i}"] for i in range(3)]
    args = ["compress", method, "--base", dense_models["base"], "--models", *models]
    assert main([*args, "--out", str(out)]) == 0
    _check(pins, f"compress/{method}", out)
