"""`splice retrieve ...`: adapter retrieval by embedding similarity.

splice retrieve centroid ADAPTER --data FILE [--embedder minilm] [--column C]
                         [--max-examples 200] [--seed 0]
    embeds some of the adapter's training inputs and stores their mean beside it
    (ADAPTER/splice_centroid.safetensors)
splice retrieve route --adapter [NAME=]DIR ... (--text T ... | --data FILE)
                      [--k 2] [--temperature 0.1]
    prints each input's weighted set of adapters (JSON lines)
splice retrieve generate BASE --adapter [NAME=]DIR ... --prompt P ... [--max-new-tokens 64]
    generates each prompt with the adapters retrieved for it (a mixed-adapter batch)

The embedder (`--embedder`): a packaged name (``minilm``, the default, or ``smollm2``) or an
HF model folder; its mean-pooled last hidden state (`splice.compose.embedding`). Centroids
record it, and `route` / `generate` use the library's embedder unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splice.compose.embedding import MeanPoolEmbedder
    from splice.compose.library import AdapterLibrary

TEXT_COLUMNS = ("prompt", "text", "input")


def _embedder(ref: str, max_length: int) -> MeanPoolEmbedder:
    """The embedder for ``ref``; its id is the packaged name, else the resolved folder."""
    from splice.compose.embedding import MeanPoolEmbedder
    from splice.train.models import ALIASES, PACKAGED, resolve_model

    name = ALIASES.get(ref.lower(), ref.lower())
    packaged = name in PACKAGED and not Path(ref).exists()
    folder = resolve_model(ref)
    embedder_id = name if packaged else str(Path(ref).resolve())
    return MeanPoolEmbedder.from_folder(folder, embedder_id, max_length=max_length)


def _texts(path: str, column: str | None, limit: int | None, seed: int) -> list[str]:
    """The texts of a .jsonl / .csv / .tsv file: ``column``, else the first of prompt, text,
    input; at most ``limit`` of them, a seeded sample (in file order)."""
    import random

    from splice.data.user_file import read_rows
    from splice.errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    columns, rows = read_rows(p)
    chosen = column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if chosen is None or chosen not in columns:
        wanted = f"column '{column}'" if column else f"a column {' / '.join(TEXT_COLUMNS)}"
        raise DataError(f"{p}: needs {wanted} (has {sorted(columns)})")
    texts = []
    for number, row in rows:
        value = row.get(chosen)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{p} line {number}: empty or missing '{chosen}'")
        texts.append(value)
    if not texts:
        raise DataError(f"{p}: no rows")
    if limit is not None and len(texts) > limit:
        keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
        texts = [texts[i] for i in keep]
    return texts


def _positive(args: argparse.Namespace, *flags: str) -> None:
    from splice.compose.library import RetrievalError
    from splice.numbers import check_number

    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None:
            check_number(value, f"--{flag.replace('_', '-')}", gt=0, error=RetrievalError)


def _centroid(args: argparse.Namespace) -> int:
    from splice.adapters import read_adapter_config
    from splice.compose.library import compute_centroid, write_centroid

    _positive(args, "max_examples", "max_length")
    read_adapter_config(args.adapter)  # an adapter folder, before any model is loaded
    texts = _texts(args.data, args.column, args.max_examples, args.seed)
    embedder = _embedder(args.embedder, args.max_length)
    vector = compute_centroid(embedder.embed(texts))
    path = write_centroid(args.adapter, vector, embedder.embedder_id, len(texts))
    print(
        f"centroid of {len(texts)} input(s) (embedder '{embedder.embedder_id}', dimension "
        f"{vector.shape[0]}) written to {path}"
    )
    return 0


def _library(specs: list[str]) -> AdapterLibrary:
    from splice.compose.library import AdapterLibrary

    names, dirs = [], []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            name, path = Path(spec).name, spec
        names.append(name)
        dirs.append(path)
    return AdapterLibrary.load(dirs, names)


def _retriever(args: argparse.Namespace) -> Any:
    from splice.compose.retrieval import Retriever

    _positive(args, "k", "temperature", "max_length")
    library = _library(args.adapter)
    embedder = _embedder(args.embedder or library.embedder, args.max_length)
    return Retriever(library, embedder, k=args.k, temperature=args.temperature)


def _route(args: argparse.Namespace) -> int:
    from splice.compose.library import RetrievalError

    if bool(args.text) == bool(args.data):
        raise RetrievalError("give the inputs with --text (repeatable) or --data FILE")
    texts = args.text or _texts(args.data, args.column, None, 0)
    retriever = _retriever(args)
    for text, chosen in zip(texts, retriever.route(texts), strict=True):
        print(json.dumps({"text": text, "adapters": chosen}, ensure_ascii=False))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from splice.adapters import AdapterModel
    from splice.compose.retrieval import load_library
    from splice.train.models import load_for_task

    _positive(args, "max_new_tokens")
    retriever = _retriever(args)
    sets = retriever.route(args.prompt)
    model, tokenizer, _ = load_for_task(args.base, "causal_lm")
    am = AdapterModel(model.eval())
    load_library(am, retriever.library)
    tokenizer.padding_side = "left"
    enc = tokenizer(args.prompt, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = am.generate(
            **enc,
            adapter_names=sets,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    width = enc["input_ids"].shape[1]
    for prompt, chosen, row in zip(args.prompt, sets, out, strict=True):
        text = tokenizer.decode(row[width:], skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "adapters": chosen, "output": text}))
    return 0


DEFAULT_K, DEFAULT_TEMPERATURE = 2, 0.1  # splice.compose.retrieval's (not imported: --help)


def _library_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="a library adapter with a centroid, repeatable (name: the folder's by default)",
    )
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"adapters per input ({DEFAULT_K})")
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"softmax temperature over the cosine similarities ({DEFAULT_TEMPERATURE})",
    )
    p.add_argument("--embedder", help="default: the one the centroids were computed with")
    p.add_argument("--max-length", type=int, default=256, help="tokens embedded per input")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve",
        help="choose adapters per input by embedding similarity (centroids, routing)",
        description=__doc__.splitlines()[0],
    )
    rs = p.add_subparsers(dest="retrieve_command", required=True)

    c = rs.add_parser("centroid", help="store an adapter's training-data centroid beside it")
    c.add_argument("adapter", metavar="ADAPTER", help="the adapter folder")
    c.add_argument("--data", required=True, help="its training inputs: .jsonl / .csv / .tsv")
    c.add_argument("--column", help="text column (default: prompt, text or input)")
    c.add_argument("--embedder", default="minilm", help="minilm (default), smollm2 or a folder")
    c.add_argument("--max-examples", type=int, default=200, help="seeded sample size (200)")
    c.add_argument("--max-length", type=int, default=256, help="tokens embedded per input")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=_centroid)

    r = rs.add_parser("route", help="print each input's retrieved adapters and weights")
    _library_flags(r)
    r.add_argument("--text", action="append", help="an input, repeatable")
    r.add_argument("--data", help="inputs from a .jsonl / .csv / .tsv file")
    r.add_argument("--column", help="text column (default: prompt, text or input)")
    r.set_defaults(fn=_route)

    g = rs.add_parser("generate", help="generate with the adapters retrieved per prompt")
    g.add_argument("base", metavar="BASE", help="the base causal LM: smollm2, a folder, a .gguf")
    _library_flags(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt, repeatable")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(fn=_generate)
