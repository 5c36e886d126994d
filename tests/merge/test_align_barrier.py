"""The real check of alignment: two MLPs trained from different seeds on the same task.

Task (torch only, fixed seeds): x ~ N(0, I_4), label = argmax of a fixed random teacher
tanh(x T₁) T₂ over 4 classes; 1000 training points. Each student is 4 → 64 → 64 → 4 (ReLU),
full-batch Adam (lr 1e-2, 150 steps), from init seed 1 or 2. The loss barrier of a merge is
its training loss minus the mean of the two endpoint losses. Measured (docs/alignment.md):
plain averaging 1.77, after weight matching 0.146, PLeaS at merge fraction 1 (same widths)
0.044, at 0.5 (1.5× hidden widths) 0.032. The assertions keep clear margins."""

import pytest
import torch
import torch.nn.functional as F

from splice.merge.align import align, mlp_spec
from splice.merge.align.pleas import pleas_merge

D, H, C, N, STEPS = 4, 64, 4, 1000, 150


def task(n, seed):
    teacher = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(D, 32, generator=teacher), torch.randn(32, C, generator=teacher)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, (torch.tanh(x @ t1) @ t2).argmax(1)


def forward(state, x):
    for k in range(3):
        x = F.linear(x, state[f"fc{k}.weight"], state[f"fc{k}.bias"])
        x = torch.relu(x) if k < 2 else x
    return x


def loss(state, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(forward(state, x), y))


def train(seed, x, y):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(D, H), torch.nn.Linear(H, H), torch.nn.Linear(H, C)]
    state = {f"fc{k}.{p}": t for k, m in enumerate(layers) for p, t in m.named_parameters()}
    opt = torch.optim.Adam(state.values(), lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(forward(state, x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in state.items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: faster on one thread, and fair to a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    x, y = task(N, seed=1)
    return x, y, train(1, x, y), train(2, x, y)


def barrier(merged, a, b, x, y):
    return loss(merged, x, y) - (loss(a, x, y) + loss(b, x, y)) / 2


def average(a, b):
    return {k: (a[k] + b[k]) / 2 for k in a}


def test_weight_matching_removes_most_of_the_barrier(trained):
    x, y, a, b = trained
    assert max(loss(a, x, y), loss(b, x, y)) < 0.05  # both endpoints fit the task
    naive = barrier(average(a, b), a, b, x, y)
    aligned_b = align(a, b, mlp_spec({k: tuple(v.shape) for k, v in a.items()}))
    torch.testing.assert_close(forward(aligned_b, x), forward(b, x), atol=1e-4, rtol=0)
    aligned = barrier(average(a, aligned_b), a, b, x, y)
    assert naive > 1.0
    assert aligned < 0.3 and aligned < naive / 5


def test_pleas_least_squares_lowers_the_barrier_further(trained):
    x, y, a, b = trained
    aligned_b = align(a, b, mlp_spec({k: tuple(v.shape) for k, v in a.items()}))
    aligned = barrier(average(a, aligned_b), a, b, x, y)
    full = pleas_merge(a, b, x, merge_fraction=1.0)
    assert {k: tuple(v.shape) for k, v in full.items()} == {k: tuple(v.shape) for k, v in a.items()}
    assert barrier(full, a, b, x, y) < 0.6 * aligned
    half = pleas_merge(a, b, x, merge_fraction=0.5)
    assert half["fc1.weight"].shape == (96, 96)  # 32 merged + 32 + 32 kept from each model
    assert barrier(half, a, b, x, y) < 0.5 * aligned


def test_partial_matching_initialization_limits(trained):
    x, _, a, b = trained
    x64 = x.double()
    a64, b64 = {k: v.double() for k, v in a.items()}, {k: v.double() for k, v in b.items()}
    # nothing merged: the two networks side by side, logits averaged
    separate = pleas_merge(a64, b64, x64, merge_fraction=0.0, least_squares=False)
    assert separate["fc1.weight"].shape == (128, 128)
    ensemble = (forward(a64, x64) + forward(b64, x64)) / 2
    torch.testing.assert_close(forward(separate, x64), ensemble, atol=1e-10, rtol=0)
    # the least-squares step keeps an exact fit where there is one
    solved = pleas_merge(a64, b64, x64, merge_fraction=0.0)
    torch.testing.assert_close(forward(solved, x64), ensemble, atol=1e-6, rtol=0)
    # everything merged, no least squares: the weight-matching average
    merged = pleas_merge(a64, b64, x64, merge_fraction=1.0, least_squares=False)
    expected = average(a64, align(a64, b64, mlp_spec({k: tuple(v.shape) for k, v in a.items()})))
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], atol=0, rtol=0)
