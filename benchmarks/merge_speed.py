#!/usr/bin/env python
"""Merge speed and memory: `splice merge` against `mergekit-yaml` on the same recipe files.

Run by hand (not in CI), from the repository root with the dev environment active:

    python benchmarks/merge_speed.py                 # full size (~0.37B parameters, bf16)
    python benchmarks/merge_speed.py --size small    # ~0.1B parameters
    python benchmarks/merge_speed.py --quick         # 6 layers, a fast check of the script
    python benchmarks/merge_speed.py --recipes ties,slerp --dtypes bfloat16 --runs 3

What it does:

1. Builds, once (cached under --work, default .bench/), a synthetic Llama-shaped base in
   bfloat16 (hidden 1024, intermediate 2816, 24 layers, 16 heads, vocab 32000, untied
   lm_head; a LlamaForCausalLM config.json so mergekit recognizes the architecture),
   sharded at 500 MB with model.safetensors.index.json, and three fine-tunes (base plus
   small random deltas, a different seed and scale per model). Tensors are generated and
   written one at a time, so building needs memory for a few tensors only.
2. Writes mergekit-format recipes (the same file goes to both tools), each in two compute
   dtypes (--dtypes): `dtype: float32` with `out_dtype: bfloat16`, and `dtype: bfloat16`
   (mergekit's arithmetic in bf16, which splice's mergekit dialect repeats). Recipes:
   TIES and DARE-TIES (density 0.2/0.3/0.5, weight 1/0.8/0.6, normalize true),
   task_arithmetic (weight 1/0.8/0.6), SLERP (base and ft0, t 0.5) and Model Stock (base
   and the three fine-tunes). DARE-TIES draws random masks: the two tools' generators
   differ, so its outputs are compared but not expected to be identical.
3. Times each tool as a subprocess (the whole process: start-up, imports, merge, writing),
   --runs times per recipe (at least 2), interleaved (run 1 of splice and of every mergekit
   configuration, then run 2, ...), and reports min and median wall time, and the median
   CPU time (user + sys of the process tree, from GNU time: on a machine shared with other
   jobs, the figure that still compares between tools and runs). Each tool's start-up (a
   process that only imports what its merge command imports: interpreter, torch, the
   tool) is timed too, and the table also shows median wall minus start-up and the
   speedup on that. Both tools run from bytecode (PYTHONDONTWRITEBYTECODE is dropped), as
   installed tools do. Before every
   run the inputs are read once (page cache warm, the same state for every run) and
   `sync` flushes earlier runs' dirty pages, so no run pays for another's writes.
   mergekit-yaml is run in several configurations (defaults, -j 2, --async-write, both);
   the table shows each, and the ratios use mergekit's best (lowest median) one.
4. Memory: peak RSS, two ways: the kernel's peak RSS of the tool's process (GNU
   `/usr/bin/time -f %M`; exact, but of the largest single process of the tree) and the sum
   of RSS over the process tree polled with psutil every 50 ms (misses spikes shorter than
   that). The table shows the larger of the two.
5. I/O floor: plain Python reads of every input byte (page cache warm, as for the tools)
   plus the faster of two writes of one output's bytes, i.e. the least any streaming
   merge has to do: a plain write through the page cache (no fsync) and an O_DIRECT
   write past it from an aligned buffer (with its fsync; splice's writer writes that way
   where the file system allows). The fsync of the plain write is timed separately
   (splice fsyncs its output; mergekit does not).
6. Verifies the outputs tensor by tensor: same names, shapes and dtypes; bit-identical, or
   the max |diff| and the number of differing entries.

Results are printed as a table and written to --work/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch
import yaml
from safetensors import safe_open

from splice.io import ShardedWriter, TensorInfo, plan_shards

FULL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "vocab_size": 32000,
}
QUICK = {**FULL, "num_hidden_layers": 6}
SIZES = {
    "small": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "vocab_size": 32000,
    },  # 0.106B parameters
    "quick": QUICK,  # 0.147B
    "full": FULL,  # 0.374B
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    },  # 0.954B
}
DTYPES = ("float32", "bfloat16")
RECIPES = ("ties", "dare_ties", "task_arithmetic", "slerp", "model_stock")
SHARD_BYTES = 500_000_000
MODELS = ("base", "ft0", "ft1", "ft2")
DELTA_SCALE = (0.0, 0.002, 0.0025, 0.003)  # std of each model's random delta

MERGEKIT_CONFIGS = {
    "default": [],
    "j2": ["-j", "2"],
    "async": ["--async-write"],
    "j2+async": ["-j", "2", "--async-write"],
}
TIME = "/usr/bin/time"  # GNU time, for the kernel's peak RSS (%M)


# -- models ---------------------------------------------------------------------------


def llama_config(shape: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "num_key_value_heads": shape["num_attention_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def llama_layout(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, init std) of every tensor, in Hugging Face's order; std 0 = ones."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    out: list[tuple[str, tuple[int, ...], float]] = [("model.embed_tokens.weight", (v, h), 0.02)]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), 0.0)]
        out += [
            (p + f"self_attn.{n}.weight", (h, h), h**-0.5)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        out += [(p + "post_attention_layernorm.weight", (h,), 0.0)]
        out += [
            (p + "mlp.gate_proj.weight", (f, h), h**-0.5),
            (p + "mlp.up_proj.weight", (f, h), h**-0.5),
            (p + "mlp.down_proj.weight", (h, f), f**-0.5),
        ]
    out += [("model.norm.weight", (h,), 0.0), ("lm_head.weight", (v, h), 0.02)]
    return out


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def build_models(root: Path, shape: dict[str, int]) -> dict[str, Path]:
    """Base + 3 fine-tunes as sharded bf16 HF folders; reused when already complete."""
    dirs = {m: root / m for m in MODELS}
    stamp = root / "built.json"
    want = {"shape": shape, "delta_scale": list(DELTA_SCALE), "shard_bytes": SHARD_BYTES}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    layout = llama_layout(shape)
    infos = [TensorInfo(n, s, torch.bfloat16) for n, s, _ in layout]
    cfg = (json.dumps(llama_config(shape), indent=2) + "\n").encode()
    writers = {
        m: ShardedWriter(dirs[m], plan_shards(infos, SHARD_BYTES), {"format": "pt"}) for m in MODELS
    }
    t0 = time.perf_counter()
    print(
        f"building {sum(i.numel for i in infos) / 1e9:.3f}B-parameter models under {root} ...",
        flush=True,
    )
    for name, s, std in layout:
        base = torch.ones(s) if std == 0 else torch.randn(s, generator=_gen("base", name)) * std
        for mi, m in enumerate(MODELS):
            t = (
                base
                if mi == 0
                else base + torch.randn(s, generator=_gen(m, name)) * DELTA_SCALE[mi]
            )
            writers[m].write(name, t.to(torch.bfloat16))
            del t
    for w in writers.values():
        w.finalize(extra_files={"config.json": cfg})
    stamp.write_text(json.dumps(want))
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return dirs


def recipe_doc(method: str, dirs: dict[str, Path], dtype: str) -> dict[str, object]:
    """The mergekit-format recipe of ``method`` computing in ``dtype``."""
    base = str(dirs["base"].resolve())
    fts = [str(dirs[f"ft{i}"].resolve()) for i in range(3)]
    weights, densities = [1.0, 0.8, 0.6], [0.2, 0.3, 0.5]
    common: dict[str, object] = {"dtype": dtype, "out_dtype": "bfloat16"}
    if method in ("ties", "dare_ties"):
        return {
            "merge_method": method,
            "base_model": base,
            "models": [
                {"model": m, "parameters": {"weight": w, "density": d}}
                for m, w, d in zip(fts, weights, densities)
            ],
            "parameters": {"normalize": True},
            **common,
        }
    if method == "task_arithmetic":
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, weights)],
            **common,
        }
    if method == "slerp":
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": base}, {"model": fts[0]}],
            "parameters": {"t": 0.5},
            **common,
        }
    if method == "model_stock":
        return {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": m} for m in fts],
            **common,
        }
    raise SystemExit(f"unknown recipe '{method}' (known: {', '.join(RECIPES)})")


def recipes(
    work: Path,
    dirs: dict[str, Path],
    methods: list[str] | tuple[str, ...] = RECIPES,
    dtypes: list[str] | tuple[str, ...] = DTYPES,
) -> dict[str, Path]:
    """Recipe files named '<method>@<dtype>' (the dtype the tools compute in)."""
    out = {}
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    for method in methods:
        for dtype in dtypes:
            name = f"{method}@{dtype}"
            p = work / "recipes" / f"{name}.yaml"
            p.write_text(yaml.safe_dump(recipe_doc(method, dirs, dtype), sort_keys=False))
            out[name] = p
    return out


# -- measuring ------------------------------------------------------------------------


def splice_version() -> str:
    """The splice source this run measures: version, commit, and the git hash of the src/
    tree (changes only when splice's code does), '+dirty' when src/ has uncommitted edits."""
    import splice

    repo = Path(splice.__file__).resolve().parents[2]

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *a], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, tree = git("rev-parse", "--short", "HEAD"), git("rev-parse", "--short", "HEAD:src")
        dirty = "+dirty" if git("status", "--porcelain", "--", "src") else ""
    except (OSError, subprocess.CalledProcessError):
        return splice.__version__
    return f"{splice.__version__} commit {head} src {tree}{dirty}"


