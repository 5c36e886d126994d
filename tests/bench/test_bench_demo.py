"""`splice demo` runs the real bench demo; `splice demo --synthetic` the synthetic one."""

from __future__ import annotations

import pytest

import splice.demo
from splice.cli import build_parser, main


@pytest.mark.parametrize(
    ("argv", "called"),
    [(["demo"], "run_bench_demo"), (["demo", "--synthetic", "--quiet"], "run_demo")],
)
def test_demo_dispatch(monkeypatch, tmp_path, argv, called):
    calls = []
    for name in ("run_demo", "run_bench_demo"):
        monkeypatch.setattr(
            splice.demo, name, lambda out, progress, name=name: calls.append((name, out, progress))
        )
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert calls == [(called, str(tmp_path), "--quiet" not in argv)]


def test_demo_flags():
    args = build_parser().parse_args(["demo", "--synthetic"])
    assert args.synthetic and args.out == "splice-demo"
    assert not build_parser().parse_args(["demo"]).synthetic


def test_bench_command_is_registered(tmp_path, capsys):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("tasks: [a.csv, b.csv]\nmerge: {methods: [tise]}\n")
    assert main(["bench", str(cfg), "--out", str(tmp_path / "out")]) == 1
    assert "did you mean 'ties'" in capsys.readouterr().err
