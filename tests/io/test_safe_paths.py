"""The read guard (`splice.io.safe_paths`): allowed roots, links, non-regular files, limits."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from splice.errors import CheckpointError, RecipeError
from splice.io.safe_paths import (
    allowed_root,
    check_model_folder,
    member,
    open_regular,
    resolve_inside,
    shown,
    side_files,
)
from splice.io.textfile import load_json, read_text

SECRET = "TOPSECRET-4f2a-do-not-print"


def secret_file(tmp_path: Path, name: str = "secret.txt") -> Path:
    """A file outside any model folder whose content must never appear in a message."""
    d = tmp_path / "elsewhere"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(SECRET + "\n" + SECRET)
    return p


def hub_cache(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A real Hugging Face cache layout: snapshots/REV/NAME -> ../../blobs/<id>; the snapshot."""
    repo = tmp_path / "hub" / "models--org--name"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i:04d}"
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / name).parent), snap / name)
    return snap


def call_with_timeout(fn, fifo: Path | None = None, timeout: float = 20.0):
    """Run fn() in a thread; fail (instead of hanging) if it has not returned in time.

    If it blocked on `fifo`, a writer is opened and closed to release it before failing.
    """
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the test
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(5)
        pytest.fail(f"{fn} blocked for more than {timeout} s")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


# -- allowed roots ------------------------------------------------------------------------


def test_allowed_root_of_folder_file_and_linked_folder(tmp_path):
    real = tmp_path / "models" / "m"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_bytes(b"x")
    assert allowed_root(real) == real.resolve()
    assert allowed_root(real / "model.safetensors") == real.resolve()
    os.symlink(real, tmp_path / "alias")  # the user may name a link: its target is the root
    assert allowed_root(tmp_path / "alias") == real.resolve()
    assert allowed_root(tmp_path / "alias" / "model.safetensors") == real.resolve()


def test_allowed_root_of_hub_cache_snapshot_is_the_repo_folder(tmp_path):
    snap = hub_cache(tmp_path, {"config.json": b"{}", "sub/tokenizer.json": b"{}"})
    repo = (tmp_path / "hub" / "models--org--name").resolve()
    assert allowed_root(snap) == repo
    assert allowed_root(snap / "config.json") == repo
    assert allowed_root(snap / "sub") == repo
    os.symlink(snap, tmp_path / "my-model")
    assert allowed_root(tmp_path / "my-model") == repo


def test_snapshots_folder_outside_a_hub_repo_is_not_widened(tmp_path):
    d = tmp_path / "project" / "snapshots" / "v1"
    d.mkdir(parents=True)
    assert allowed_root(d) == d.resolve()
    d2 = tmp_path / "models--x" / "other" / "v1"  # no snapshots/ level
    d2.mkdir(parents=True)
    assert allowed_root(d2) == d2.resolve()


# -- resolve_inside -----------------------------------------------------------------------


def test_resolve_inside_accepts_files_and_links_that_stay_inside(tmp_path):
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(b"a")
    os.symlink("sub/a.bin", root / "link.bin")
    r = root.resolve()
    assert resolve_inside(r, root / "sub" / "a.bin") == root / "sub" / "a.bin"
    assert resolve_inside(r, root / "link.bin") == root / "link.bin"
    assert resolve_inside(r, root / "sub" / ".." / "sub" / "a.bin")
    assert resolve_inside(r, root) == root


@pytest.mark.parametrize(
    "entry",
    ["../elsewhere/secret.txt", "../../../../../../../../etc/passwd", "link", "/etc/passwd"],
)
def test_resolve_inside_refuses_leaving_the_root(tmp_path, entry):
    secret = secret_file(tmp_path)
    root = tmp_path / "m"
    root.mkdir()
    os.symlink(secret, root / "link")
    with pytest.raises(CheckpointError, match="leads outside") as e:
        resolve_inside(root.resolve(), root / entry)
    msg = str(e.value)
    assert str(root.resolve()) in msg and SECRET not in msg
    assert str(secret) not in msg  # the target is not named either


def test_sibling_folder_with_common_prefix_is_outside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "x").write_text("x")
    os.symlink(tmp_path / "m2" / "x", tmp_path / "m" / "x")
    with pytest.raises(CheckpointError, match="leads outside"):
        resolve_inside((tmp_path / "m").resolve(), tmp_path / "m" / "x")


# -- regular files only -------------------------------------------------------------------


