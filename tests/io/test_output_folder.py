"""The output-folder helper: location checks, the lock, the overwrite rule, permissions and
OS faults (no space, read-only), through `OutputFolder` and `ShardedWriter`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import splice
from splice.errors import CheckpointError
from splice.io import ShardedWriter, TensorInfo, plan_shards
from splice.io import output_folder as of
from splice.io.output_folder import MARKER_NAME, OutputFolder, lock_file_of, partial_dir_of
from splice.reference import open_checkpoint

SRC = str(Path(splice.__file__).resolve().parents[1])
HOLDER = """
import sys
from splice.io.output_folder import OutputFolder
f = OutputFolder(sys.argv[1]).acquire()
f.fresh_partial()
print("locked", flush=True)
sys.stdin.readline()
f.release()
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def hold_lock(out: Path) -> subprocess.Popen:
    """A second process holding the lock of `out` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def write_model(out: Path, value: float = 1.0, **kw) -> Path:
    infos = [TensorInfo("a", (3,), torch.float32), TensorInfo("b", (2, 2), torch.float32)]
    w = ShardedWriter(out, plan_shards(infos, 16), {"format": "pt"}, **kw)
    w.write("a", torch.full((3,), value))
    w.write("b", torch.full((2, 2), value))
    w.finalize(extra_files={"config.json": b"{}"})
    return out


# -- location --------------------------------------------------------------------------


def _file(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


LOCATIONS = {
    "dot": (lambda t: ".", "names an existing folder"),
    "dotdot": (lambda t: "..", "names an existing folder"),
    "root": (lambda t: "/", "names an existing folder"),
    "empty": (lambda t: "", "empty"),
    "cwd": (lambda t: str(t / "work"), "current folder or one of its parents"),
    "cwd-parent": (lambda t: str(t), "current folder or one of its parents"),
    "a-file": (lambda t: str(_file(t)), "exists and is not a folder"),
    "under-a-file": (lambda t: str(_file(t) / "sub"), "is a file, not a folder"),
    "deep-under-a-file": (lambda t: str(_file(t) / "a" / "b"), "is a file, not a folder"),
    "link-to-a-file": (
        lambda t: (os.symlink(_file(t), t / "ln"), str(t / "ln"))[1],
        "exists and is not a folder",
    ),
    "broken-link": (
        lambda t: (os.symlink(t / "nowhere", t / "ln"), str(t / "ln"))[1],
        "exists and is not a folder",
    ),
}


@pytest.mark.parametrize("case", list(LOCATIONS))
def test_bad_locations_are_refused_before_anything_is_written(case, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    make, fragment = LOCATIONS[case]
    out = make(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=fragment):
        OutputFolder(out)
    with pytest.raises(CheckpointError, match=fragment):
        write_model(out, overwrite=2)  # even forced
    assert listing(tmp_path) == before


def test_new_nested_location_is_created_and_marked(tmp_path):
    out = write_model(tmp_path / "a" / "b" / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        MARKER_NAME,
    ]
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker == {"written_by": "splice", "splice_version": splice.__version__}
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no lock, partial, old
    assert torch.equal(open_checkpoint(str(out)).read("b"), torch.ones(2, 2))


# -- lock ------------------------------------------------------------------------------


def test_second_writer_in_this_process_is_refused_with_the_pid(tmp_path):
    out = tmp_path / "out"
    held = OutputFolder(out).acquire()
    (held.fresh_partial() / "theirs").write_text("in progress")
    assert lock_file_of(out).read_text().strip() == str(os.getpid())
    for resume, overwrite in [(False, 0), (True, 0), (False, 2)]:
        with pytest.raises(
            CheckpointError, match=rf"being written by another .*\(pid {os.getpid()}\)"
        ):
            write_model(out, resume=resume, overwrite=overwrite)
    assert (partial_dir_of(out) / "theirs").read_text() == "in progress"  # untouched
    held.release()
    assert not lock_file_of(out).exists()
    write_model(out, value=3.0)
    assert torch.equal(open_checkpoint(str(out)).read("a"), torch.full((3,), 3.0))


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    proc = hold_lock(out)
    try:
        with pytest.raises(CheckpointError, match=rf"another splice process \(pid {proc.pid}\)"):
            write_model(out)
        assert not out.exists()
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    write_model(out)  # released: the next run goes ahead
    assert (out / MARKER_NAME).is_file()


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "out"
    proc = hold_lock(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert lock_file_of(out).read_text().strip() == str(proc.pid)  # stale file left behind
    write_model(out, value=2.0)
    assert not lock_file_of(out).exists() and not partial_dir_of(out).exists()
    assert torch.equal(open_checkpoint(str(out)).read("a"), torch.full((3,), 2.0))


def test_lock_is_released_on_every_path(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), OutputFolder(out) as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError("boom")
    assert listing(tmp_path) == []  # partial removed, lock released and removed
    w = ShardedWriter(out, plan_shards([TensorInfo("a", (1,), torch.float32)], 64), {})
    w.abort()
    assert partial_dir_of(out).is_dir() and not lock_file_of(out).exists()
    write_model(out)
    write_model(out, overwrite=1)  # a splice output: one --overwrite replaces it
    assert not out.with_name("out.splice-old").exists()


# -- overwrite rule --------------------------------------------------------------------


def _unrelated(t: Path) -> tuple[Path, list[Path]]:
    d = t / "out"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d, []


def _splice_output(t: Path) -> tuple[Path, list[Path]]:
    return write_model(t / "out"), []


def _empty(t: Path) -> tuple[Path, list[Path]]:
    (t / "out").mkdir()
    return t / "out", []


def _holds_input(t: Path) -> tuple[Path, list[Path]]:
    d = write_model(t / "out")
    return d, [write_model(d / "model")]  # a splice output with an input inside


def _is_input(t: Path) -> tuple[Path, list[Path]]:
    d = write_model(t / "out")
    return d, [d]


@pytest.mark.parametrize(
    "make, once, twice",
    [
        (_unrelated, "not written by splice", None),
        (_splice_output, None, None),
        (_empty, None, None),
        (_holds_input, "holds an input of this run", None),
        (_is_input, "holds an input of this run", None),
    ],
)
def test_overwrite_levels(make, once, twice, tmp_path):
    out, inputs = make(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=r"already exists.*--overwrite"):
        OutputFolder(out, inputs=inputs).check()
    for level, refusal in [(1, once), (2, twice)]:
        folder = OutputFolder(out, overwrite=level, inputs=inputs)
        if refusal:
            with pytest.raises(CheckpointError, match=refusal):
                folder.check()
            with pytest.raises(CheckpointError, match=refusal):
                folder.acquire()
            assert listing(tmp_path) == before  # nothing touched
            continue
        with folder as tmp:
            (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in out.iterdir()) == ["new.txt", MARKER_NAME]
        return
    pytest.fail("never replaced")


# -- permissions -----------------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(
    "file_modes, folder_mode, want_file, want_dir",
    [
        ([0o600], 0o755, 0o600, 0o700),
        ([0o640, 0o604], 0o755, 0o600, 0o700),
        ([0o644], 0o700, 0o600, 0o700),  # a private input folder
        ([0o644], 0o755, 0o644, 0o755),  # the umask decides
        ([0o640], 0o750, 0o640, 0o750),
    ],
)
def test_outputs_get_at_most_the_inputs_permissions(
    file_modes, folder_mode, want_file, want_dir, tmp_path
):
    old = os.umask(0o022)
    try:
        src = tmp_path / "in"
        src.mkdir()
        for i, mode in enumerate(file_modes):
            (src / f"f{i}").write_text("x")
            os.chmod(src / f"f{i}", mode)
        os.chmod(src, folder_mode)
        out = write_model(tmp_path / "out", inputs=[src])
    finally:
        os.umask(old)
    modes = _modes(out)
    assert modes.pop(".") == want_dir
    assert set(modes.values()) == {want_file}, modes


# -- OS faults -------------------------------------------------------------------------


def test_no_space_while_copying_side_files_keeps_the_work_for_resume(tmp_path, monkeypatch):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    out = tmp_path / "out"
    infos = [TensorInfo(f"t{i}", (4,), torch.float32) for i in range(3)]

    def run(resume: bool) -> ShardedWriter:
        w = ShardedWriter(out, plan_shards(infos, 16), {}, resume=resume, fingerprint="x")
        for i in range(3):
            if f"t{i}" not in w.completed_tensors():
                w.write(f"t{i}", torch.full((4,), float(i)))
        return w

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    w = run(False)
    monkeypatch.setattr(of.shutil, "copyfileobj", full)
    with pytest.raises(CheckpointError, match=r"cannot write the output .*No space left"):
        w.finalize(copy_files=[tok])
    w.abort()
    assert not out.exists() and partial_dir_of(out).is_dir() and not lock_file_of(out).exists()
    monkeypatch.undo()
    w = run(True)
    assert w.completed_tensors() == {"t0", "t1", "t2"}  # nothing redone
    w.finalize(copy_files=[tok])
    assert (out / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_disk_errors_inside_a_folder_body_are_one_clear_error(code, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=os.strerror(code)), OutputFolder(out) as tmp:
        (tmp / "a").write_text("x")
        raise OSError(code, os.strerror(code))
    assert listing(tmp_path) == []


def test_input_errors_inside_a_folder_body_are_not_relabelled(tmp_path):
    with pytest.raises(FileNotFoundError), OutputFolder(tmp_path / "out"):
        open(tmp_path / "missing-input")  # noqa: SIM115
    assert listing(tmp_path) == []


def test_read_only_filesystem_at_lock_time(tmp_path, monkeypatch):
    def ro(lock, shown):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(lock))

    monkeypatch.setattr(of, "_take_lock", ro)
    with pytest.raises(CheckpointError, match=r"cannot create the output .*Read-only file system"):
        write_model(tmp_path / "out")
    assert listing(tmp_path) == []


def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root) writes into a 0555 folder; see the bind-mount test")
        with pytest.raises(CheckpointError, match="no write permission"):
            write_model(ro / "out")
    finally:
        ro.chmod(0o755)


def test_read_only_mount(tmp_path):
    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("no unshare/mount to make a read-only bind mount")
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{ro}' '{ro}' && ! touch '{ro}/p'"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("cannot make a read-only bind mount here (needs mount namespaces)")
    script = (
        "import sys\nfrom splice.cli import main\n"
        "sys.exit(main(['merge', '--continual', 'none', '--base', sys.argv[1], '--add', "
        "sys.argv[1], '--out', sys.argv[2]]))"
    )
    model = write_model(tmp_path / "model")
    cmd = f"mount --bind -o ro '{ro}' '{ro}' && exec '{sys.executable}' -c \"$0\" \"$1\" \"$2\""
    res = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd, script, str(model), str(ro / "out")],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("splice: error: ") and "read-only file system" in res.stderr
    assert "Traceback" not in res.stderr


def test_work_folders_of_bench_and_demo(tmp_path, monkeypatch, capsys):
    from splice.cli import main
    from splice.io.out_location import prepare_work_folder

    (tmp_path / "f").write_text("x")
    assert prepare_work_folder(tmp_path / "new" / "w") == tmp_path / "new" / "w"
    assert (tmp_path / "new" / "w").is_dir() and not list((tmp_path / "new" / "w").iterdir())
    monkeypatch.chdir(tmp_path / "new")
    assert prepare_work_folder(".") == Path(".")  # an existing folder is fine, even .
    for bad, fragment in [
        (tmp_path / "f", "not a folder"),
        (tmp_path / "f" / "w", "is a file, not a folder"),
    ]:
        with pytest.raises(CheckpointError, match=fragment):
            prepare_work_folder(bad)
        assert main(["demo", "--synthetic", "--quiet", "--out", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("splice: error: ") and "Traceback" not in err
