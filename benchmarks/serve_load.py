#!/usr/bin/env python
"""Loopback load test of an OpenAI-compatible server (`splice serve`, or the Ray Serve app).

Run by hand (not in CI), from the repository root with the dev environment active:

    # start `splice serve` itself on SmolLM2-135M with 64 random LoRA adapters, then run
    # 16 concurrent clients over 1, 8 and 64 adapters, plus one-request-at-a-time:
    python benchmarks/serve_load.py --start smollm2 --adapters 1,8,64 --concurrency 1,16

    # against a server that is already running (its pid for the RSS column):
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --models a0,a1 --server-pid PID

    # a soak: 16 clients over 8 adapters for 10 minutes, RSS sampled every 5 s
    python benchmarks/serve_load.py --start smollm2 --adapters 8 --concurrency 16 \
        --soak 600 --rss-every 5

What it measures, per (adapters M, concurrent clients N): N client tasks (asyncio + httpx)
send `/v1/completions` requests, request i naming adapter i mod M (`model`), each a fixed
prompt of --prompt-tokens tokens and `max_tokens` = --max-tokens, greedy (temperature 0),
streamed (SSE) so the time to the first token is seen. Per configuration: throughput
(generated tokens / wall seconds, wall from the first send to the last answer), latency
p50 / p99 (send to last byte), time-to-first-token p50 / p99, errors (non-2xx, broken
streams, timeouts), mean generated tokens per request, and the server's resident set size
(psutil on the server pid plus its children) sampled every --rss-every seconds, with its
least-squares slope over the last two thirds of the run (MiB/min; the first third holds the
warm-up growth: the KV cache reaching its largest batch, the allocator's pools).

Soak (--soak SECONDS): each adapter count at the largest client count, run for
that long instead of the request cap; the requests still in flight at the end are cancelled
(reported as "cut", not as errors), so a slow server does not stretch the run. It adds
tokens/s and errors per --soak-window seconds
(by the time each request finished) and a verdict line, PASS when there were 0 errors and the
RSS slope is within +-(--rss-flat) MiB/min (default 1.0: at most ~10 MiB of drift over a
10-minute soak, against a ~1 GiB SmolLM2 server), FAIL otherwise; the exit status is 1 on FAIL.

Output lengths: the OpenAI API has no "ignore EOS"; the prompt is a long comma-separated count
("1, 2, 3, ...") that a language model continues rather than ends, and the table reports the
mean generated tokens so a short answer shows. `--ignore-eos` also sends vLLM's
``ignore_eos: true`` (only for servers that accept it).

Bounds (it is a loopback tool, not a traffic generator): the URL's host must be 127.0.0.1,
localhost or ::1 (anything else is refused before any request); every configuration stops at
--requests requests or --max-seconds seconds, whichever comes first (hard caps: 20 000
requests, one hour); a soak stops at its duration (at most one hour).

Adapters for --start: M LoRA r8 (alpha 16, q/k/v/o projections) adapters of the base, written
as PEFT folders a0..a{M-1} in a temporary --adapter-root, A from the usual initialisation and
B ~ N(0, 0.02^2) (non-zero, so every adapter changes the output); the server is started as
`python -m splice.cli serve BASE --adapter-root ROOT --host 127.0.0.1 --port PORT
--max-loaded M` (plus any --server-arg), and stopped (SIGINT, then SIGTERM) at the end.
Before timing, one short request per adapter loads every adapter (not counted).

Results: a markdown table on stdout and a JSON report at --out. On a shared, loaded machine
the figures are indicative only; the report records the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
HARD_MAX_REQUESTS = 20_000
HARD_MAX_SECONDS = 3600.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def http_client_module():
    """httpx's API: ``httpx2`` (what the installed openai client uses), else ``httpx``."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


class LoadTestError(Exception):
    """A bad argument or a server that did not start (printed as one line)."""


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if it is http(s) on a loopback host; else refuse."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise LoadTestError(f"--url must be http:// or https://, got {url!r}")
    if (parts.hostname or "").lower() not in LOOPBACK_HOSTS:
        raise LoadTestError(
            f"--url host {parts.hostname!r} is not a loopback address: this tool only loads "
            f"{', '.join(sorted(LOOPBACK_HOSTS))}"
        )
    return url.rstrip("/")


# -- the server under test ------------------------------------------------------------------


