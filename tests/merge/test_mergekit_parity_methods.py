"""splice (mergekit dialect) against mergekit 0.1.5's own merge kernels.

Each case calls mergekit's registered method on one TensorGroup (its public entry point:
parameter binding, dtype alignment, then the kernel) and splice's method with
``MergeContext(dialect="mergekit")`` and no parameters beyond the recipe's, so mergekit
defaults are exercised too. Inputs are random float32 (no magnitude ties, where the two
tie rules could pick different entries). DARE draws its masks from a different RNG and is
compared only at density 1, where it is deterministic.
"""

import zlib

import pytest
import torch

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

from splice.merge import MergeContext, get_method  # noqa: E402

SHAPES = [(24, 40), (40,), (3, 4, 10)]


def inputs(shape, n, seed, scale=0.05, spread=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * scale
    return base, [base + torch.randn(shape, generator=g) * spread for _ in range(n)]


def mergekit_merge(name, base, tensors, params):
    if base is None:
        group = TensorGroup.from_tensors([t.clone() for t in tensors])
    else:
        group = TensorGroup.from_tensors(
            [base.clone()] + [t.clone() for t in tensors], base_index=0
        )
    (out,) = mk_registry.get(name)([group], parameters=params)
    return out


def splice_merge(name, base, tensors, params):
    ctx = MergeContext(dialect="mergekit", tensor_name="w")
    b = None if base is None else base.clone()
    return get_method(name)(b, [t.clone() for t in tensors], ctx, **params)


def check(name, base, tensors, params, splice_params=None):
    expected = mergekit_merge(name, base, tensors, params)
    actual = splice_merge(name, base, tensors, params if splice_params is None else splice_params)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


GTA_CASES = {
    "task_arithmetic": [
        {"weight": [1.0, 0.5, 0.8]},
        {"weight": [1.0, 0.5, 0.8], "normalize": True, "lambda": 0.7},
    ],
    "ties": [
        {"weight": [1.0, 0.5, 0.8], "density": [0.29, 0.63, 0.87]},
        {"weight": [1.0, -0.5, 0.8], "density": 0.2, "normalize": False, "lambda": 1.3},
        {"weight": [0.7, 0.5, 0.8], "density": [0.5, 0.001, 1.0], "rescale": True},
    ],
    "breadcrumbs": [
        {"weight": [1.0, 0.5, 0.8], "density": [0.29, 0.63, 0.87], "gamma": [0.01, 0.05, 0.1]},
        {"weight": [1.0, 0.5, 0.8], "density": 0.95, "gamma": 0.17, "normalize": True},
        {"weight": [1.0, 0.5, 0.8], "density": 0.3, "rescale": True, "lambda": 0.5},
    ],
    "breadcrumbs_ties": [
        {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.9], "gamma": [0.01, 0.05, 0.1]},
        {"weight": [1.0, 0.5, 0.8], "density": 0.37, "gamma": 0.29, "normalize": True},
    ],
    "dare_linear": [{"weight": [1.0, 0.5, 0.8]}, {"weight": [1.0, 0.5, 0.8], "normalize": True}],
    "dare_ties": [{"weight": [1.0, 0.5, 0.8]}, {"weight": [1.0, 0.5, 0.8], "normalize": True}],
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "params"),
    [(name, p) for name, cases in GTA_CASES.items() for p in cases],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_task_vector_methods(name, params, shape):
    base, tensors = inputs(shape, 3, seed=zlib.crc32(f"{name}{shape}".encode()))
    check(name, base, tensors, params)


TIED_CASES = [
    ("ties", {"weight": [1.0, 0.5, 0.8], "density": [0.2, 0.3, 0.5]}),
    ("ties", {"weight": [1.0, 0.5, 0.8], "density": 0.37, "rescale": True}),
    ("breadcrumbs", {"weight": [1.0, 0.8, 0.6], "density": [0.5, 0.7, 0.9], "gamma": 0.05}),
    ("breadcrumbs_ties", {"weight": 1.0, "density": 0.6, "gamma": [0.05, 0.1, 0.01]}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "params"), TIED_CASES, ids=[c[0] for c in TIED_CASES])
