"""`splice demo`: the embedded default job of the README's first command.

``splice demo`` is a short real benchmark (`splice.bench`, config `BENCH_DEMO` below):
all-MiniLM-L6-v2 fine-tuned fully and with LoRA on three real tasks (BBC news topics,
SpamAssassin spam, tweet sentiment), the expert backbones merged with nine quick core
methods (paper defaults and a validation sweep of each main coefficient), every merge
evaluated on every task's test split with the task's own head. It prints the table
(accuracy per task, average, normalized accuracy) and writes results.json and the plots
into ``--out``. Experts are cached (``$SPLICE_CACHE/bench``), so a second run only merges. Sized to
finish within 10 minutes on 2 CPU cores from a cold cache.

``splice demo --synthetic`` is the earlier, dependency-free demo: it writes a small
Llama-shaped model as a real Hugging Face folder (config.json + safetensors, loadable
with transformers' LlamaForCausalLM) and three "fine-tunes" of it, then merges them with
every core method through the real engine (recipes on disk, sharded atomic output) and
prints what each method did.

The synthetic fine-tunes are structured like real task vectors: each adds a low-rank
"task" update (rank 4) shared in part with the other tasks (so they agree on some
directions and conflict in sign on others) plus small dense noise.

Columns of the synthetic table: ‖δ‖ = norm of the merged task vector (merged − base over
all tensors); zeros = fraction of exactly-zero entries in δ; cos(δ, δ_i) = cosine to each
fine-tune's task vector; dist_i = ‖merged − ft_i‖ / ‖ft_i − base‖ (0 means the merge
equals fine-tune i).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from splice.engine import plan_merge, run_merge
from splice.io import ShardedWriter, TensorInfo, plan_shards
from splice.io.out_location import prepare_work_folder
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint

if TYPE_CHECKING:
    from splice.bench.results import BenchResults

# The real demo's bench config (see splice.bench.config): three tasks whose data sources
# scripts/install_data.sh installs without root; smaller splits than the 4-task benchmark
# (150 training examples per class, at most 450 per task: 1e-4 full / 4e-3 LoRA then give
# tweet-sentiment experts ~65%, where 100 per class left the LoRA one at 49%, chance 33%);
# and the quick core methods (Iso-CTS, PCB: 4-6 s per merge; Model Stock: not meant for
# multi-task merging), so 8 trainings and ~90 merges fit well inside 10 minutes.
BENCH_DEMO: dict[str, Any] = {
    "model": "minilm",
    "tasks": ["bbc_news", "spam", "tweet_sentiment"],
    "kinds": ["full", "lora"],
    "data": {
        "train_per_class": 150,
        "train_max": 450,
        "validation_per_class": 50,
        "validation_max": 150,
        "test_per_class": 100,
        "test_max": 300,
    },
    "training": {"epochs": 2, "batch_size": 16, "max_length": 64},
    "merge": {
        "methods": [
            "linear",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "breadcrumbs",
            "consensus",
            "tsv",
            "iso_c",
            "magmax",
        ],
        "sweep": True,
    },
}


def run_bench_demo(out: str | Path = "splice-demo", progress: bool = True) -> BenchResults:
    """Run `BENCH_DEMO` into ``out``; print the table. Returns the results."""
    from splice.bench import parse_bench_config, run_bench
    from splice.bench.report import print_results

    results = run_bench(parse_bench_config(BENCH_DEMO, where="splice demo"), out, progress=progress)
    print_results(results, out)
    return results


CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# (method, extra parameters) merged over the three fine-tunes, native dialect.
METHODS: list[tuple[str, dict[str, object]]] = [
    ("linear", {}),
    ("task_arithmetic", {"lambda": 0.5}),
    ("ties", {"density": 0.2, "lambda": 1.0}),
    ("ties", {"density": 0.2, "lambda": 1.0, "scope": "tensor"}),
    ("dare_linear", {"density": 0.3, "lambda": 0.5}),
    ("dare_ties", {"density": 0.3}),
    ("magnitude_prune", {"density": 0.2, "lambda": 0.5}),
    ("breadcrumbs", {"density": 0.2, "gamma": 0.01, "lambda": 0.5}),
    ("model_stock", {}),
]


def llama_tensors(cfg: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen) * 0.02}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = torch.randn(h, h, generator=gen) / h**0.5
        out[p + "mlp.gate_proj.weight"] = torch.randn(f, h, generator=gen) / h**0.5
        out[p + "mlp.up_proj.weight"] = torch.randn(f, h, generator=gen) / h**0.5
        out[p + "mlp.down_proj.weight"] = torch.randn(h, f, generator=gen) / f**0.5
        out[p + "input_layernorm.weight"] = torch.ones(h)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h)
    out["model.norm.weight"] = torch.ones(h)
    out["lm_head.weight"] = torch.randn(v, h, generator=gen) * 0.02
    return out


def write_model(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedWriter(path, plan_shards(infos, 10_000_000), {"format": "pt"}, overwrite=True)
    for n, t in tensors.items():
        w.write(n, t.contiguous())
    w.finalize(extra_files={"config.json": json.dumps(CONFIG, indent=2).encode()}, copy_files=[])


def fine_tune(
    base: dict[str, torch.Tensor], task: int, shared: dict[str, torch.Tensor], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    out = {}
    for n, w in base.items():
        if w.dim() != 2 or "embed" in n or "lm_head" in n:
            out[n] = w.clone()
            continue
        r = 4
        a = torch.randn(w.shape[0], r, generator=gen)
        b = torch.randn(r, w.shape[1], generator=gen)
        own = (a @ b) * (0.02 / r) / w.shape[1] ** 0.5
        # task 2 pulls the shared direction the other way in the MLPs: sign conflicts
        sign = -1.0 if task == 2 and ".mlp." in n else 1.0
        noise = torch.randn(w.shape, generator=gen) * 2e-4
        out[n] = w + own + sign * shared[n] + noise
    return out


def _flat_delta(reader, base, names) -> torch.Tensor:
    return torch.cat([(reader.read(n).double() - base.read(n).double()).reshape(-1) for n in names])


def run_demo(out: str | Path = "splice-demo", progress: bool = True) -> list[dict[str, object]]:
    root = prepare_work_folder(out)
    gen = torch.Generator().manual_seed(0)
    base = llama_tensors(CONFIG, gen)
    write_model(root / "base", base)
    shared = {
        n: torch.randn(w.shape, generator=gen) * 0.01 / w.shape[-1] ** 0.5
        for n, w in base.items()
        if w.dim() == 2
    }
    fts = []
    for i in range(3):
        write_model(root / f"ft{i}", fine_tune(base, i, shared, gen))
        fts.append(str(root / f"ft{i}"))
    print(
        f"wrote a {sum(t.numel() for t in base.values()) / 1e6:.1f}M-parameter Llama-shaped "
        f"base and 3 fine-tunes under {root}/"
    )

    rows = []
    base_r = open_checkpoint(str(root / "base"))
    names = base_r.names()
    ft_deltas = [_flat_delta(open_checkpoint(f), base_r, names) for f in fts]
    runs = [*METHODS, ("slerp", {"t": 0.5})]
    for method, params in runs:
        label = method + "".join(f" {k}={v}" for k, v in params.items())
        models = fts[:1] if method == "slerp" else fts
        recipe = {
            "method": method,
            "base_model": str(root / "base"),
            "models": [{"model": m} for m in models],
            "parameters": params,
        }
        tag = label.replace(" ", "_").replace("=", "")
        (root / "recipes").mkdir(exist_ok=True)
        rp = root / "recipes" / f"{tag}.yaml"
        rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
        plan = plan_merge(parse_recipe(recipe, str(rp)))
        t0 = time.perf_counter()
        try:
            run_merge(
                plan,
                root / "merged" / tag,
                overwrite=True,
                progress=False,
                recipe_text=rp.read_text(),
            )
        finally:
            plan.close()
        secs = time.perf_counter() - t0
        merged = open_checkpoint(str(root / "merged" / tag))
        d = _flat_delta(merged, base_r, names)
        merged.close()
        row: dict[str, object] = {
            "method": label,
            "norm": d.norm().item(),
            "zeros": (d == 0).double().mean().item(),
            "seconds": secs,
        }
        for i, fd in enumerate(ft_deltas):
            row[f"cos{i}"] = (d @ fd / (d.norm() * fd.norm() + 1e-30)).item()
            row[f"dist{i}"] = ((d - fd).norm() / fd.norm()).item()
        rows.append(row)
    base_r.close()
    _print_table(rows, ft_deltas)
    shutil.rmtree(root / "merged", ignore_errors=True)
    return rows


def _print_table(rows: list[dict[str, object]], ft_deltas: list[torch.Tensor]) -> None:
    w = max(len(str(r["method"])) for r in rows)
    head = (
        f"{'method':<{w}}  {'|δ|':>7} {'zeros':>6}  "
        + " ".join(f"{'cos' + str(i):>6}" for i in range(3))
        + "  "
        + " ".join(f"{'dist' + str(i):>6}" for i in range(3))
        + f"  {'time':>6}"
    )
    print()
    print(head)
    print("-" * len(head))
    for i, fd in enumerate(ft_deltas):
        print(f"{'(fine-tune ' + str(i) + ')':<{w}}  {fd.norm().item():>7.3f}")
    for r in rows:
        print(
            f"{r['method']!s:<{w}}  {r['norm']:>7.3f} {r['zeros']:>6.1%}  "
            + " ".join(f"{r[f'cos{i}']:>6.3f}" for i in range(3))
            + "  "
            + " ".join(f"{r[f'dist{i}']:>6.3f}" for i in range(3))
            + f"  {r['seconds']:>5.2f}s"
        )