def input_files(dirs: dict[str, Path], models: list[str]) -> list[Path]:
    return sorted(f for m in models for f in dirs[m].glob("*.safetensors"))


def read_all(files: list[Path], chunk: int = 64 << 20) -> int:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def io_floor(files: list[Path], out_bytes: int, scratch: Path) -> dict[str, float]:
    read_all(files)  # warm
    t0 = time.perf_counter()
    nread = read_all(files)
    t_read = time.perf_counter() - t0
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "io_floor.bin"
    block = bytes(64 << 20)
    os.sync()
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(memoryview(block)[: min(left, len(block))])
        t_write = time.perf_counter() - t0
        t1 = time.perf_counter()
        os.fsync(fh.fileno())
        t_fsync = time.perf_counter() - t1
    target.unlink()
    t_direct = direct_write_seconds(target, out_bytes)
    return {
        "read_bytes": nread,
        "read_s": t_read,
        "write_bytes": out_bytes,
        "write_s": min(t_write, t_direct),
        "buffered_write_s": t_write,
        "direct_write_s": t_direct,
        "floor_s": t_read + min(t_write, t_direct),
        "fsync_s": t_fsync,
    }


def direct_write_seconds(target: Path, out_bytes: int) -> float:
    """Seconds to write ``out_bytes`` with O_DIRECT (past the page cache) from one aligned
    64 MiB buffer, as splice's writer does where it can; inf where O_DIRECT is refused."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return float("inf")
    block = mmap.mmap(-1, 64 << 20)
    os.sync()
    t0 = time.perf_counter()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError:
        return float("inf")
    try:
        done = 0
        while done < out_bytes:
            size = min((out_bytes - done + 4095) & ~4095, len(block))
            done += os.pwrite(fd, memoryview(block)[:size], done)
        os.ftruncate(fd, out_bytes)
        os.fsync(fd)
        return time.perf_counter() - t0
    except OSError:
        return float("inf")
    finally:
        os.close(fd)
        target.unlink()


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Wall time and peak RSS of one subprocess (and its children).

    The command runs under ``/usr/bin/time -f %M``: the kernel's peak RSS of the tool's
    process. (Python's own wait4 on a direct child would not do: subprocess starts children
    with vfork, and the kernel then counts this benchmark's own peak RSS as the child's.)
    The process tree's summed RSS is also polled with psutil every 50 ms.
    """
    peak_tree = 0
    stop = threading.Event()
    rss_file = log.with_name(log.name + ".maxrss")
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(
            [TIME, "-f", "%U %S %M", "-o", str(rss_file), *cmd],
            stdout=lf,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def poll() -> None:
            nonlocal peak_tree
            try:
                root = psutil.Process(p.pid)
            except psutil.Error:
                return
            while not stop.is_set():
                total = 0
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    break
                for q in procs:
                    with contextlib.suppress(psutil.Error):
                        total += q.memory_info().rss
                peak_tree = max(peak_tree, total)
                stop.wait(0.05)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        p.wait()
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with {p.returncode}:\n{tail}")
    user, system, maxrss_kb = rss_file.read_text().split()[-3:]
    return {
        "wall_s": wall,
        "cpu_s": float(user) + float(system),
        "maxrss_mb": int(maxrss_kb) / 1024,
        "tree_rss_mb": peak_tree / 2**20,
    }


def executable(name: str) -> str:
    """A console script of this environment (next to this Python), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"cannot find '{name}': install splice[dev] in this environment")
    return found


# What each tool's merge command imports before it merges, the way it does: timed alone,
# this is the start-up every run of the tool pays (interpreter, torch, the tool's own
# modules). `splice merge` pauses the cycle collector while it imports (commands/merge.py).
START_UP_IMPORTS = {
    "splice": "import gc; gc.disable(); import splice.commands.merge, splice.engine, "
    "splice.lora_merge, splice.recipe.schema",
    "mergekit": "import mergekit.scripts.run_yaml",
}


def start_up_seconds(env: dict[str, str], tools: list[str], runs: int) -> dict[str, float]:
    """Median wall time of a process that only starts each tool (``START_UP_IMPORTS``),
    interleaved over the tools. The first, untimed, round also writes the tools' bytecode
    caches, so that no timed run compiles source."""
    times: dict[str, list[float]] = {tool: [] for tool in tools}
    for r in range(runs + 1):
        for tool in tools:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", START_UP_IMPORTS[tool]], env=env, check=True)
            if r:
                times[tool].append(time.perf_counter() - t0)
    return {tool: statistics.median(ts) for tool, ts in times.items()}


def tool_cmd(tool: str, extra: list[str], recipe: Path, out: Path) -> list[str]:
    if tool == "splice":
        return [executable("splice"), "merge", str(recipe), "--out", str(out), "--quiet", *extra]
    return [executable("mergekit-yaml"), str(recipe), str(out), "--quiet", *extra]


def bench_run(
    tool: str,
    cfg: str,
    extra: list[str],
    recipe: Path,
    out: Path,
    files: list[Path],
    env: dict[str, str],
    r: int,
) -> dict[str, float]:
    """One timed run of one tool (page cache warm, earlier writes flushed)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    read_all(files)
    res = run_measured(tool_cmd(tool, extra, recipe, out), env, out.with_name(out.name + ".log"))
    print(
        f"  {tool:8} {cfg:9} {recipe.stem:24} run {r + 1}: {res['wall_s']:7.2f} s "
        f"(CPU {res['cpu_s']:7.2f} s, load {os.getloadavg()[0]:5.1f}), "
        f"maxrss {res['maxrss_mb']:7.0f} MB, tree {res['tree_rss_mb']:7.0f} MB",
        flush=True,
    )
    return res


def bench_row(
    tool: str, cfg: str, extra: list[str], recipe: Path, out: Path, results: list[dict[str, float]]
) -> dict[str, object]:
    walls = [r["wall_s"] for r in results]
    return {
        "tool": tool,
        "config": cfg,
        "args": extra,
        "recipe": recipe.stem,
        "runs": results,
        "wall_min_s": min(walls),
        "wall_median_s": statistics.median(walls),
        "cpu_median_s": statistics.median(r["cpu_s"] for r in results),
        "peak_rss_mb": max(max(r["maxrss_mb"], r["tree_rss_mb"]) for r in results),
        "out": str(out),
    }


def bench_interleaved(
    tools: list[tuple[str, str, list[str]]],
    recipe: Path,
    outs: Path,
    files: list[Path],
    runs: int,
    env: dict[str, str],
) -> list[dict[str, object]]:
    """Every (tool, config, args) ``runs`` times, interleaved: run r of each before run r+1."""
    results: list[list[dict[str, float]]] = [[] for _ in tools]
    paths = [outs / f"{tool}-{cfg.replace(' ', '_')}-{recipe.stem}" for tool, cfg, _ in tools]
    for r in range(runs):
        for k, (tool, cfg, extra) in enumerate(tools):
            results[k].append(bench_run(tool, cfg, extra, recipe, paths[k], files, env, r))
    return [
        bench_row(tool, cfg, extra, recipe, paths[k], results[k])
        for k, (tool, cfg, extra) in enumerate(tools)
    ]


# -- comparing ------------------------------------------------------------------------


def _tensor_files(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text())["weight_map"]
        return {n: d / f for n, f in wm.items()}
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out.update({n: f for n in fh.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def compare_outputs(a: Path, b: Path) -> dict[str, object]:
    fa, fb = _tensor_files(a), _tensor_files(b)
    res: dict[str, object] = {
        "only_a": sorted(set(fa) - set(fb)),
        "only_b": sorted(set(fb) - set(fa)),
        "tensors": 0,
        "entries": 0,
        "differing_entries": 0,
        "differing_tensors": 0,
        "max_abs_diff": 0.0,
        "mismatched_meta": [],
        "worst": None,
    }
    handles: dict[Path, object] = {}

    def get(f: Path, n: str) -> torch.Tensor:
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        return handles[f].get_tensor(n)  # type: ignore[attr-defined]

    for n in sorted(set(fa) & set(fb)):
        x, y = get(fa[n], n), get(fb[n], n)
        res["tensors"] += 1
        if x.shape != y.shape or x.dtype != y.dtype:
            res["mismatched_meta"].append(
                f"{n}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
            )
            continue
        res["entries"] += x.numel()
        ne = x != y
        k = int(ne.sum())
        if k:
            d = float((x.float() - y.float()).abs().max())
            res["differing_entries"] += k
            res["differing_tensors"] += 1
            if d > res["max_abs_diff"]:
                res["max_abs_diff"], res["worst"] = d, n
    res["identical"] = (
        not res["only_a"]
        and not res["only_b"]
        and not res["mismatched_meta"]
        and res["differing_entries"] == 0
    )
    return res


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(".bench"), help="cache and output folder")
    ap.add_argument("--quick", action="store_true", help="6 layers instead of 24 (--size quick)")
    ap.add_argument(
        "--size",
        choices=list(SIZES),
        default="full",
        help="synthetic model size: small 0.1B, quick 0.15B, full 0.37B, 1b 0.95B",
    )
    ap.add_argument("--runs", type=int, default=2, help="timed runs per tool and recipe (>= 2)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {RECIPES}")
    ap.add_argument(
        "--dtypes",
        default=",".join(DTYPES),
        help="comma list of compute dtypes (the recipes' `dtype:`)",
    )
    ap.add_argument(
        "--mergekit-configs",
        default=",".join(MERGEKIT_CONFIGS),
        help=f"comma list of {list(MERGEKIT_CONFIGS)}",
    )
    ap.add_argument(
        "--splice-args", default="", help="extra flags for splice merge, e.g. '--threads 2'"
    )
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)

    if not Path(TIME).is_file():
        ap.error(f"needs GNU time at {TIME} for peak RSS (apt-get install time)")
    if args.runs < 2:
        ap.error("--runs must be at least 2 (the table reports medians)")
    work = args.work.resolve()
    tag = "quick" if args.quick else args.size
    shape = SIZES[tag]
    dirs = build_models(work / f"models-{tag}", shape)
    methods = [r for r in args.recipes.split(",") if r]
    dtypes = [d for d in args.dtypes.split(",") if d]
    recipe_paths = recipes(work / tag, dirs, methods, dtypes)
    wanted = list(recipe_paths)
    mk_cfgs = [] if args.skip_mergekit else [c for c in args.mergekit_configs.split(",") if c]
    files = input_files(dirs, list(MODELS))
    in_bytes = sum(f.stat().st_size for f in files)
    out_bytes = in_bytes // len(MODELS)
    # both tools run as installed ones do: from bytecode (a PYTHONDONTWRITEBYTECODE left
    # in the environment would have splice, an editable install, compile its source on
    # every run, while mergekit's installed bytecode is reused)
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }

    machine = {
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    with contextlib.suppress(PackageNotFoundError):
        machine["mergekit"] = version("mergekit")
    machine["splice"] = splice_version()
    print(f"machine: {machine}", flush=True)
    print(
        f"inputs: {len(files)} files, {in_bytes / 1e9:.2f} GB; one output ≈ "
        f"{out_bytes / 1e9:.2f} GB",
        flush=True,
    )

    floor = io_floor(files, out_bytes, work / tag / "scratch")
    print(
        f"I/O floor: read {floor['read_s']:.2f} s + write {floor['write_s']:.2f} s = "
        f"{floor['floor_s']:.2f} s (write through the page cache {floor['buffered_write_s']:.2f}"
        f" s + fsync {floor['fsync_s']:.2f} s; O_DIRECT {floor['direct_write_s']:.2f} s)",
        flush=True,
    )

    start_up = start_up_seconds(env, ["splice"] + (["mergekit"] if mk_cfgs else []), 3)
    print(
        "start-up (a process importing what the merge command imports, median of 3): "
        + ", ".join(f"{tool} {s:.2f} s" for tool, s in start_up.items()),
        flush=True,
    )

    rows: list[dict[str, object]] = []
    checks: dict[str, object] = {}
    splice_extra = args.splice_args.split()
    for rname in wanted:
        recipe = recipe_paths[rname]
        outs = work / tag / "out"
        outs.mkdir(parents=True, exist_ok=True)
        tools = [
            ("splice", "default" if not splice_extra else " ".join(splice_extra), splice_extra)
        ]
        tools += [("mergekit", cfg, MERGEKIT_CONFIGS[cfg]) for cfg in mk_cfgs]
        sp, *mk_rows = bench_interleaved(tools, recipe, outs, files, args.runs, env)
        rows += [sp, *mk_rows]
        for r in [sp, *mk_rows]:
            r["start_up_s"] = start_up[str(r["tool"])]
            r["after_start_up_s"] = float(r["wall_median_s"]) - r["start_up_s"]
        if mk_rows:
            best = min(mk_rows, key=lambda r: r["wall_median_s"])
            for r in [sp, *mk_rows]:
                r["speedup_vs_mergekit_median"] = best["wall_median_s"] / r["wall_median_s"]
                r["speedup_after_start_up"] = best["after_start_up_s"] / r["after_start_up_s"]
                r["speedup_vs_mergekit_min"] = best["wall_min_s"] / r["wall_min_s"]
                r["cpu_speedup_vs_mergekit"] = best["cpu_median_s"] / r["cpu_median_s"]
                r["memory_vs_mergekit"] = r["peak_rss_mb"] / best["peak_rss_mb"]
            print(f"  comparing splice and mergekit ({best['config']}) outputs ...", flush=True)
            checks[rname] = {
                "mergekit_config": best["config"],
                **compare_outputs(Path(best["out"]), Path(sp["out"])),
            }
            print(f"  {rname}: {summary(checks[rname])}", flush=True)
        if not args.keep_outputs:
            for r in [sp, *mk_rows]:
                shutil.rmtree(r["out"], ignore_errors=True)

    print_table(rows, floor, checks, tag)
    if splice_version().split(" src ")[-1] != machine["splice"].split(" src ")[-1]:
        print(
            f"WARNING: splice changed during the run ({machine['splice']} -> "
            f"{splice_version()}); the splice rows may mix versions"
        )
        machine["splice_at_end"] = splice_version()
    results = {
        "size": tag,
        "shape": shape,
        "machine": machine,
        "inputs_bytes": in_bytes,
        "io_floor": floor,
        "start_up_s": start_up,
        "rows": rows,
        "checks": checks,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {work / 'results.json'}")
    return 0


def summary(c: dict[str, object]) -> str:
    if c["identical"]:
        return f"identical ({c['tensors']} tensors, {c['entries']:,} entries, bit for bit)"
    parts = []
    if c["only_a"] or c["only_b"]:
        parts.append(
            f"names differ (only mergekit: {c['only_a'][:3]}, only splice: {c['only_b'][:3]})"
        )
    if c["mismatched_meta"]:
        parts.append(f"shape/dtype differ: {c['mismatched_meta'][:3]}")
    if c["differing_entries"]:
        parts.append(
            f"{c['differing_entries']:,} of {c['entries']:,} entries differ "
            f"({c['differing_entries'] / c['entries']:.3%}) in "
            f"{c['differing_tensors']}/{c['tensors']} tensors, max |diff| "
            f"{c['max_abs_diff']:.3g} (in {c['worst']})"
        )
    return "; ".join(parts)


def print_table(
    rows: list[dict[str, object]], floor: dict[str, float], checks: dict[str, object], tag: str
) -> None:
    print(f"\n== merge speed ({tag}; wall = whole process; RSS = peak of the process tree) ==")
    head = (
        f"{'tool':9} {'config':9} {'recipe':24} {'wall min':>9} {'median':>8} "
        f"{'peak RSS MB':>11} {'speedup':>8} {'mem ratio':>9} {'vs floor':>8} "
        f"{'CPU median':>10} {'CPU speedup':>11} {'after start':>11} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = r.get("speedup_vs_mergekit_median")
        cs = r.get("cpu_speedup_vs_mergekit")
        mem = r.get("memory_vs_mergekit")
        ss = r.get("speedup_after_start_up")
        print(
            f"{r['tool']:9} {r['config']:9} {r['recipe']:24} {r['wall_min_s']:>8.2f}s "
            f"{r['wall_median_s']:>7.2f}s {r['peak_rss_mb']:>11.0f} "
            f"{(f'{sp:.2f}x' if sp else '-'):>8} {(f'{mem:.2f}' if mem else '-'):>9} "
            f"{r['wall_median_s'] / floor['floor_s']:>7.1f}x "
            f"{r['cpu_median_s']:>9.2f}s {(f'{cs:.2f}x' if cs else '-'):>11} "
            f"{r['after_start_up_s']:>10.2f}s {(f'{ss:.2f}x' if ss else '-'):>8}"
        )
    print(
        f"\nI/O floor: read {floor['read_bytes'] / 1e9:.2f} GB in {floor['read_s']:.2f} s + "
        f"write {floor['write_bytes'] / 1e9:.2f} GB in {floor['write_s']:.2f} s = "
        f"{floor['floor_s']:.2f} s (the faster write of: through the page cache "
        f"{floor['buffered_write_s']:.2f} s, + fsync {floor['fsync_s']:.2f} s; O_DIRECT "
        f"{floor['direct_write_s']:.2f} s)"
    )
    print(
        "speedup = mergekit's best median wall / this median wall; mem ratio = this peak "
        "RSS / mergekit's best config's peak RSS; CPU = user + sys seconds of the process "
        "tree (GNU time), the comparable figure on a machine shared with other jobs; "
        "after start = median wall minus the tool's start-up (a process importing what its "
        "merge command imports), and its speedup against mergekit's best config"
    )
    for name, c in checks.items():
        print(f"outputs, {name} (splice vs mergekit {c['mergekit_config']}): {summary(c)}")


if __name__ == "__main__":
    sys.exit(main())
