"""Write the AdapterHub parity fixtures (tests/fixtures/adapterhub/*.safetensors).

AdapterHub's ``adapters`` package pins an older transformers (adapters 1.3.0: transformers
~=4.57.6, and it does not import beside huggingface_hub 1.x), so it cannot run in splice's
environment. This script runs by hand in a side venv:

    python -m venv /tmp/ah-venv
    /tmp/ah-venv/bin/pip install torch==2.13.0 adapters==1.3.0
    /tmp/ah-venv/bin/python scripts/adapterhub_golden.py tests/fixtures/adapterhub

For a tiny random Llama causal LM and a tiny random BERT encoder (eager attention, eval mode,
float32) it adds three Houlsby bottleneck adapters ``a``, ``b``, ``c`` (AdapterHub's
``DoubleSeqBnConfig``: after the attention block and after the FFN, swish, bottleneck 4)
and the "dynamic" fusions ``a,b`` and ``b,c``, all with random weights, and runs AdapterHub's
forward for each composition in ``cases``; and for the Llama with three LoRAs instead
(``LoRAConfig``: r 4, alpha 8, q and v; ``lora_cases``). It saves one safetensors file per
model and adapter type (llama, bert, llama_lora) holding:

    base.<name>                                   the base model's state dict
    adapter.<adapter>.<splice module path>.adapter_down|adapter_up.weight|bias  (lora_A|B.weight)
    fusion.<fusion>.<splice module path>.query|key|value.weight(|bias)
    input_ids                                     the inputs (2 rows, no padding)
    out.<case>                                    AdapterHub's output (Llama: logits; BERT:
                                                  last_hidden_state; Parallel: N·2 rows)
    differs.<case>                                AdapterHub's output where splice differs by
                                                  design (``differing``)

with the versions and the model config as metadata. The tensors are stored under splice's
module paths (``TO_SPLICE``: AdapterHub's attention_adapters / output_adapters of layer i are
splice's adapters on o_proj / down_proj, resp. attention.output.dense / output.dense), so the
test (tests/compose/test_adapterhub_parity.py) loads them with no name mapping of its own.

Average: AdapterHub computes mean_i(w_i · out_i) (an extra 1/N, `docs/composition.md`), so
each Average case runs AdapterHub with weights N·w and ``normalize_weights=False``, which is
splice's Average with weights w (Σ w = 1). The case names say which splice block each golden
output is for (CASES' second column).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

HIDDEN, BOTTLENECK, SEED = 32, 4, 0
LLAMA = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)
BERT = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=64,
    max_position_embeddings=32,
)

# AdapterHub key (location of the bottleneck layer) -> splice's adapted module path
TO_SPLICE = {
    "llama": [
        (r"model\.layers\.(\d+)\.attention_adapters\.", r"model.layers.\1.self_attn.o_proj"),
        (r"model\.layers\.(\d+)\.output_adapters\.", r"model.layers.\1.mlp.down_proj"),
    ],
    "bert": [
        (r"encoder\.layer\.(\d+)\.attention\.output\.", r"encoder.layer.\1.attention.output.dense"),
        (r"encoder\.layer\.(\d+)\.output\.", r"encoder.layer.\1.output.dense"),
    ],
}

W3 = [0.5, 0.3, 0.2]  # splice's Average weights (sum 1); AdapterHub gets 3·w, unnormalized


def cases():
    """(case name, AdapterHub block, the splice block it is compared with (YAML form))."""
    from adapters.composition import Average, Fuse, Parallel, Stack

    return [
        ("base", None, None),
        ("single_a", Stack("a"), "a"),
        ("stack_ab", Stack("a", "b"), {"stack": ["a", "b"]}),
        ("stack_abc", Stack("a", "b", "c"), {"stack": ["a", "b", "c"]}),
        (
            "average_abc",
            Average("a", "b", "c", weights=[3 * w for w in W3], normalize_weights=False),
            {"average": dict(zip("abc", W3, strict=True))},
        ),
        (
            "average_a_stack_bc",
            Average("a", Stack("b", "c"), weights=[2 * 0.6, 2 * 0.4], normalize_weights=False),
            {"average": {"children": ["a", {"stack": ["b", "c"]}], "weights": [0.6, 0.4]}},
        ),
        ("parallel_ab", Parallel("a", "b"), {"parallel": ["a", "b"]}),
        (
            "parallel_a_stack_bc",
            Parallel("a", Stack("b", "c")),
            {"parallel": ["a", {"stack": ["b", "c"]}]},
        ),
        ("fuse_ab", Fuse("a", "b"), {"fuse": {"name": "a,b", "adapters": ["a", "b"]}}),
        ("fuse_bc", Fuse("b", "c"), {"fuse": {"name": "b,c", "adapters": ["b", "c"]}}),
        (
            "stack_a_fuse_bc",
            Stack("a", Fuse("b", "c")),
            {"stack": ["a", {"fuse": {"name": "b,c", "adapters": ["b", "c"]}}]},
        ),
    ]


def differing():
    """AdapterHub blocks whose output differs from splice's by design, stored as
    ``differs.<case>`` so the test can show the difference is real."""
    from adapters.composition import Average

    return [("average_abc", Average("a", "b", "c", weights=W3))]  # the 1/N: splice's Average(w)


def lora_cases():
    """LoRA (``LoRAConfig``, q and v projections): what AdapterHub composes for LoRA and
    splice computes the same way. A Stack of LoRAs differs by design (AdapterHub chains the
    updates, which needs in = out features; splice sums them) and is not stored."""
    from adapters.composition import Average, Parallel, Stack

    return [
        ("base", None, None),
        ("single_a", Stack("a"), "a"),
        (
            "average_abc",
            Average("a", "b", "c", weights=[3 * w for w in W3], normalize_weights=False),
            {"average": dict(zip("abc", W3, strict=True))},
        ),
        ("parallel_ab", Parallel("a", "b"), {"parallel": ["a", "b"]}),
        ("parallel_abc", Parallel("a", "b", "c"), {"parallel": ["a", "b", "c"]}),
    ]


def splice_path(family: str, key: str) -> str:
    """The splice module path of AdapterHub's adapter or fusion key ``key``."""
    if family == "llama_lora":  # LoRA wraps the projection itself: "<path>.loras.<name>..."
        return key.split(".loras.", 1)[0]
    for pattern, repl in TO_SPLICE[family]:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl)
    raise KeyError(key)


