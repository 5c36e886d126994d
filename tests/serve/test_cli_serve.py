"""`splice serve` as a user runs it: a subprocess on a free port, the docs' curl call, then
SIGTERM: the server stops gracefully and exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_cli_server_curl_and_sigterm(tiny_base, adapter_root):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "splice.cli", "serve", str(tiny_base), "--port", "0"]
    argv += ["--adapter", f"support={adapter_root / 'lora'}", "--adapter-root", str(adapter_root)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert "splice serve: tiny-llama with 5 adapter(s) at http://127.0.0.1:" in line, (
            line + proc.stderr.read()
        )
        url = line.strip().split(" at ")[1].removesuffix("/v1")
        deadline = time.monotonic() + 60
        while True:  # the line is printed just before uvicorn accepts connections
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        body = {"model": "support", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        out = subprocess.run(
            ["curl", "-s", f"{url}/v1/completions", "-H", "Content-Type: application/json",
             "-d", json.dumps(body)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        answer = json.loads(out.stdout)
        assert answer["model"] == "support" and answer["usage"]["prompt_tokens"] == 5
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, proc.stderr.read()
    assert "splice serve: stopped" in proc.stdout.read()
