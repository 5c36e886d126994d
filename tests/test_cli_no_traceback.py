"""Every subcommand, on malformed inputs: exit 1, one `splice: error:` line, no traceback,
and no output left behind.

The matrix: each command that reads a user file is run on each kind of malformed file
that command can meet (missing, a folder, undecodable bytes, invalid / too deeply nested /
wrongly shaped YAML or JSON, empty, a CSV field over the csv module's default limit, a bad
JSON Lines line, an invalid `re:` filter, ...; data files and `--param` are in
test_cli_no_traceback_data.py). Commands without inputs
(`methods`, `adapters`, `lora methods`, `data list`) must simply succeed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from tiny_models import tiny_tensors, write_folder

from cli_checks import DEEP_JSON, DEEP_YAML, fails_cleanly, no_output
from splice.cli import main

# -- malformed files ---------------------------------------------------------------------

# Files that are malformed as any YAML document (a config or a recipe).
YAML_KINDS: dict[str, bytes | None] = {
    "missing": None,
    "folder": b"",  # made a folder below
    "undecodable": b"method: linear\nmodels: \xff\xfe\n",
    "invalid yaml": b"method: [linear\nmodels: {\n",
    "deeply nested yaml": DEEP_YAML.encode(),
    "a list": b"- method: linear\n- models: []\n",
    "a scalar": b"just some words\n",
    "empty": b"",
    "tab indentation": b"method: linear\n\tmodels: []\n",
}
# Files that are malformed as a JSON object (config.json, adapter_config.json, manifests).
JSON_KINDS: dict[str, bytes] = {
    "undecodable": b'{"a": "\xff"}',
    "invalid json": b'{"peft_type": "LORA",',
    "deeply nested json": DEEP_JSON.encode(),
    "a list": b"[1, 2, 3]",
    "a string": b'"LORA"',
    "empty": b"",
}


def _write(path: Path, content: bytes | None) -> Path:
    if content is not None:
        path.write_bytes(content)
    return path


def _yaml_file(tmp_path: Path, kind: str) -> Path:
    if kind == "folder":
        (tmp_path / "folder.yaml").mkdir()
        return tmp_path / "folder.yaml"
    return _write(tmp_path / "bad.yaml", YAML_KINDS[kind])


def _side_folder(tmp_path: Path, file: str, kind: str) -> Path:
    """A folder whose side file ``file`` is malformed as ``kind`` (JSON_KINDS)."""
    d = tmp_path / "side"
    d.mkdir(exist_ok=True)
    (d / file).write_bytes(JSON_KINDS[kind])
    return d


# -- YAML inputs: merge, train, bench --------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(YAML_KINDS))
@pytest.mark.parametrize(
    "command",
    [
        lambda f, o: ["merge", str(f), "--out", str(o), "--quiet"],
        lambda f, o: ["train", str(f), "--out", str(o), "--quiet"],
        lambda f, o: ["bench", str(f), "--out", str(o), "--quiet"],
    ],
    ids=["merge", "train", "bench"],
)
def test_yaml_inputs(tmp_path, capsys, command: Callable, kind: str):
    f = _yaml_file(tmp_path, kind)
    out = tmp_path / "out"
    fails_cleanly(command(f, out), capsys)
    if command(f, out)[0] != "bench":  # bench's --out is made first (not this check's)
        no_output(out)


def test_yaml_errors_name_the_file_and_place(tmp_path, capsys):
    err = fails_cleanly(["merge", str(_yaml_file(tmp_path, "undecodable")), "--out", "o"], capsys)
    assert "bad.yaml is not valid UTF-8 text (invalid byte at offset 23, line 2)" in err
    err = fails_cleanly(["merge", str(_yaml_file(tmp_path, "invalid yaml")), "--out", "o"], capsys)
    assert "bad.yaml: not valid YAML:" in err and "(line 2, column 7)" in err
    err = fails_cleanly(
        ["train", str(_yaml_file(tmp_path, "deeply nested yaml")), "--out", "o"], capsys
    )
    assert "bad.yaml: nested more than 100 levels deep" in err
    err = fails_cleanly(["bench", str(_yaml_file(tmp_path, "a list")), "--out", "o"], capsys)
    assert "expected a mapping at the top level" in err
    err = fails_cleanly(["train", str(tmp_path), "--out", "o"], capsys)
    assert f"{tmp_path} is a folder, not a regular file" in err


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        ("re:(", "missing ), unterminated subpattern"),
        ("re:[a-", "unterminated character set"),
        ("re:*x", "nothing to repeat"),
        ("re:(?P<1>x)", "bad character in group name"),
    ],
)
def test_invalid_re_filter_names_its_key(tmp_path, capsys, flt, message):
    base = write_folder(tmp_path / "base", tiny_tensors(0))
    recipe = {
        "method": "linear",
        "models": [{"model": base}, {"model": base}],
        "parameters": {"weight": [{"filter": flt, "value": 1.0}, {"value": 0.5}]},
    }
    f = tmp_path / "r.yaml"
    f.write_text(json.dumps(recipe))
    err = fails_cleanly(["merge", str(f), "--out", str(tmp_path / "o")], capsys)
    assert "parameters.weight.0.filter: invalid regular expression" in err
    assert message in err
    no_output(tmp_path / "o")


# -- the base config.json: checked before any tensor is written ------------------------------


@pytest.mark.parametrize("kind", sorted(JSON_KINDS))
def test_bad_config_json_leaves_no_output(tmp_path, capsys, kind):
    base = Path(write_folder(tmp_path / "base", tiny_tensors(0)))
    ft = write_folder(tmp_path / "ft", tiny_tensors(1))
    (base / "config.json").write_bytes(JSON_KINDS[kind])
    f = tmp_path / "r.yaml"
    f.write_text(
        json.dumps(
            {"method": "task_arithmetic", "base_model": str(base), "models": [{"model": ft}]}
        )
    )
    out = tmp_path / "merged"
    err = fails_cleanly(["merge", str(f), "--out", str(out), "--quiet"], capsys)
    assert f"{base / 'config.json'}" in err
    no_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "r.yaml"]


# -- side files of checkpoints, adapters, stores, compressed folders, states -----------------

SIDE_CASES = [
    # (side file, argv for the folder d and an output o)
    ("model.safetensors.index.json", lambda d, o: ["inspect", str(d)]),
    ("model.safetensors.index.json", lambda d, o: ["inspect", str(d), str(d)]),
    (
        "model.safetensors.index.json",
        lambda d, o: [
            "compress",
            "tall",
            "--base",
            str(d),
            "--models",
            str(d),
            str(d),
            "--out",
            str(o),
        ],
    ),
    ("splice_compress.json", lambda d, o: ["restore", str(d), "--task", "0", "--out", str(o)]),
    (
        "splice_continual.json",
        lambda d, o: [
            "merge",
            "--continual",
            str(d),
            "--base",
            str(d),
            "--add",
            str(d),
            "--out",
            str(o),
        ],
    ),
    (
        "adapter_config.json",
        lambda d, o: ["lora", "merge", str(d), str(d), "--method", "svd", "--out", str(o)],
    ),
    (
        "adapter_config.json",
        lambda d, o: ["lora", "rmm", str(d), str(d), "--k", "1", "--out", str(o)],
    ),
    (
        "adapter_config.json",
        lambda d, o: ["lora", "compeft", str(d), "--density", "0.5", "--out", str(o)],
    ),
    ("rmm.json", lambda d, o: ["lora", "rmm-recover", str(d), "--task", "0", "--out", str(o)]),
    (
        "model.safetensors.index.json",
        lambda d, o: [
            "lora",
            "extract",
            "--base",
            str(d),
            "--model",
            str(d),
            "--rank",
            "1",
            "--out",
            str(o),
        ],
    ),
]


@pytest.mark.parametrize("kind", sorted(JSON_KINDS))
@pytest.mark.parametrize(
    ("side", "command"), SIDE_CASES, ids=[f"{c(Path('d'), Path('o'))[0:2]}" for _, c in SIDE_CASES]
)
def test_malformed_side_files(tmp_path, capsys, side, command, kind):
    d = _side_folder(tmp_path, side, kind)
    out = tmp_path / "out"
    fails_cleanly(command(d, out), capsys)
    no_output(out)


@pytest.mark.parametrize(
    "argv",
    [
        lambda p: ["inspect", str(p / "missing")],
        lambda p: ["inspect", str(p)],  # an empty folder
        lambda p: [
            "compress",
            "tall",
            "--base",
            str(p),
            "--models",
            str(p),
            str(p),
            "--out",
            str(p / "o"),
        ],
        lambda p: ["restore", str(p), "--task", "0", "--out", str(p / "o")],
        lambda p: ["lora", "merge", str(p / "missing"), "--method", "svd", "--out", str(p / "o")],
        lambda p: ["lora", "compeft", str(p), "--density", "0.5", "--out", str(p / "o")],
        lambda p: [
            "lora",
            "extract",
            "--base",
            str(p),
            "--model",
            str(p),
            "--rank",
            "1",
            "--targets",
            "(",
            "--out",
            str(p / "o"),
        ],
        lambda p: [
            "lora",
            "extract",
            "--base",
            str(p),
            "--model",
            str(p),
            "--rank",
            "1",
            "--exclude",
            "[",
            "--out",
            str(p / "o"),
        ],
        lambda p: ["demo", "--out", str(p / "a-file")],
        lambda p: ["demo", "--synthetic", "--out", str(p / "a-file" / "x")],
    ],
)
def test_missing_or_empty_inputs(tmp_path, capsys, argv):
    (tmp_path / "a-file").write_text("not a folder")
    fails_cleanly(argv(tmp_path), capsys)
    assert not (tmp_path / "o").exists()


# -- commands without inputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["methods"], ["adapters"], ["lora", "methods"], ["data", "list", "--cache-dir", "."]]
)
def test_commands_without_inputs_succeed(capsys, argv):
    assert main(argv) == 0
    assert "Traceback" not in capsys.readouterr().err