def build(family: str):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    if family == "bert":
        config = BertConfig(**BERT, attn_implementation="eager")
        return BertModel(config, add_pooling_layer=False).eval()
    config = LlamaConfig(**LLAMA, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def add_adapters(model, family: str) -> dict:
    """Adapters a, b, c (and, for bottlenecks, the fusions); splice's config of them."""
    from adapters.composition import Fuse

    from adapters import DoubleSeqBnConfig, LoRAConfig

    if family == "llama_lora":
        for name in "abc":
            model.add_adapter(name, config=LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"]))
        return {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    for name in "abc":
        model.add_adapter(name, config=DoubleSeqBnConfig(reduction_factor=HIDDEN // BOTTLENECK))
    for fusion in (Fuse("a", "b"), Fuse("b", "c")):
        model.add_adapter_fusion(fusion)
    return {
        "method": "bottleneck",
        "placement": "houlsby",
        "bottleneck_size": BOTTLENECK,
        "non_linearity": "swish",
    }


@torch.no_grad()
def randomize(model, family: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random adapter and fusion weights (not near zero: every adapter changes the output),
    returned under splice's names."""
    tensors = {}
    for key, p in model.named_parameters():
        if ".adapters." in key or ".loras." in key:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            sep = ".loras." if ".loras." in key else ".adapters."
            name, param = key.split(sep, 1)[1].split(".", 1)  # "a", "adapter_down.0.weight"
            param = param.replace("adapter_down.0.", "adapter_down.")
            if param in ("lora_A", "lora_B"):  # bare parameters in AdapterHub, Linears in splice
                param += ".weight"
            tensors[f"adapter.{name}.{splice_path(family, key)}.{param}"] = p.detach().clone()
        elif ".adapter_fusion_layer." in key:
            fusion, param = key.split(".adapter_fusion_layer.", 1)[1].split(".", 1)
            noise = torch.randn(p.shape, generator=g)
            if param == "value.weight":
                p.copy_(torch.eye(p.shape[0]) + 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
            tensors[f"fusion.{fusion}.{splice_path(family, key)}.{param}"] = p.detach().clone()
    return tensors


@torch.no_grad()
def generate(family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import transformers

    import adapters

    model = build(family)
    tensors = {f"base.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
    adapters.init(model)
    adapter_config = add_adapters(model, family)
    g = torch.Generator().manual_seed(SEED + 1)
    tensors.update(randomize(model, family, g))
    ids = torch.randint(4, 64, (2, 6), generator=g)
    tensors["input_ids"] = ids

    def forward(block) -> torch.Tensor:
        model.set_active_adapters(block)
        out = model(input_ids=ids)
        value = out.last_hidden_state if family == "bert" else out.logits
        return value.detach().clone().contiguous()

    meta_cases = {}
    for case, block, splice_block in lora_cases() if family == "llama_lora" else cases():
        tensors[f"out.{case}"] = forward(block)
        meta_cases[case] = {"adapterhub": repr(block), "splice": splice_block}
    for case, block in differing():
        tensors[f"differs.{case}"] = forward(block)
    meta = {
        "adapters": adapters.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "family": family,
        "config": json.dumps(BERT if family == "bert" else LLAMA),
        "adapter_config": json.dumps(adapter_config),
        "cases": json.dumps(meta_cases),
    }
    return tensors, meta


def main(out: str) -> None:
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for family in ("llama", "bert", "llama_lora"):
        tensors, meta = generate(family)
        path = folder / f"{family}_golden.safetensors"
        save_file(tensors, str(path), metadata=meta)
        print(f"{path}: {len(tensors)} tensors, {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/adapterhub")