def make_lora_adapters(base_folder: Path, root: Path, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` LoRA adapters a0.. of the base under ``root`` (B random, non-zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    from splice.adapters import AdapterModel, make_config, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    am = AdapterModel(model)
    config = make_config("lora", {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS})
    names = []
    for i in range(count):
        name = f"a{i}"
        am.add_adapter(name, config)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for _, module in am.named_adapter_modules(name):
                b = module.lora_B.weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        save_adapter(am, root / name, name, base_model_name_or_path=str(base_folder))
        am.delete_adapter(name)
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`splice serve` as a child process on 127.0.0.1 (started, waited for, stopped)."""

    def __init__(
        self, base: str, adapter_root: Path, max_loaded: int, extra: list[str], env: list[str]
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "splice.cli", "serve", base, "--adapter-root",
               str(adapter_root), "--host", "127.0.0.1", "--port", str(self.port),
               "--max-loaded", str(max_loaded), *extra]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        print("server:", " ".join(cmd), flush=True)
        environ = {**os.environ, **dict(item.split("=", 1) for item in env)}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=environ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        httpx = http_client_module()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadTestError(
                    f"the server exited with {self.proc.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise LoadTestError(f"the server did not answer /health in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: drains in-flight requests
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(10)
        self.log.close()


class RssSampler:
    """The resident set size of a process and its children, sampled every ``every`` s."""

    def __init__(self, pid: int | None, every: float):
        import psutil

        self.proc = psutil.Process(pid) if pid else None
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._task: asyncio.Task | None = None
        self._t0 = time.monotonic()

    def sample(self) -> float | None:
        import psutil

        if self.proc is None:
            return None
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            rss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
        except psutil.Error:
            return None
        mib = rss / 2**20
        self.samples.append((round(time.monotonic() - self._t0, 1), round(mib, 1)))
        return mib

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def start(self) -> None:
        if self.proc is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> list[tuple[float, float]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        return self.samples


# -- the clients ------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    ttft_s: float | None
    tokens: int
    error: str | None = None
    done_s: float = 0.0  # when it finished, seconds since the load started (set by run_load)


@dataclass
class LoadSpec:
    url: str
    models: list[str]
    concurrency: int
    prompt: str
    max_tokens: int
    requests: int
    max_seconds: float
    ignore_eos: bool = False
    stream: bool = True
    api_key: str | None = None
    timeout_s: float = 300.0
    extra: dict = field(default_factory=dict)
    cut_at_deadline: bool = False  # soak: cancel the requests still in flight at max_seconds


def counting_prompt(tokenizer, n_tokens: int) -> str:
    """A comma-separated count "1, 2, 3, ..." cut to ``n_tokens`` tokens (words if no
    tokenizer): a text a language model goes on continuing rather than ending."""
    text = ", ".join(str(i) for i in range(1, 4 * n_tokens + 2))
    if tokenizer is None:
        return " ".join(text.split(" ")[:n_tokens])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


async def one_request(client, spec: LoadSpec, model: str, max_tokens: int) -> Outcome:
    """One completion; streamed: the time of the first chunk that adds text is the TTFT, the
    generated tokens are the chunks carrying a choice (or the usage, when the server sends it)."""
    body = {"model": model, "prompt": spec.prompt, "max_tokens": max_tokens,
            "temperature": 0, "stream": spec.stream, **spec.extra}  # fmt: skip
    if spec.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        if not spec.stream:
            r = await client.post(spec.url + "/v1/completions", json=body)
            if r.status_code != 200:
                return Outcome(False, time.perf_counter() - start, None, 0, f"HTTP {r.status_code}")
            usage = r.json().get("usage") or {}
            return Outcome(
                True, time.perf_counter() - start, None, usage.get("completion_tokens", 0)
            )
        async with client.stream("POST", spec.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(False, time.perf_counter() - start, None, 0, f"HTTP {r.status_code}")
            usage_tokens = None
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    return Outcome(False, time.perf_counter() - start, ttft, tokens, "stream error")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        tokens += 1
                    elif choice.get("finish_reason") is None:
                        tokens += 1  # a token that adds no text yet (part of a character)
            if not done:
                return Outcome(False, time.perf_counter() - start, ttft, tokens, "no [DONE]")
            return Outcome(True, time.perf_counter() - start, ttft, usage_tokens or tokens)
    except Exception as e:  # a broken connection or timeout counts as an error, not a crash
        return Outcome(False, time.perf_counter() - start, ttft, tokens, type(e).__name__)


async def run_load(spec: LoadSpec, rss: RssSampler | None = None) -> dict:
    """N client tasks share a request counter; each sends its next request as soon as its
    previous one is answered, until --requests are sent or --max-seconds have passed."""
    httpx = http_client_module()
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=spec.concurrency + 4)
    outcomes: list[Outcome] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + spec.max_seconds

    async def client_task(client) -> None:
        nonlocal sent
        while sent < spec.requests and time.perf_counter() < deadline:
            model = spec.models[sent % len(spec.models)]
            sent += 1
            outcome = await one_request(client, spec, model, spec.max_tokens)
            outcome.done_s = time.perf_counter() - start
            outcomes.append(outcome)

    cut = 0
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=spec.timeout_s) as client:
        if rss is not None:
            rss.start()
        tasks = [asyncio.ensure_future(client_task(client)) for _ in range(spec.concurrency)]
        if spec.cut_at_deadline:
            _, pending = await asyncio.wait(tasks, timeout=spec.max_seconds)
            for task in pending:  # a request in flight at the deadline: cut, not counted
                task.cancel()
            cut = len(pending)
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - start
    if spec.cut_at_deadline:
        wall = min(wall, spec.max_seconds)
    samples = await rss.stop() if rss is not None else []
    return {**summarize(outcomes, wall, samples), "cut_at_deadline": cut}


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least q% of values <= it)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def slope_per_minute(samples: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of the last two thirds of (seconds, MiB) samples, in MiB per
    minute (flat RSS: ~0). The first third is left out: it holds the warm-up growth (the KV
    cache reaching its largest batch, the allocator's pools), which is not a leak."""
    samples = samples[len(samples) // 3 :]
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return round(60 * sum((t - mt) * (m - mm) for t, m in samples) / var, 2)


def windows(outcomes: list[Outcome], wall: float, width: float) -> list[dict]:
    """Requests, errors and generated tokens/s per ``width``-second window of the run, each
    request counted in the window where it finished (the last window may be shorter)."""
    out = []
    for k in range(max(1, math.ceil(wall / width))):
        lo, hi = k * width, min((k + 1) * width, wall)
        inside = [o for o in outcomes if lo <= o.done_s < hi or (hi == wall and o.done_s >= hi)]
        tokens = sum(o.tokens for o in inside if o.ok)
        out.append({"start_s": round(lo), "end_s": round(hi), "requests": len(inside),
                    "errors": sum(not o.ok for o in inside),
                    "tokens_per_s": round(tokens / (hi - lo), 2) if hi > lo else None})  # fmt: skip
    return out


def soak_verdict(row: dict, flat: float) -> str:
    """PASS when the soak had 0 errors and its RSS slope is within +-``flat`` MiB/min."""
    slope = row["rss_slope_mib_per_min"]
    problems = []
    if row["errors"]:
        problems.append(f"{row['errors']} error(s) {row['error_kinds']}")
    if slope is None:
        problems.append("no RSS slope (no server pid, or too few samples)")
    elif abs(slope) > flat:
        problems.append(f"RSS slope {slope:+.2f} MiB/min beyond +-{flat} MiB/min")
    verdict = "FAIL: " + "; ".join(problems) if problems else "PASS"
    return (f"soak {row['wall_s']:.0f} s, {row['adapters']} adapter(s), {row['clients']} "
            f"client(s): {row['requests']} requests ({row['cut_at_deadline']} more cut at the "
            f"end), {row['errors']} errors, RSS slope "
            f"{fmt(slope, 1, 2)} MiB/min over the last 2/3 (flat: within +-{flat}): "
            f"{verdict}")  # fmt: skip


def summarize(outcomes: list[Outcome], wall: float, rss: list[tuple[float, float]]) -> dict:
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in good)
    lat = [o.latency_s for o in good]
    ttft = [o.ttft_s for o in good if o.ttft_s is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error or "?"] = errors.get(o.error or "?", 0) + 1
    mib = [m for _, m in rss]
    return {
        "requests": len(outcomes),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "mean_tokens_per_request": round(tokens / len(good), 1) if good else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "rss_first_mib": mib[0] if mib else None,
        "rss_last_mib": mib[-1] if mib else None,
        "rss_max_mib": max(mib) if mib else None,
        "rss_slope_mib_per_min": slope_per_minute(rss),
        "rss_samples": rss,
        "_outcomes": outcomes,  # dropped before the report is written (windows use them)
    }


async def warm_up(spec: LoadSpec, concurrency: int = 16) -> None:
    """One 1-token request per adapter, ``concurrency`` at a time (loads every adapter; not
    timed)."""
    httpx = http_client_module()
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    gate = asyncio.Semaphore(concurrency)

    async def one(client, model: str) -> None:
        async with gate:
            out = await one_request(client, spec, model, 1)
        if not out.ok:
            raise LoadTestError(f"warm-up request for model {model!r} failed: {out.error}")

    async with httpx.AsyncClient(headers=headers, timeout=spec.timeout_s) as client:
        await asyncio.gather(*(one(client, m) for m in spec.models))


# -- the report -------------------------------------------------------------------------------


def fmt(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "—" if x is None else f"{x * scale:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    head = ["adapters", "clients", "requests", "errors", "tok/s", "tok/req", "p50 ms",
            "p99 ms", "TTFT p50 ms", "TTFT p99 ms", "RSS MiB (first→last, max)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        rss = (f"{fmt(r['rss_first_mib'])}→{fmt(r['rss_last_mib'])}, {fmt(r['rss_max_mib'])}"
               if r["rss_first_mib"] is not None else "—")  # fmt: skip
        cells = [r["adapters"], r["clients"], r["requests"], r["errors"],
                 fmt(r["tokens_per_s"], 1, 1), fmt(r["mean_tokens_per_request"], 1, 1),
                 fmt(r["latency_p50_s"], 1e3), fmt(r["latency_p99_s"], 1e3),
                 fmt(r["ttft_p50_s"], 1e3), fmt(r["ttft_p99_s"], 1e3),
                 rss]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """The issue's two targets, where the grid has the rows to compute them."""
    out = []
    by = {(r["adapters"], r["clients"]): r["tokens_per_s"] for r in rows if r["tokens_per_s"]}
    clients = sorted({c for _, c in by})
    adapters = sorted({a for a, _ in by})
    for c in clients:
        if (1, c) in by and len(adapters) > 1:
            top = adapters[-1]
            if (top, c) in by:
                out.append(f"{c} clients: tok/s with {top} adapters / with 1 = "
                           f"{by[(top, c)] / by[(1, c)]:.2f} (target >= 0.9)")  # fmt: skip
    for a in adapters:
        if (a, 1) in by:
            for c in clients:
                if c > 1 and (a, c) in by:
                    out.append(f"{a} adapter(s): tok/s with {c} clients / one at a time = "
                               f"{by[(a, c)] / by[(a, 1)]:.2f} (target >= 3 at 16)")  # fmt: skip
    return out


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(), "python": sys.version.split()[0]}  # fmt: skip


def write_report(a: argparse.Namespace, url: str, rows: list[dict]) -> None:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(a), "machine": machine(), "url": url, "rows": rows,
              "ratios": ratios(rows)}  # fmt: skip
    Path(a.out).write_text(json.dumps(report, indent=2, default=str))


def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise LoadTestError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server (loopback only)")
    where.add_argument("--start", metavar="BASE", help="start `splice serve BASE` itself")
    ap.add_argument("--models", help="with --url: the adapter names to spread requests over")
    ap.add_argument("--server-pid", type=int, help="with --url: the server's pid (RSS column)")
    ap.add_argument("--adapters", default="1,8,64", help="with --start: adapter counts M")
    ap.add_argument("--concurrency", default="1,16", help="concurrent clients N (1: one at a time)")
    ap.add_argument("--requests", type=int, default=64, help="requests per configuration")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="per configuration")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: true")
    ap.add_argument("--no-stream", action="store_true", help="no SSE (no TTFT column)")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="one long run of this length")
    ap.add_argument("--rss-every", type=float, default=1.0, help="RSS sampling period, seconds")
    ap.add_argument("--soak-window", type=float, default=60.0, help="soak: window, seconds")
    ap.add_argument("--rss-flat", type=float, default=1.0,
                    help="soak: the largest |RSS slope| (MiB/min) that passes")  # fmt: skip
    ap.add_argument("--api-key", default=os.environ.get("SPLICE_API_KEY"))
    ap.add_argument("--server-arg", action="append", default=[], help="extra `splice serve` arg")
    ap.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE",
        help="environment of the started server, e.g. OMP_NUM_THREADS=1",
    )  # fmt: skip
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--out", default=".bench/serve_load.json")
    a = ap.parse_args(argv)
    if not 1 <= a.requests <= HARD_MAX_REQUESTS:
        raise LoadTestError(f"--requests must be in 1..{HARD_MAX_REQUESTS}")
    for flag, value in (("--max-seconds", a.max_seconds), ("--soak", a.soak)):
        if value is not None and not 0 < value <= HARD_MAX_SECONDS:
            raise LoadTestError(f"{flag} must be in (0, {HARD_MAX_SECONDS:.0f}] seconds")
    if any("=" not in item for item in a.server_env):
        raise LoadTestError("--server-env takes KEY=VALUE")
    if a.url:
        a.url = check_loopback(a.url)
        if not a.models:
            raise LoadTestError("--url needs --models NAME[,NAME...] (the base model's name works)")
    return a


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped too
    try:
        a = parse_args(argv)
        return asyncio.run(_main(a))
    except LoadTestError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2


async def _main(a: argparse.Namespace) -> int:
    concurrency = int_list(a.concurrency)
    server = None
    tmp = None
    tokenizer = None
    try:
        if a.start:
            from transformers import AutoTokenizer

            from splice.train.models import resolve_model

            base = resolve_model(a.start)
            tokenizer = AutoTokenizer.from_pretrained(base)
            counts = int_list(a.adapters)
            tmp = tempfile.TemporaryDirectory(prefix="serve_load_")
            print(f"writing {max(counts)} LoRA adapters to {tmp.name} ...", flush=True)
            all_names = make_lora_adapters(base, Path(tmp.name), max(counts))
            server = ServerProcess(
                str(base), Path(tmp.name), max(counts), a.server_arg, a.server_env
            )
            server.wait_ready(a.startup_timeout)
            url, pid = server.url, server.pid
            grid_models = [(m, all_names[:m]) for m in counts]
        else:
            url, pid = a.url, a.server_pid
            names = [m for m in a.models.split(",") if m]
            grid_models = [(len(names), names)]
        prompt = counting_prompt(tokenizer, a.prompt_tokens)
        rows = []
        for m, names in grid_models:
            spec = LoadSpec(url, names, 1, prompt, a.max_tokens, a.requests, a.max_seconds,
                            a.ignore_eos, not a.no_stream, a.api_key)  # fmt: skip
            await warm_up(spec)
            for n in [max(concurrency)] if a.soak else concurrency:
                spec.concurrency = n
                if a.soak:
                    spec.requests, spec.max_seconds = HARD_MAX_REQUESTS, a.soak
                    spec.cut_at_deadline = True
                print(f"-- {m} adapter(s), {n} client(s) ...", flush=True)
                result = await run_load(spec, RssSampler(pid, a.rss_every) if pid else None)
                outcomes = result.pop("_outcomes")
                if a.soak:
                    result["windows"] = windows(outcomes, result["wall_s"], a.soak_window)
                rows.append({"adapters": m, "clients": n, **result})
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
                write_report(a, url, rows)  # after each row: a cut-short run keeps its rows
        info = machine()
        print(f"\nprompt {a.prompt_tokens} tokens, max_tokens {a.max_tokens}, greedy; "
              f"load average {info['load_avg_1m']} on {info['cpus']} CPUs")  # fmt: skip
        print(markdown(rows))
        for line in ratios(rows):
            print(line)
        for r in rows:
            slope = r["rss_slope_mib_per_min"]
            if slope is not None and r["wall_s"] >= 60:  # shorter: mostly warm-up
                print(f"{r['adapters']} adapter(s), {r['clients']} client(s): server RSS slope "
                      f"{slope:+.2f} MiB/min over {r['wall_s']:.0f} s")  # fmt: skip
        verdicts = []
        if a.soak:
            for r in rows:
                print("\n| window s | requests | errors | tok/s |\n|---|---|---|---|")
                for w in r["windows"]:
                    print(f"| {w['start_s']}-{w['end_s']} | {w['requests']} | {w['errors']} | "
                          f"{fmt(w['tokens_per_s'], 1, 1)} |")  # fmt: skip
                verdicts.append(soak_verdict(r, a.rss_flat))
                r["verdict"] = verdicts[-1]
                print(verdicts[-1])
        write_report(a, url, rows)
        print(f"report: {a.out}")
        failed = any(r["errors"] for r in rows) or any("FAIL" in v for v in verdicts)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
