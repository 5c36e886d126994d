"""--resume keeps a finished shard only when its file and the inputs behind it are unchanged
by content (not by size and mtime), and fingerprints `BASE+ADAPTER` through split_reference."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from splice.cli import main
from splice.engine import execute as execute_mod
from splice.engine import plan_merge, run_merge
from splice.io import SafetensorsReader
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint

SHARD = 600  # several small shards


def merge(recipe: dict, out: Path, **kw):
    plan = plan_merge(parse_recipe(recipe))
    try:
        return run_merge(plan, out, shard_bytes=SHARD, threads=1, progress=False, **kw)
    finally:
        plan.close()


def crash_midway(monkeypatch, recipe: dict, out: Path, after: int = 6) -> dict[str, set[str]]:
    """Run a merge that is interrupted after `after` tensors; {finished shard: its tensors}."""
    real = execute_mod._Runner.__call__
    calls = {"n": 0}

    def crashing(self, index):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(execute_mod._Runner, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, out)
    monkeypatch.setattr(execute_mod._Runner, "__call__", real)
    partial = out.with_name(out.name + ".splice-partial")
    done = {}
    for f in sorted(partial.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            done[f.name] = set(g.keys())
    assert done, "some shards must be finished before the crash"
    return done


def edit_in_place(file: Path, name: str, change) -> None:
    """Replace tensor `name` in a safetensors file by `change(old)`, keeping size and mtime."""
    st = file.stat()
    with SafetensorsReader(file) as r:
        begin, end = r.byte_range(name)
        new = change(r.read(name)).contiguous()
    data = new.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(data) == end - begin
    with open(file, "r+b") as f:
        f.seek(begin)
        f.write(data)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def file_of(folder: str | Path, name: str) -> Path:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def shards(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def _recipe(models, method="task_arithmetic", **params):
    return {
        "method": method,
        "base_model": models["base"],
        "models": [{"model": models["ft0"]}, {"model": models["ft1"]}],
        "parameters": params or {"lambda": 0.5},
    }


def test_input_edited_with_size_and_mtime_kept_redoes_its_shards(
    models, tmp_path, monkeypatch, capsys
):
    recipe = _recipe(models)
    out = tmp_path / "out"
    done = crash_midway(monkeypatch, recipe, out)
    edited = sorted(next(iter(done.values())))[0]  # a tensor of a finished shard
    edit_in_place(file_of(models["ft0"], edited), edited, lambda t: t + 1.0)
    capsys.readouterr()
    report = merge(recipe, out, resume=True)
    err = capsys.readouterr().err
    assert "splice: note: --resume redoes" in err and f"'{edited}'" in err
    assert "changed since the shard was written" in err
    assert report.skipped < sum(len(v) for v in done.values())
    fresh = merge(recipe, tmp_path / "fresh")
    assert shards(out) == shards(tmp_path / "fresh") and fresh.skipped == 0


def test_input_edited_behind_unfinished_shards_keeps_finished_ones(
    models, tmp_path, monkeypatch, capsys
):
    recipe = _recipe(models)
    out = tmp_path / "out"
    done = crash_midway(monkeypatch, recipe, out)
    partial = out.with_name("out.splice-partial")
    mtimes = {n: (partial / n).stat().st_mtime_ns for n in done}
    last = "lm_head.weight"
    assert all(last not in v for v in done.values())
    edit_in_place(file_of(models["ft1"], last), last, lambda t: t * -2.0)
    capsys.readouterr()
    report = merge(recipe, out, resume=True)
    assert "redoes" not in capsys.readouterr().err
    assert report.skipped == sum(len(v) for v in done.values())
    assert {n: (out / n).stat().st_mtime_ns for n in done} == mtimes  # kept, not rewritten
    merge(recipe, tmp_path / "fresh")
    assert shards(out) == shards(tmp_path / "fresh")


def test_whole_model_statistics_change_redoes_finished_shards(
    models, tmp_path, monkeypatch, capsys
):
    recipe = _recipe(models, method="ties", density=0.3, scope="model")
    out = tmp_path / "out"
    done = crash_midway(monkeypatch, recipe, out)
    last = "lm_head.weight"  # read by no finished shard, but part of the global top-k
    assert all(last not in v for v in done.values())
    edit_in_place(file_of(models["ft0"], last), last, lambda t: t * 50.0)
    capsys.readouterr()
    merge(recipe, out, resume=True)
    assert "whole-model statistics changed" in capsys.readouterr().err
    merge(recipe, tmp_path / "fresh")
    assert shards(out) == shards(tmp_path / "fresh")


def _flip_data_byte(partial: Path, shard: str) -> None:
    f = partial / shard
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x55  # inside the last tensor's bytes; size and header unchanged
    f.write_bytes(bytes(data))


def _drop_record(partial: Path, shard: str) -> None:
    (partial / ".splice-state" / f"{shard}.json").unlink()


def _garble_record(partial: Path, shard: str) -> None:
    (partial / ".splice-state" / f"{shard}.json").write_text("{not json")


def _sha256_record(partial: Path, shard: str) -> None:
    """The record as splice wrote it before XXH3-128: SHA-256 digests, no "hash" key (the
    digests here are of the right bytes, so only the missing name can refuse it)."""
    import hashlib

    f = partial / ".splice-state" / f"{shard}.json"
    data = json.loads(f.read_text())
    assert data.pop("hash") == "xxh3-128"
    with safe_open(str(partial / shard), "pt") as g:
        names = list(g.keys())
    raw = (partial / shard).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for name in names:
        begin, end = header[name]["data_offsets"]
        data["tensors"][name] = hashlib.sha256(raw[8 + n + begin : 8 + n + end]).hexdigest()
    data["header"] = hashlib.sha256(raw[: 8 + n]).hexdigest()
    f.write_text(json.dumps(data))


def _edit_header(partial: Path, shard: str) -> None:
    f = partial / shard
    data = f.read_bytes()
    f.write_bytes(data.replace(b'"format":"pt"', b'"format":"pX"', 1))


@pytest.mark.parametrize(
    "corrupt, why",
    [
        (_flip_data_byte, "changed since the shard was finished"),
        (_drop_record, "has no record"),
        (_garble_record, "has no record"),
        (_sha256_record, "finished by an older splice"),
        (_edit_header, "header differs"),
    ],
)
def test_corrupted_finished_shard_is_redone(corrupt, why, models, tmp_path, monkeypatch, capsys):
    recipe = _recipe(models)
    ref = tmp_path / "ref"
    merge(recipe, ref)
    out = tmp_path / "out"
    done = crash_midway(monkeypatch, recipe, out)
    victim = sorted(done)[0]
    corrupt(out.with_name("out.splice-partial"), victim)
    capsys.readouterr()
    report = merge(recipe, out, resume=True)
    err = capsys.readouterr().err
    assert f"redoes 1 finished shard(s): {victim}: " in err and why in err, err
    assert report.skipped == sum(len(v) for n, v in done.items() if n != victim)
    assert shards(out) == shards(ref)


def _lora_adapter(path: Path, value: float) -> Path:
    """A PEFT LoRA adapter folder for the tiny Llama (q_proj of every layer, rank 1)."""
    path.mkdir()
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    pre = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    tensors = {}
    for i in range(3):
        tensors[pre.format(i, "A")] = torch.full((1, 8), value)
        tensors[pre.format(i, "B")] = torch.linspace(-1, 1, 8).reshape(8, 1)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_adapter_with_plus_in_its_folder_name(models, tmp_path, monkeypatch, capsys):
    ad = _lora_adapter(tmp_path / "ad+v1", 0.25)
    recipe = _recipe(models)
    recipe["models"][0] = {"model": f"{models['ft0']}+{ad}"}
    plan = plan_merge(parse_recipe(recipe))
    try:  # the adapter is part of the run's identity, as one path
        ident = execute_mod._input_paths(plan)
    finally:
        plan.close()
    assert [str(Path(models["ft0"]).resolve()), str(ad.resolve())] in ident

    out = tmp_path / "out"
    done = crash_midway(monkeypatch, recipe, out)
    assert any("q_proj" in n for v in done.values() for n in v)
    weights = ad / "adapter_model.safetensors"
    edit_in_place(
        weights, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.neg
    )
    capsys.readouterr()
    merge(recipe, out, resume=True)
    assert "q_proj.weight' of " in capsys.readouterr().err
    merge(recipe, tmp_path / "fresh")
    assert shards(out) == shards(tmp_path / "fresh")

    # another adapter folder (also with '+') is another run: resume refuses the partial
    shutil.copytree(ad, tmp_path / "ad+v2")
    crash_midway(monkeypatch, recipe, tmp_path / "o2")
    recipe["models"][0] = {"model": f"{models['ft0']}+{tmp_path / 'ad+v2'}"}
    with pytest.raises(Exception, match="cannot resume"):
        merge(recipe, tmp_path / "o2", resume=True)


def test_escaped_plus_reference_in_a_recipe(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["ft0"], "m")
    shutil.copytree(models["ft1"], "m+a")
    _lora_adapter(tmp_path / "a+b", 0.5)
    _lora_adapter(tmp_path / "b", -0.75)

    def run(ref: str, out: str) -> int:
        recipe = {"method": "linear", "models": [{"model": ref}]}
        Path("r.yaml").write_text(yaml.safe_dump(recipe))
        return main(["merge", "r.yaml", "--out", out, "--quiet"])

    assert run("m+a+b", "x") == 1  # 'm' + 'a+b' or 'm+a' + 'b'
    err = capsys.readouterr().err
    assert "ambiguous" in err and "\\+" in err and "Traceback" not in err
    assert not Path("x").exists()
    assert run("m+a\\+b", "one") == 0  # base m, adapter a+b
    assert run("m\\+a+b", "two") == 0  # base m+a, adapter b
    shutil.copytree("m", "m_plain")
    shutil.copytree("a+b", "ab_plain")
    shutil.copytree("m+a", "ma_plain")
    assert run("m_plain+ab_plain", "one_ref") == 0
    assert run("ma_plain+b", "two_ref") == 0
    one, two = tensors("one"), tensors("two")
    assert_same(one, tensors("one_ref"))
    assert_same(two, tensors("two_ref"))
    assert not torch.equal(
        one["model.layers.0.self_attn.q_proj.weight"], two["model.layers.0.self_attn.q_proj.weight"]
    )


def tensors(folder: str) -> dict[str, torch.Tensor]:
    r = open_checkpoint(folder)
    try:
        return {n: r.read(n) for n in r.names()}
    finally:
        r.close()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
