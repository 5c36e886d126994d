"""A routed mixture on a tiny HF Llama: two LoRA experts trained on two synthetic tasks, a
gate trained over them (token and sequence level) routes each task to its expert and beats
the uniform average of the experts; save / load round trip; `splice train --method mixture`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_hf
from splice.adapters import AdapterModel, make_config, save_adapter
from splice.cli import main
from splice.compose.mixture import Mixture
from splice.compose.mixture_config import MixtureError
from splice.compose.mixture_io import load_mixture, save_mixture
from splice.train.loop import evaluate_lm, fit

TASKS = {"up": (4, 1), "skip": (34, 7)}  # ids lo .. lo+29, next = lo + (t - lo + step) % 30
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def task(kind: str, rows: int, seed: int, length: int = 10) -> dict[str, torch.Tensor]:
    """Cyclic sequences over a task's own 30 ids (disjoint vocabularies)."""
    lo, step = TASKS[kind]
    start = torch.randint(0, 30, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = lo + (start + step * torch.arange(length)) % 30
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def both(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """``rows`` of "up" then ``rows`` of "skip"."""
    a, b = task("up", rows, seed), task("skip", rows, seed + 7)
    return {k: torch.cat([a[k], b[k]]) for k in a}


def batches(data: dict[str, torch.Tensor], size: int = 16):
    n = len(data["input_ids"])
    return lambda epoch: [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def tiny_base():
    # one layer; a larger init than 0.02 so the frozen head can express confident predictions
    return tiny_hf.tiny_llama(0, num_hidden_layers=1, initializer_range=0.3).eval()


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: faster on one thread, and fair to a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experts(tmp_path_factory, one_thread) -> tuple[AdapterModel, dict[str, Path]]:
    """An AdapterModel with experts "up" and "skip", each trained on its task (30 steps), and
    their saved folders; the base model saved as an HF folder under "base"."""
    root = tmp_path_factory.mktemp("experts")
    model = tiny_base()
    model.save_pretrained(root / "base")
    tiny_hf.tiny_tokenizer().save_pretrained(root / "base")
    am = AdapterModel(model)
    folders = {}
    for name in TASKS:
        am.add_adapter(name, make_config("lora", LORA))
        am.set_active([name])
        torch.manual_seed(1)
        fit(am, batches(task(name, 32, seed=1)), 30, lr=3e-2, progress=False)
        folders[name] = save_adapter(am, root / name, name)
        for p in am.adapter_parameters(name):
            p.requires_grad_(False)
    return am, folders


def test_experts_each_fit_their_own_task(experts):
    am, _ = experts
    losses = {}
    for name in TASKS:
        am.set_active([name])
        for kind in TASKS:
            losses[name, kind] = evaluate_lm(am, batches(task(kind, 32, 100), 64)(0))["loss"]
    assert losses["up", "up"] < losses["skip", "up"] - 1
    assert losses["skip", "skip"] < losses["up", "skip"] - 1


@pytest.mark.parametrize(("gate", "top_k", "steps"), [("token", 2, 40), ("sequence", None, 20)])
def test_trained_gate_routes_each_task_to_its_expert(experts, gate, top_k, steps):
    am, _ = experts
    torch.manual_seed(0)
    mix = Mixture(am, list(TASKS), gate=gate, top_k=top_k, balance_coef=0.01)
    for p in mix.gate_parameters():
        torch.nn.init.zeros_(p)  # uniform routing: the plain average of the experts
    test = batches(both(16, 100), 64)(0)
    uniform = evaluate_lm(mix, test)["loss"]
    frozen = {n: p.detach().clone() for n, p in am.named_parameters()}
    fit(mix, batches(both(16, 5)), steps, lr=1e-1, progress=False)
    for n, p in am.named_parameters():  # the experts and the base never change
        assert torch.equal(p, frozen[n]), n
    trained = evaluate_lm(mix, test)["loss"]
    assert trained < uniform - 0.2, (uniform, trained)
    with torch.no_grad():
        mix(**{k: v for k, v in test[0].items() if k != "labels"})
    # per row: the mean weight of (up, skip) over its tokens and the routed layers
    g = torch.stack([r.weights.reshape(32, -1, 2).mean(dim=1) for r in mix.last_routing.values()])
    g = g.mean(dim=0)
    assert g[:16, 0].mean() > 0.6 and g[16:, 1].mean() > 0.6, g


def test_save_load_round_trip(experts, tmp_path):
    am, folders = experts
    inputs = {k: v for k, v in both(2, 3).items() if k != "labels"}
    for gate, top_k in (("token", 1), ("sequence", 2)):
        torch.manual_seed(4)
        mix = Mixture(am, list(TASKS), gate=gate, top_k=top_k, renormalize=False)
        for p in mix.gate_parameters():
            torch.nn.init.normal_(p, std=1.0)
        out = save_mixture(mix, tmp_path / gate, expert_paths=folders)
        config = json.loads((out / "mixture_config.json").read_text())
        assert config["experts"] == {n: str(Path(f).resolve()) for n, f in folders.items()}
        assert (config["gate"], config["top_k"], config["renormalize"]) == (gate, top_k, False)
        names = sorted(p.name for p in out.iterdir())  # and splice's output marker; no pickle
        assert names == ["gate.safetensors", "mixture_config.json", "splice_output.json"]
        fresh = AdapterModel(tiny_base())  # experts loaded from their folders
        loaded = load_mixture(fresh, out)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, mix(**inputs).logits)


def test_load_errors(experts, tmp_path):
    am, folders = experts
    mix = Mixture(am, list(TASKS))
    out = save_mixture(mix, tmp_path / "mix", expert_paths=folders)
    with pytest.raises(MixtureError, match="not a mixture folder"):
        load_mixture(AdapterModel(tiny_base()), folders["up"])
    # an expert trained on another base (hidden 16): the expert's own load error, one line
    other = AdapterModel(tiny_hf.tiny_llama(0, num_hidden_layers=1, hidden_size=16))
    with pytest.raises(Exception, match="shape") as e:
        load_mixture(other, out)
    assert "\n" not in str(e.value)
    config = json.loads((out / "mixture_config.json").read_text())
    config["experts"]["up"] = str(tmp_path / "nowhere")
    (out / "mixture_config.json").write_text(json.dumps(config))
    with pytest.raises(MixtureError, match=r"expert 'up': .*nowhere is not an adapter folder"):
        load_mixture(AdapterModel(tiny_base()), out)


def test_unknown_expert_on_a_loaded_model(experts):
    am, _ = experts
    with pytest.raises(MixtureError, match=r"unknown expert 'upp' \(did you mean 'up'\?\)"):
        Mixture(am, ["upp", "skip"])


def _text(ids: torch.Tensor) -> str:
    chars = tiny_hf.tiny_tokenizer().convert_ids_to_tokens(ids.tolist())
    return "".join(chars)


def test_cli_train_mixture_writes_a_loadable_folder(experts, tmp_path, capsys):
    _, folders = experts
    data = tmp_path / "both.jsonl"
    rows = both(8, 11)["input_ids"]
    data.write_text("".join(json.dumps({"text": _text(r)}) + "\n" for r in rows))
    base = folders["up"].parent / "base"
    argv = ["train", "--model", str(base), "--task", "causal_lm", "--data", str(data)]
    argv += ["--method", "mixture", "--steps", "3", "--batch-size", "4", "--quiet"]
    argv += [f"--expert={n}={f}" for n, f in folders.items()]
    argv += ["--param", "gate=sequence", "--param", "top_k=1", "--param", "balance_coef=0.01"]
    assert main([*argv, "--out", str(tmp_path / "mix")]) == 0
    printed = capsys.readouterr().out
    assert "mixture written to" in printed and "trainable params: 66 of" in printed  # 2·32 + 2
    loaded = load_mixture(AdapterModel(tiny_base()), tmp_path / "mix")
    assert (loaded.gate_kind, loaded.top_k, loaded.balance_coef) == ("sequence", 1, 0.01)
    saved = json.loads((tmp_path / "mix" / "eval.json").read_text())
    assert saved["method"] == "mixture" and saved["trainable_params"] == 66


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--expert", "up=X"], "at least two experts, got 1"),
        (["--expert", "up=X", "--expert", "skip=Y"], "expert 'up': X is not an adapter folder"),
        (["--expert", "up"], "--expert 'up': expected NAME=PATH"),
        (["--expert", "a=U", "--expert", "a=S"], "--expert 'a' given twice"),
        (["--expert", "a.b=U", "--expert", "c=S"], "--expert 'a.b': a name without '.'"),
        (["--expert", "a=U", "--expert", "b=S", "--param", "top_k=3"], "top_k=3 but"),
        (["--expert", "a=U", "--expert", "b=S", "--param", "gate=layer"], "'gate'"),
        (["--expert", "a=U", "--expert", "b=S", "--param", "topk=1"], "did you mean 'top_k'"),
    ],
)
def test_cli_errors_are_one_line_before_loading(tmp_path, capsys, extra, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "abc"}\n')
    argv = ["train", "--model", "nowhere", "--task", "causal_lm", "--data", str(data)]
    assert main([*argv, "--method", "mixture", *extra, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("splice: error:") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("gate", "top_k"), [("token", 1), ("sequence", None)])
def test_generate_equals_greedy_steps_through_the_mixture(experts, gate, top_k):
    am, _ = experts
    torch.manual_seed(5)
    mix = Mixture(am, list(TASKS), gate=gate, top_k=top_k, renormalize=False).eval()
    for p in mix.gate_parameters():
        torch.nn.init.normal_(p, std=1.0)
    prompt = both(1, 9)["input_ids"][:, :4]
    feats = mix.sequence_features((), {"input_ids": prompt}) if gate == "sequence" else None
    ids = prompt
    with torch.no_grad():
        for _ in range(4):  # no cache: the whole sequence each step
            logits = mix(input_ids=ids, sequence_features=feats).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out = mix.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, ids)


def test_sequence_features_mean_over_unpadded_tokens_of_the_base_model(experts):
    am, _ = experts
    mix = Mixture(am, list(TASKS), gate="sequence")
    ids = both(1, 2)["input_ids"]
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    feats = mix.sequence_features((), {"input_ids": ids, "attention_mask": mask})
    with am.disabled(), torch.no_grad():
        h = am.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = h.hidden_states[-1]
    torch.testing.assert_close(feats[0], h[0].mean(0))
    torch.testing.assert_close(feats[1], h[1, :6].mean(0))
