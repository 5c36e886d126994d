"""`splice merge --out`: concurrent runs, killed runs, --overwrite, bad locations, OS faults
and permissions, end to end (in-process CLI and real second processes)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import splice
from splice.cli import main
from splice.io.output_folder import MARKER_NAME, lock_file_of, partial_dir_of
from splice.reference import open_checkpoint

SRC = str(Path(splice.__file__).resolve().parents[1])
# A `splice merge` that stops after its 3rd tensor until the file argv[1] exists.
PAUSING_MERGE = """
import sys, time
from pathlib import Path
from splice.engine import execute
real, calls = execute._Runner.__call__, []
def paused(self, index):
    calls.append(index)
    if len(calls) == 3:
        print("paused", flush=True)
        while not Path(sys.argv[1]).exists():
            time.sleep(0.02)
    return real(self, index)
execute._Runner.__call__ = paused
from splice.cli import main
sys.exit(main(sys.argv[2:]))
"""


def recipe_file(models, tmp_path: Path, method: str = "task_arithmetic") -> str:
    recipe = {
        "method": method,
        "base_model": models["base"],
        "models": [{"model": models["ft0"]}, {"model": models["ft1"]}],
        "parameters": {"lambda": 0.5} if method == "task_arithmetic" else {},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def cli(*args: str) -> list[str]:
    return ["merge", *args, "--quiet", "--threads", "1", "--shard-size", "600"]


def tensors(folder: Path) -> dict:
    r = open_checkpoint(str(folder))
    try:
        return {n: r.read(n) for n in r.names()}
    finally:
        r.close()


def same_model(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[n].equal(tb[n]) for n in ta)


def start_paused_merge(args: list[str], go: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING_MERGE, str(go), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "paused"
    return proc


def test_two_concurrent_merges_into_one_out(models, tmp_path, capsys):
    rp, other = recipe_file(models, tmp_path), recipe_file(models, tmp_path, "linear")
    assert main(cli(rp, "--out", str(tmp_path / "ref"))) == 0
    out, go = tmp_path / "out", tmp_path / "go"
    first = start_paused_merge(cli(rp, "--out", str(out)), go)
    try:
        done_before = sorted(p.name for p in partial_dir_of(out).iterdir())
        capsys.readouterr()
        for extra in ([], ["--resume"], ["--overwrite", "--overwrite"]):
            assert main(cli(other, "--out", str(out), *extra)) == 1
            err = capsys.readouterr().err
            assert err.startswith("splice: error: ") and "Traceback" not in err
            assert f"is being written by another splice process (pid {first.pid})" in err
        assert sorted(p.name for p in partial_dir_of(out).iterdir()) == done_before
    finally:
        go.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert same_model(out, tmp_path / "ref")  # the first run's own result, complete
    recipe_of = (tmp_path / "ref" / "splice_recipe.yaml").read_text()
    assert (out / "splice_recipe.yaml").read_text() == recipe_of
    assert not lock_file_of(out).exists()


def test_killed_merge_leaves_no_blocking_lock_and_resumes(models, tmp_path, capsys):
    rp = recipe_file(models, tmp_path)
    assert main(cli(rp, "--out", str(tmp_path / "ref"))) == 0
    out = tmp_path / "out"
    proc = start_paused_merge(cli(rp, "--out", str(out)), tmp_path / "never")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert lock_file_of(out).exists() and not out.exists()
    capsys.readouterr()
    assert main(cli(rp, "--out", str(out), "--resume")) == 0
    assert ", 2 already done" in capsys.readouterr().out
    assert same_model(out, tmp_path / "ref") and not lock_file_of(out).exists()


@pytest.mark.parametrize(
    "out, fragment",
    [
        (".", "names an existing folder"),
        ("..", "names an existing folder"),
        ("/", "names an existing folder"),
        ("{tmp}/file/sub", "is a file, not a folder"),
        ("{tmp}/file", "exists and is not a folder"),
        ("{tmp}", "current folder or one of its parents"),
    ],
)
def test_bad_out_locations(out, fragment, models, tmp_path, monkeypatch, capsys):
    rp = recipe_file(models, tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in ([], ["--overwrite", "--overwrite"]):
        assert main(cli(rp, "--out", out.format(tmp=tmp_path), *extra)) == 1
        err = capsys.readouterr().err
        assert err.startswith("splice: error: ") and fragment in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_refuses_a_folder_holding_an_input(models, tmp_path, capsys):
    rp = recipe_file(models, tmp_path)
    ft0 = Path(models["ft0"])
    assert (ft0 / MARKER_NAME).is_file()  # the inputs are splice outputs themselves
    before = tensors(ft0)
    assert main(cli(rp, "--out", str(ft0), "--overwrite")) == 1
    assert "holds an input of this run" in capsys.readouterr().err
    assert main(cli(rp, "--out", str(tmp_path), "--overwrite")) == 1  # holds all of them
    assert "holds an input of this run" in capsys.readouterr().err
    assert tensors(ft0).keys() == before.keys()
    # forced twice: the user asked for it; the inputs were read before the swap
    assert main(cli(rp, "--out", str(tmp_path / "ref"))) == 0
    assert main(cli(rp, "--out", str(ft0), "--overwrite", "--overwrite")) == 0
    assert same_model(ft0, tmp_path / "ref")


def test_overwrite_of_an_empty_folder_and_of_a_file(models, tmp_path, capsys):
    rp = recipe_file(models, tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(cli(rp, "--out", str(tmp_path / "empty"))) == 1
    assert main(cli(rp, "--out", str(tmp_path / "empty"), "--overwrite")) == 0
    (tmp_path / "f").write_text("keep")
    assert main(cli(rp, "--out", str(tmp_path / "f"), "--overwrite", "--overwrite")) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep"


def test_no_space_while_copying_the_tokenizer(models, tmp_path, monkeypatch, capsys):
    rp = recipe_file(models, tmp_path)
    out = tmp_path / "out"

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", full)
    assert main(cli(rp, "--out", str(out))) == 1
    err = capsys.readouterr().err
    assert err.startswith("splice: error: cannot write the output") and "No space left" in err
    assert "Traceback" not in err and not out.exists() and not lock_file_of(out).exists()
    monkeypatch.undo()
    assert main(cli(rp, "--out", str(out), "--resume")) == 0
    assert "already done" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()


def test_outputs_keep_the_inputs_private_permissions(models, tmp_path):
    rp = recipe_file(models, tmp_path)
    old = os.umask(0o022)
    try:
        for name in ("base", "ft0", "ft1"):
            for f in Path(models[name]).iterdir():
                f.chmod(0o600)
        assert main(cli(rp, "--out", str(tmp_path / "private"))) == 0
        for name in ("base", "ft0", "ft1"):
            for f in Path(models[name]).iterdir():
                f.chmod(0o644)
        assert main(cli(rp, "--out", str(tmp_path / "public"))) == 0
    finally:
        os.umask(old)
    private = tmp_path / "private"
    assert private.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in private.iterdir()} == {0o600}
    public = tmp_path / "public"
    assert public.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in public.iterdir()} == {0o644}


def test_lock_does_not_outlive_a_failed_run(models, tmp_path, capsys):
    rp = recipe_file(models, tmp_path)
    out = tmp_path / "out"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": "/nope"}]}))
    assert main(cli(str(bad), "--out", str(out))) == 1
    assert main(cli(rp, "--out", str(out))) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
