import math

import pytest
import torch
from merge_test_util import run

from splice.errors import MergeValidationError

T1 = [4.0, -2.0, 1.0, 0.5]
T2 = [2.0, 1.0, -3.0, 3.0]
E2, th = math.exp(2.0), math.tanh
# d = 4, N = 2. Magnitude clipping: lower index int(4e-4) = 0, upper int(4*0.9999 - 1) = 2.
#   |T1| sorted [.5,1,2,4]: clip to [.5, 2] -> a1 = [2,2,1,.5],  clipped T1 = [2,-2,1,.5]
#   |T2| sorted [1,2,3,3]:  clip to [1, 3]  -> a2 = [2,1,3,3],   clipped T2 = [2,1,-3,3]
# intra: exp(2 * norm(a)^2): norm(a1) = [1,1,1/3,0] -> [e^2, e^2, e^(2/9), 1]
#                            norm(a2) = [.5,0,1,1]  -> [e^.5, 1, e^2, e^2]
# inter: tanh(T_i * (T1 + T2)), T1 + T2 = [6,-1,-2,3.5]
#   T1: tanh([24, 2, -2, 1.75]);  T2: tanh([12, -1, 6, 10.5])
B1 = [E2 * th(24), E2 * th(2), -math.exp(2 / 9) * th(2), th(1.75)]
B2 = [math.exp(0.5) * th(12), -th(1), E2 * th(6), E2 * th(10.5)]
C1, C2 = [2.0, -2.0, 1.0, 0.5], [2.0, 1.0, -3.0, 3.0]


def norm(x):
    lo, hi = min(x), max(x)
    return [(v - lo) / (hi - lo) for v in x]


def test_ratio_one_keeps_every_entry_weighted():
    s1, s2 = norm(B1), norm(B2)
    expected = [(a * c + b * e) / max(a + b, 1e-12) for a, b, c, e in zip(s1, s2, C1, C2)]
    out = run("pcb", [0.0] * 4, [T1, T2], ratio=1.0)
    torch.testing.assert_close(out, torch.tensor(expected))
    # entry 3 is a real mix: s1[3] = (tanh 1.75 + e^(2/9) tanh 2) / (e^2 tanh 24 + e^(2/9) tanh 2)
    assert 0.5 < out[3] < 3.0


def test_drop_keeps_the_top_of_each_row():
    # ratio .75: threshold = sorted[int(4 * .25)] = 2nd smallest of each row
    #   B1 ~ [7.39, 7.12, -1.20, 0.94]: entries <= 0.94 get score 0 -> s1 = [1, v, 0, 0]
    #   B2 ~ [1.65, -0.76, 7.39, 7.39]: entries <= 1.65 get score 0 -> s2 = [0, 0, w, 1]
    # each entry then has one scored model: the clipped value of that model
    out = run("pcb", [1.0] * 4, [[1 + x for x in t] for t in (T1, T2)], ratio=0.75)
    torch.testing.assert_close(out, torch.tensor([3.0, -1.0, -2.0, 4.0]))
    out = run(
        "pcb", [1.0] * 4, [[1 + x for x in t] for t in (T1, T2)], ratio=0.75, **{"lambda": 0.5}
    )
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0, -0.5, 2.5]))


def test_constant_rows_give_no_nan():
    out = run("pcb", [0.0] * 3, [[0.0] * 3, [0.0] * 3])
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_2d_tensor_is_flattened():
    flat = run("pcb", [0.0] * 4, [T1, T2], ratio=1.0)
    square = run(
        "pcb",
        torch.zeros(2, 2),
        [torch.tensor(T1).view(2, 2), torch.tensor(T2).view(2, 2)],
        ratio=1.0,
    )
    torch.testing.assert_close(square.reshape(-1), flat)


def test_ratio_zero_rejected():
    with pytest.raises(MergeValidationError, match="'ratio'"):
        run("pcb", [0.0], [[1.0]], ratio=0.0)
