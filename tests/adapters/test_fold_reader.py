"""`BASE+ADAPTER` references for every foldable adapter type: the folded checkpoint equals
the adapter model's own `merge_and_unload` (and PEFT's, for LoRA, via the LoRA path)."""

import pytest
import torch
from tiny import randomize, tiny_bert_cls, tiny_llama

from splice.adapters import AdapterModel, make_config, save_adapter
from splice.errors import CheckpointError
from splice.reference import open_checkpoint

QV = ["q_proj", "v_proj"]
CASES = {
    "lora": {"r": 2, "target_modules": QV},
    "ia3": {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "loha": {"r": 2, "target_modules": QV},
    "lokr": {"r": 2, "target_modules": QV},
    "oft": {"r": 0, "oft_block_size": 4, "target_modules": QV},
    "hra": {"r": 2, "target_modules": QV},
    "vera": {"r": 4, "target_modules": QV},
    "ln_tuning": {"target_modules": ["input_layernorm"]},
    "bitfit": {"target_modules": ["q_proj", "v_proj"], "add_missing_bias": False},
}


def _save_base(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", sorted(CASES))
def test_generic_fold_equals_merge_and_unload(method, tmp_path):
    if method == "bitfit":  # llama linears have no bias: use BERT, whose layers do
        make, params = tiny_bert_cls, {"target_modules": ["query", "value"]}
    else:
        make, params = tiny_llama, CASES[method]
    base_dir = _save_base(make(), tmp_path / "base")
    am = AdapterModel(make())
    am.add_adapter("default", make_config(method, params))
    randomize(am.adapter_parameters("default"), scale=0.2)
    save_adapter(am, tmp_path / "adapter")
    expected = am.merge_and_unload().state_dict()
    from splice.adapters.fold_reader import AdapterFoldedReader

    reader = AdapterFoldedReader(open_checkpoint(base_dir), tmp_path / "adapter", base_dir)
    changed = [n for n in reader.names() if reader.is_modified(n)]
    assert changed
    for name in reader.names():
        want = expected[name] if name in expected else expected[name.removeprefix("bert.")]
        torch.testing.assert_close(reader.read(name), want, atol=1e-6, rtol=1e-6)
    # through open_checkpoint (non-LoRA types take this path there)
    if method != "lora":
        via_ref = open_checkpoint(f"{base_dir}+{tmp_path / 'adapter'}")
        assert type(via_ref).__name__ == "AdapterFoldedReader"
        torch.testing.assert_close(via_ref.read(changed[0]), reader.read(changed[0]))


def test_activation_space_adapter_is_refused(tmp_path):
    base_dir = _save_base(tiny_llama(), tmp_path / "base")
    am = AdapterModel(tiny_llama())
    am.add_adapter(
        "default",
        make_config("bottleneck", {"target_modules": ["down_proj"], "bottleneck_size": 4}),
    )
    save_adapter(am, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"cannot be folded|no weight delta|activations"):
        r = open_checkpoint(f"{base_dir}+{tmp_path / 'adapter'}")
        for n in r.names():
            if r.is_modified(n):
                r.read(n)


def test_mismatched_adapter_is_clear(tmp_path):
    base_dir = _save_base(tiny_bert_cls(), tmp_path / "base")
    am = AdapterModel(tiny_llama())
    am.add_adapter("default", make_config("ia3", CASES["ia3"]))
    save_adapter(am, tmp_path / "adapter")
    with pytest.raises(CheckpointError):
        open_checkpoint(f"{base_dir}+{tmp_path / 'adapter'}")
