"""Weight matching (Git Re-Basin) and the permutation specs: a hand-computed assignment, a
model permuted by a known permutation recovered exactly, and the function of an aligned model
unchanged (MLP, Llama with grouped-query attention, Qwen2 with q/k/v biases)."""

import itertools

import pytest
import torch

from splice.merge.align import (
    AlignmentError,
    align,
    apply_permutation,
    llama_spec,
    mlp_spec,
    weight_matching,
)
from tiny_hf import tiny_llama, tiny_qwen2


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def random_mlp(seed, widths=(5, 7, 6, 4, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, (i, o) in enumerate(itertools.pairwise(widths)):
        state[f"fc{k}.weight"] = torch.randn(o, i, generator=g, dtype=dtype)
        state[f"fc{k}.bias"] = torch.randn(o, generator=g, dtype=dtype)
    return state


def mlp_forward(state, x):
    n = len(state) // 2
    for k in range(n):
        x = torch.nn.functional.linear(x, state[f"fc{k}.weight"], state[f"fc{k}.bias"])
        x = torch.relu(x) if k < n - 1 else x
    return x


def test_hand_computed_assignment():
    # C[i, j] = <fc0_A row i, fc0_B row j> + fc1_A[:, i] . fc1_B[:, j] = [[0+5, 2+1], [3+10, 0+2]]
    # identity: 5 + 2 = 7; swap: 3 + 13 = 16 -> unit 1 of B goes first.
    a = {"fc0.weight": torch.tensor([[1.0, 0], [0, 1]]), "fc1.weight": torch.tensor([[1.0, 2]])}
    b = {"fc0.weight": torch.tensor([[0.0, 3], [2, 0]]), "fc1.weight": torch.tensor([[5.0, 1]])}
    spec = mlp_spec(shapes(a))
    result = weight_matching(spec, a, b)
    assert result.perms["P_0"].tolist() == [1, 0]
    assert (result.objective_before, result.objective_after) == (7.0, 16.0)
    assert result.converged
    out = align(a, b, spec)
    assert out["fc0.weight"].tolist() == [[2.0, 0], [0, 3]]
    assert out["fc1.weight"].tolist() == [[1.0, 5]]


def test_mlp_spec_names_the_shared_axes():
    spec = mlp_spec(shapes(random_mlp(0, widths=(2, 3, 4))))
    assert {p: [(r.tensor, r.axis) for r in refs] for p, refs in spec.perms.items()} == {
        "P_0": [("fc0.weight", 0), ("fc0.bias", 0), ("fc1.weight", 1)]
    }


def test_known_permutation_is_recovered_exactly():
    a = random_mlp(1)
    spec = mlp_spec(shapes(a))
    g = torch.Generator().manual_seed(5)
    hidden = {p: torch.randperm(n, generator=g) for p, n in spec.unit_counts(shapes(a)).items()}
    assert all((p != torch.arange(len(p))).any() for p in hidden.values())
    b = apply_permutation(spec, hidden, a)
    assert not torch.equal(b["fc1.weight"], a["fc1.weight"])
    out = align(a, b, spec)
    for name in a:
        assert torch.equal(out[name], a[name]), name


def test_aligned_mlp_computes_the_same_function():
    a, b = random_mlp(1), random_mlp(2)
    spec = mlp_spec(shapes(a))
    result = weight_matching(spec, a, b)
    assert result.objective_after > result.objective_before
    assert any((p != torch.arange(len(p))).any() for p in result.perms.values())
    out = apply_permutation(spec, result.perms, b)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(mlp_forward(out, x), mlp_forward(b, x), atol=1e-6, rtol=0)


def llama_heads_spec(model, residual=False):
    state = model.state_dict()
    heads = (model.config.num_attention_heads, model.config.num_key_value_heads)
    return state, llama_spec(shapes(state), *heads, residual=residual)


def gqa_llama(seed):
    return tiny_llama(seed, num_attention_heads=8, num_key_value_heads=4)  # head_dim 4


@pytest.mark.parametrize("residual", [False, True], ids=["units", "units+residual"])
@pytest.mark.parametrize("build", [gqa_llama, tiny_qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_aligned_decoder_computes_the_same_logits(build, residual):
    ref, other = build(0).eval(), build(1).eval()
    a, spec = llama_heads_spec(ref, residual)
    b = other.state_dict()
    units = {"mlp_0", "heads_0", "mlp_1", "heads_1"}
    assert set(spec.perms) == (units | {"residual"} if residual else units)
    result = weight_matching(spec, a, b)
    moved = {p for p, v in result.perms.items() if (v != torch.arange(len(v))).any()}
    assert {"mlp_0", "mlp_1"} <= moved and moved & {"heads_0", "heads_1"}
    assert ("residual" in moved) == residual
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = other(ids).logits
        other.load_state_dict(apply_permutation(spec, result.perms, b))
        after = other(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_llama_permuted_by_known_heads_and_units_is_recovered():
    a, spec = llama_heads_spec(tiny_llama(0), residual=True)
    counts = spec.unit_counts(shapes(a))
    assert counts == {"mlp_0": 64, "heads_0": 2, "mlp_1": 64, "heads_1": 2, "residual": 32}
    residual = {(r.tensor, r.axis) for r in spec.perms["residual"]}
    # embedding, final norm, lm_head; per layer 2 norms, q/k/v/gate/up inputs, o/down outputs
    assert len(residual) == 3 + 2 * 9 and ("model.norm.weight", 0) in residual
    assert ("model.layers.1.post_attention_layernorm.weight", 0) in residual
    hidden = {p: torch.arange(n).flip(0) for p, n in counts.items()}
    b = apply_permutation(spec, hidden, a)
    # kv head 0 of layer 0 moved to position 1: k rows 0..7 are b's rows 8..15, q rows 0..15
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    # (columns: the residual stream, reversed too)
    assert torch.equal(b[k][8:], a[k][:8].flip(1)) and torch.equal(b[q][16:], a[q][:16].flip(1))
    out = align(a, b, spec)
    for name in a:
        assert torch.equal(out[name], a[name]), name


def test_spec_errors():
    llama = tiny_llama(0).state_dict()
    with pytest.raises(AlignmentError, match="not a linear layer's 2-D weight"):
        mlp_spec(shapes(llama))
    with pytest.raises(AlignmentError, match="do not split into groups"):
        llama_spec(shapes(llama), 4, 3)
    with pytest.raises(AlignmentError, match=r"no '\*.layers.N.mlp.down_proj.weight'"):
        llama_spec(shapes(random_mlp(0)), None, None)
    with pytest.raises(AlignmentError, match="does not read the 7 outputs"):
        mlp_spec({"fc0.weight": (7, 5), "fc1.weight": (3, 6)})
    a, b = random_mlp(0), random_mlp(1, widths=(5, 8, 6, 4, 3))
    with pytest.raises(AlignmentError, match=r"'fc0.weight' has shape \[7, 5\] in the ref"):
        align(a, b, mlp_spec(shapes(a)))
    with pytest.raises(AlignmentError, match="missing from the other model"):
        align(a, {k: v for k, v in a.items() if k != "fc3.bias"}, mlp_spec(shapes(a)))