def test_tied_magnitudes_like_bf16(name, params, shape):
    # bf16-rounded weights: task vectors take few distinct values, so many |δ| are equal
    # across the keep boundaries and mergekit's sort order decides which are kept
    base, tensors = inputs(shape, 3, seed=11)
    base, tensors = base.bfloat16().float(), [t.bfloat16().float() for t in tensors]
    check(name, base, tensors, params)


@pytest.mark.parametrize("shape", SHAPES)
def test_ties_unit_scale(shape):
    base, tensors = inputs(shape, 3, seed=5, scale=1.0, spread=1.0)
    check("ties", base, tensors, {"weight": [1.0, 0.5, 0.8], "density": [0.29, 0.63, 0.87]})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
    _, tensors = inputs(shape, 3, seed=1, spread=0.5)
    check("linear", None, tensors, {"weight": [0.3, 0.5, 0.9], "normalize": normalize})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 1.0])
def test_slerp(shape, t):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    check("slerp", a, [b], {"t": t})
    # nearly parallel: linear fallback
    check("slerp", a, [a * 1.5 + 1e-4 * b], {"t": t})
    # zero base: mergekit's zero-norm guard
    check("slerp", torch.zeros(shape), [b], {"t": t})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 4])
def test_model_stock(shape, filter_wise, n):
    base, tensors = inputs(shape, n, seed=3, scale=0.05, spread=0.02)
    tensors = [t + 0.01 * (base - 0.03) for t in tensors]  # correlated task vectors
    check("model_stock", base, tensors, {"filter_wise": filter_wise})
    if not filter_wise:
        check("model_stock", base, tensors, {})


def test_passthrough():
    _, (t,) = inputs((5, 7), 1, seed=4)
    check("passthrough", None, [t], {})
    check("passthrough", None, [t], {"scale": [0.25]})


# float16 / bfloat16: mergekit does its arithmetic in the inputs' dtype (linear and SLERP in
# float32 inside, rounded once), so every rounding and every sign election counts; the
# mergekit dialect must give the same bits.
LOW_PRECISION = [torch.bfloat16, torch.float16]
# methods whose float32 statistics mergekit computes its own way (chunked SLERP norms,
# float32 coefficients, Model Stock's / Karcher's operation order): same bits in float32 too
WITH_FLOAT32 = [torch.float32, *LOW_PRECISION]


def check_bits(name, base, tensors, params):
    expected = mergekit_merge(name, base, tensors, params)
    actual = splice_merge(name, base, tensors, params)
    assert actual.dtype == expected.dtype
    differ = (actual != expected).sum().item()
    assert torch.equal(actual, expected), f"{differ} of {expected.numel()} entries differ"


def low(x, dtype):
    return None if x is None else x.to(dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "params"),
    [(name, p) for name, cases in GTA_CASES.items() for p in cases] + TIED_CASES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_task_vector_methods_same_bits(name, params, shape, dtype):
    # unit-scale weights with small task vectors: in bf16 the deltas take a few values
    # (many equal magnitudes at the keep boundary) and the weighted sums round
    base, tensors = inputs(shape, 3, seed=zlib.crc32(f"{name}{shape}low".encode()))
    check_bits(name, low(base, dtype), [low(t, dtype) for t in tensors], params)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_same_bits(normalize, dtype):
    _, tensors = inputs((24, 40), 3, seed=1, spread=0.5)
    params = {"weight": [0.3, 0.5, 0.9], "normalize": normalize}
    check_bits("linear", None, [low(t, dtype) for t in tensors], params)


@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_same_bits(shape, t, dtype):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    check_bits("slerp", a, [b], {"t": t})
    check_bits("slerp", a, [(a.float() * 1.5).to(dtype)], {"t": t})  # parallel: linear
    check_bits("slerp", torch.zeros_like(a), [b], {"t": t})


@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
def test_slerp_same_bits_over_several_chunks(dtype):
    # more entries than one of mergekit's 2^20-entry chunks: norms of chunk norms, chunked dot
    g = torch.Generator().manual_seed(4)
    a = torch.randn(1100, 1000, generator=g)
    b = (a * 0.3 + torch.randn(1100, 1000, generator=g)).to(dtype)
    check_bits("slerp", a.to(dtype), [b], {"t": 0.4})


