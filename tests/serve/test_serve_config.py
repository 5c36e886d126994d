"""`splice serve`'s config: strict YAML keys, flags over the file, and the CLI's one-line
errors (bad key, missing BASE, missing adapter folder, port in use)."""

from __future__ import annotations

import socket

import pytest

from cli_checks import fails_cleanly
from splice.serve.config import ServeConfigError, load_serve_config, parse_adapter_flags


def test_file_keys_and_flags_over_them(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text(
        "base: ./models/base\nadapters: {a: ./a}\nadapter_roots: [r1]\nport: 9000\n"
        "max_loaded_bytes: 2MB\nmax_batch: 4\n"
    )
    cfg = load_serve_config(
        str(f), {"port": 9100, "adapters": {"b": "./b"}, "adapter_roots": ["r2"], "host": None}
    )
    assert cfg.port == 9100 and cfg.host == "127.0.0.1" and cfg.max_batch == 4
    assert cfg.adapters == {"a": "./a", "b": "./b"}
    assert cfg.adapter_roots == ["r1", "r2"]
    assert cfg.loaded_bytes_budget == 2_000_000
    assert cfg.base_id() == "base"
    assert load_serve_config(None, {"base": "smollm2", "served_name": "sm"}).base_id() == "sm"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: b\nmax_batchh: 4\n", "'max_batchh'"),
        ("base: b\nmax_tokens: .nan\n", "'max_tokens'"),
        ("base: b\nshutdown_timeout: .inf\n", "'shutdown_timeout'"),
        ("base: b\nport: 70000\n", "'port'"),
        ("base: b\nadapters: {'../x': a}\n", "adapter name '../x'"),
        ("base: b\nmax_loaded_bytes: lots\n", "'max_loaded_bytes'"),
        ("- base: b\n", "expected a mapping"),
        ("port: 1\n", "no base model"),
        ("base: b\nadapters: {b: ./x}\n", "is the base model's id"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    f = tmp_path / "serve.yaml"
    f.write_text(text)
    with pytest.raises(ServeConfigError) as e:
        load_serve_config(str(f), {})
    assert message in str(e.value)


def test_unknown_key_names_the_closest(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text("base: b\nmax_batchh: 4\n")
    with pytest.raises(ServeConfigError, match="did you mean 'max_batch'"):
        load_serve_config(str(f), {})


def test_adapter_flags():
    assert parse_adapter_flags(["a=x/y", "b=z=w"]) == {"a": "x/y", "b": "z=w"}
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(ServeConfigError):
            parse_adapter_flags(bad)


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_base):
    f = tmp_path / "serve.yaml"
    f.write_text("base: b\nportt: 1\n")
    assert "'portt'" in fails_cleanly(["serve", "--config", str(f)], capsys)
    assert "no base model" in fails_cleanly(["serve"], capsys)
    assert "does not exist" in fails_cleanly(["serve", "--config", str(tmp_path / "no")], capsys)
    err = fails_cleanly(["serve", str(tiny_base), "--adapter", "a=" + str(tmp_path / "no")], capsys)
    assert "no such folder" in err
    err = fails_cleanly(["serve", str(tiny_base), "--adapter-root", str(tmp_path / "no")], capsys)
    assert "is not a folder" in err
    assert "no such folder" in fails_cleanly(["serve", str(tmp_path / "nobase")], capsys)
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [{name: a, sha256: abc}]\n")
    err = fails_cleanly(["serve", str(tiny_base), "--api-keys", str(keys)], capsys)
    assert "64 hex digits" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        err = fails_cleanly(["serve", str(tiny_base), "--port", str(port)], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_serve_key_prints_a_matching_hash(capsys, monkeypatch):
    import io

    from splice.cli import main
    from splice.serve.api_keys import hash_key

    assert main(["serve-key", "--name", "alice"]) == 0
    out = capsys.readouterr().out
    key = out.split("it is not stored): ")[1].split()[0]
    assert key.startswith("sk-splice-") and f"sha256: {hash_key(key)}" in out
    assert "name: alice" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("my-key\n"))
    assert main(["serve-key", "--stdin"]) == 0
    assert f"sha256: {hash_key('my-key')}" in capsys.readouterr().out


def test_compositions_are_averages_of_adapter_names(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text(
        "base: b\ncompositions:\n  mix: {average: {a: 3, b: 1}}\n  even: {average: [a, c]}\n"
    )
    cfg = load_serve_config(str(f), {})
    assert cfg.composition_sets() == {
        "mix": (("a", 0.75), ("b", 0.25)),
        "even": (("a", 0.5), ("c", 0.5)),
    }
    bad = {
        "{stack: [a, b]}": "only an average of adapter names",
        "{average: [a, {stack: [b, c]}]}": "only an average of adapter names",
        "{averag: [a, b]}": "unknown block 'averag'",
        "{average: ['../a', b]}": "not a plain name",
    }
    for block, message in bad.items():
        f.write_text(f"base: b\ncompositions: {{mix: {block}}}\n")
        with pytest.raises(ServeConfigError, match=message):
            load_serve_config(str(f), {})
    f.write_text("base: b\nadapters: {mix: ./m}\ncompositions: {mix: {average: [a, b]}}\n")
    with pytest.raises(ServeConfigError, match="composition name 'mix' is also"):
        load_serve_config(str(f), {})