def test_open_regular_reads_a_file_and_a_named_link(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    os.symlink(p, tmp_path / "named-link.bin")
    for path in (p, tmp_path / "named-link.bin"):
        fd = open_regular(path)
        try:
            assert os.read(fd, 10) == b"hello"
            assert os.get_blocking(fd)
        finally:
            os.close(fd)


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a regular file"):
        call_with_timeout(lambda: open_regular(fifo), fifo)
    with pytest.raises(CheckpointError, match="FIFO"):
        call_with_timeout(lambda: load_json(fifo, CheckpointError), fifo)


def test_open_regular_refuses_devices_folders_sockets_and_broken_links(tmp_path):
    os.symlink("/dev/zero", tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="is a character device"):
        open_regular(tmp_path / "x.safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        open_regular(tmp_path / "d.safetensors")
    sock_path = tmp_path / "s.json"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(CheckpointError, match="is a socket"):
            open_regular(sock_path)
    os.symlink(tmp_path / "gone", tmp_path / "broken.json")
    with pytest.raises(CheckpointError, match="is a link to a missing file"):
        open_regular(tmp_path / "broken.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_regular(tmp_path / "nope.json")


def test_member_is_none_when_absent_and_checks_what_is_there(tmp_path):
    secret = secret_file(tmp_path)
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    os.symlink(secret, m / "tokenizer.json")
    os.mkfifo(m / "vocab.txt")
    assert member(m, "config.json") == m / "config.json"
    assert member(m, "merges.txt") is None
    with pytest.raises(CheckpointError, match="leads outside"):
        member(m, "tokenizer.json")
    with pytest.raises(CheckpointError, match="FIFO"):
        member(m, "vocab.txt")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json leads outside"):
        side_files(m, ["config.json", "tokenizer.json"])
    assert side_files(m, ["config.json", "merges.txt"]) == [m / "config.json"]


def test_side_files_of_a_hub_snapshot_are_allowed(tmp_path):
    snap = hub_cache(tmp_path, {"config.json": b"{}", "tokenizer.json": b'{"v": 1}'})
    files = side_files(snap, ["config.json", "tokenizer.json", "vocab.txt"])
    assert [p.name for p in files] == ["config.json", "tokenizer.json"]
    assert files[1].read_bytes() == b'{"v": 1}'


def test_check_model_folder(tmp_path):
    secret = secret_file(tmp_path)
    m = tmp_path / "m"
    (m / "sub").mkdir(parents=True)
    (m / "config.json").write_text("{}")
    os.symlink("config.json", m / "alias.json")
    check_model_folder(m)  # links inside and sub-folders are fine
    check_model_folder(hub_cache(tmp_path, {"config.json": b"{}", "model.safetensors": b"x"}))
    os.symlink(secret, m / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json leads outside"):
        check_model_folder(m)
    os.unlink(m / "tokenizer.json")
    os.mkfifo(m / "model.safetensors")
    with pytest.raises(RecipeError, match="FIFO"):
        check_model_folder(m, RecipeError)


# -- content never echoed; limits ---------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        (SECRET + "\n").encode(),
        b'{"weight_map": {"a": "' + SECRET.encode() + b'"',  # unterminated
        b'{"a": 1}\xff' + SECRET.encode(),  # not UTF-8
        b"[" * 100_000 + SECRET.encode(),  # nested too deeply for the parser
    ],
)
def test_json_errors_give_positions_not_content(tmp_path, data):
    p = tmp_path / "model.safetensors.index.json"
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"not valid (JSON|UTF-8 text)|nested") as e:
        load_json(p, CheckpointError)
    assert SECRET not in str(e.value) and "\\xff" not in str(e.value)
    assert str(p) in str(e.value)


def test_read_json_and_text_limits(tmp_path):
    p = tmp_path / "big.json"
    p.write_text('{"a": "' + "x" * 200 + '"}')
    with pytest.raises(CheckpointError, match=r"is 209 bytes; a text file may be at most 100"):
        read_text(p, CheckpointError, limit=100)
    assert load_json(p, CheckpointError) == {"a": "x" * 200}
    with pytest.raises(RecipeError, match="at most 10 bytes"):
        read_text(p, RecipeError, limit=10)
    assert read_text(p, RecipeError, limit=1000).startswith('{"a"')


def test_shown_escapes_and_shortens():
    assert shown("q_proj") == "'q_proj'"
    s = shown("\x1b[2J" + "a" * 1000)
    assert "\x1b" not in s and len(s) < 100 and "..." in s
    assert len(shown(list(range(10**6)))) < 100