@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_same_bits(shape, filter_wise, dtype):
    base, tensors = inputs(shape, 3, seed=3, scale=0.05, spread=0.02)
    tensors = [low(t + 0.01 * (base - 0.03), dtype) for t in tensors]
    check_bits("model_stock", low(base, dtype), tensors, {"filter_wise": filter_wise})


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_deterministic_same_bits(name, dtype):
    # density 1 (mergekit's default): no draw, only the combine's arithmetic
    base, tensors = inputs((24, 40), 3, seed=12)
    params = {"weight": [1.0, -0.5, 0.8], "normalize": True, "lambda": 0.7}
    check_bits(name, low(base, dtype), [low(t, dtype) for t in tensors], params)


@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_same_bits(shape, dtype):
    # mergekit iterates in the inputs' dtype (norms in float32): every step rounds
    _, tensors = inputs(shape, 3, seed=7, spread=0.05)
    check_bits("karcher", None, [t.to(dtype) for t in tensors], {})
    check_bits("karcher", None, [t.to(dtype) for t in tensors], {"max_iter": 3, "tol": 1e-3})


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_same_bits(shape, with_base, dtype):
    base, tensors = inputs(shape, 3, seed=8, spread=0.05)
    b = base.to(dtype) if with_base else None
    check_bits("multislerp", b, [t.to(dtype) for t in tensors], {"weight": [1.0, 0.5, 0.8]})


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_passthrough_same_bits(dtype):
    _, (t,) = inputs((5, 7), 1, seed=4)
    check_bits("passthrough", None, [t.to(dtype)], {"scale": [0.25]})


def test_float32_kernel_differs_in_bfloat16():
    """The check is not vacuous: splice's float32-style kernel (the splice dialect) differs
    from mergekit's bf16 arithmetic on these inputs."""
    base, tensors = inputs((24, 40), 3, seed=zlib.crc32(b"ties(24, 40)low"))
    base, tensors = base.bfloat16(), [t.bfloat16() for t in tensors]
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.29, 0.63, 0.87], "scope": "tensor"}
    expected = mergekit_merge("ties", base, tensors, {k: params[k] for k in ("weight", "density")})
    ctx = MergeContext(dialect="splice", tensor_name="w")
    actual = get_method("ties")(base.clone(), [t.clone() for t in tensors], ctx, **params)
    assert not torch.equal(actual, expected)


# mergekit's whole-tensor reductions (SLERP's dot, Model Stock's dots and float16 norms)
# split over torch's intra-op threads from 2^15 entries on, so its bits depend on its thread
# count; the mergekit dialect takes that count from SPLICE_MERGEKIT_THREADS (default:
# torch's default) whatever its own. Several tensors of each shape, above the grain.
THREADED_SHAPES = [(256, 320), (256, 320), (70_001,), (300, 500)]


def mergekit_merge_with_threads(name, base, tensors, params, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return mergekit_merge(name, base, tensors, params)
    finally:
        torch.set_num_threads(old)


def check_bits_threaded(name, base, tensors, params, threads, monkeypatch):
    monkeypatch.setenv("SPLICE_MERGEKIT_THREADS", str(threads))
    expected = mergekit_merge_with_threads(name, base, tensors, params, threads)
    old = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # not mergekit's count
    try:
        actual = splice_merge(name, base, tensors, params)
    finally:
        torch.set_num_threads(old)
    assert actual.dtype == expected.dtype
    differ = (actual != expected).sum().item()
    assert torch.equal(actual, expected), f"{differ} of {expected.numel()} entries differ"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
def test_slerp_same_bits_with_mergekit_threads(dtype, threads, monkeypatch):
    g = torch.Generator().manual_seed(21)
    for i, shape in enumerate(THREADED_SHAPES):
        a = torch.randn(shape, generator=g) * 0.02
        b = a + torch.randn(shape, generator=g) * 0.01
        t = (0.4, 0.7, 0.25, 0.5)[i]
        check_bits_threaded("slerp", a.to(dtype), [b.to(dtype)], {"t": t}, threads, monkeypatch)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", WITH_FLOAT32, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_same_bits_with_mergekit_threads(dtype, filter_wise, threads, monkeypatch):
    for i, shape in enumerate(THREADED_SHAPES):
        base, tensors = inputs(shape, 3, seed=30 + i, scale=0.05, spread=0.02)
        tensors = [low(t + 0.01 * (base - 0.03), dtype) for t in tensors]
        params = {"filter_wise": filter_wise}
        check_bits_threaded("model_stock", low(base, dtype), tensors, params, threads, monkeypatch)
