"""Parity with AdapterHub's ``adapters`` (peer implementation of the composition blocks, of
Houlsby bottleneck adapters and of LoRA), against golden outputs it produced.

``adapters`` pins an older transformers, so it cannot run here: scripts/adapterhub_golden.py
(run by hand in a side venv) built a tiny random Llama causal LM and a tiny random BERT, added
three Houlsby bottleneck adapters a, b, c and the fusions "a,b" and "b,c" (and, on the Llama,
separately three LoRAs a, b, c on q and v) with random weights, and saved the weights (under
splice's module paths), the inputs and AdapterHub's outputs for each composition
(tests/fixtures/adapterhub/*.safetensors; the versions are in the files' metadata). Here
the same weights are loaded into splice and each splice block's output must equal
AdapterHub's within 1e-5 (float32): the logits (Llama) or the last hidden state (BERT).
The one documented conversion: AdapterHub's Average has an extra 1/N, so its golden outputs
were made with weights N·w unnormalized, which is splice's Average(w).

AdapterHub's own Average(w) is stored too (``differs.average_abc``): splice's differs from
it, so the conversion is needed. Every adapter and block changes the output far beyond the
tolerance, so no case passes by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from splice.adapters import AdapterModel, make_config
from splice.compose import Fuse, parse_composition

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def read(family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(FIXTURES / f"{family}_golden.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        return tensors, dict(f.metadata())


def group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """``<prefix>.<name>.<rest>`` tensors as {name: {rest: tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            name, rest = key[len(prefix) + 1 :].split(".", 1)
            out.setdefault(name, {})[rest] = value
    return out


@torch.no_grad()
def splice_model(family: str) -> tuple[AdapterModel, dict[str, torch.Tensor], dict[str, str]]:
    """The golden file's base model with adapters a, b, c and both fusions, in splice."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tensors, meta = read(family)
    kw = json.loads(meta["config"])
    if family == "bert":
        model = BertModel(BertConfig(**kw, attn_implementation="eager"), add_pooling_layer=False)
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation="eager"))
    base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
    model.load_state_dict(base, strict=True)
    am = AdapterModel(model.eval())
    params = json.loads(meta["adapter_config"])
    method = params.pop("method")
    for name, state in sorted(group(tensors, "adapter").items()):
        am.add_adapter(name, make_config(method, params), activate=False)
        modules = dict(am.named_adapter_modules(name))
        own = {f"{p}.{k}": v for p, m in modules.items() for k, v in m.state_dict().items()}
        assert sorted(own) == sorted(state), (
            name
        )  # the same layers (Houlsby: AdapterHub's placement)
        for path, module in modules.items():
            module.load_state_dict({k[len(path) + 1 :]: v for k, v in state.items()
                                    if k.startswith(path + ".")})  # fmt: skip
    for fusion, state in group(tensors, "fusion").items():
        am.add_fusion(Fuse(*fusion.split(","), name=fusion))
        am.fusions[fusion].load_fusion_state(state, f"fusion {fusion}")
    return am.eval(), tensors, meta


@pytest.fixture(scope="module", params=["llama", "bert", "llama_lora"])
def golden(request):
    return splice_model(request.param)


def output(out, family: str) -> torch.Tensor:
    return out.last_hidden_state if family == "bert" else out.logits


@torch.no_grad()
def run(am: AdapterModel, meta: dict[str, str], block) -> torch.Tensor:
    ids = run.ids
    if block is None:
        with am.disabled():
            return output(am(input_ids=ids), meta["family"])
    am.set_active(parse_composition(block))
    out = am(input_ids=ids)
    if isinstance(out, list):  # Parallel: one output per child, AdapterHub's rows in order
        return torch.cat([output(o, meta["family"]) for o in out], dim=0)
    return output(out, meta["family"])


def test_fixture_records_the_adapterhub_version(golden):
    _, _, meta = golden
    assert meta["adapters"] == "1.3.0"
    want = {"base", "single_a", "average_abc", "parallel_ab"}
    if meta["family"] != "llama_lora":  # AdapterHub fuses bottleneck adapters only
        want |= {"stack_ab", "stack_abc", "average_a_stack_bc", "fuse_ab", "stack_a_fuse_bc"}
    assert set(json.loads(meta["cases"])) >= want


def test_every_composition_equals_adapterhub(golden):
    am, tensors, meta = golden
    run.ids = tensors["input_ids"]
    cases = json.loads(meta["cases"])
    failures = []
    for case, spec in cases.items():
        got = run(am, meta, spec["splice"])
        want = tensors[f"out.{case}"]
        assert got.shape == want.shape, case
        if not torch.allclose(got, want, **TOL):
            failures.append(f"{case}: max |diff| {(got - want).abs().max():.2e}")
    assert not failures, failures


def test_each_case_is_discriminating(golden):
    """Every adapter and block changes the output, far beyond the tolerance, so a wrong
    placement, order or weight would fail the parity test."""
    _, tensors, _ = golden
    outs = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
    singles = {k: v for k, v in outs.items() if v.shape == outs["base"].shape}
    names = sorted(singles)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (singles[a] - singles[b]).abs().max() > 1e-3, (a, b)
    rows = outs["base"].shape[0]
    assert (outs["parallel_ab"][:rows] - outs["single_a"]).abs().max() < 1e-5
    assert (outs["parallel_ab"][rows:] - outs["single_a"]).abs().max() > 1e-3


def test_the_average_conversion_matters(golden):
    """AdapterHub's own Average(w) (normalized, (1/N) Σ w_i out_i: the base output scaled by
    1/N too) is not splice's Average(w): the conversion N·w is needed, and the difference is
    far beyond the tolerance."""
    am, tensors, meta = golden
    run.ids = tensors["input_ids"]
    ours = run(am, meta, {"average": {"a": 0.5, "b": 0.3, "c": 0.2}})
    torch.testing.assert_close(ours, tensors["out.average_abc"], **TOL)
    assert (ours - tensors["differs.average_abc"]).abs().max() > 1e-2
