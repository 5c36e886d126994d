import torch
from merge_test_util import MERGEKIT, run

BASE = [1.0, 1.0, 1.0]
T1 = [2.0, 0.0, 1.0]  # delta [1, -1, 0]
T2 = [1.0, 3.0, 5.0]  # delta [0, 2, 4]


def test_weighted_sum_scaled_by_lambda():
    out = run("task_arithmetic", BASE, [T1, T2], weight=[0.5, 1.0], **{"lambda": 2.0})
    # 0.5*[1,-1,0] + [0,2,4] = [0.5,1.5,4]; *2 = [1,3,8]; + 1
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0, 9.0]))


def test_normalize_divides_by_weight_sum():
    out = run(
        "task_arithmetic", BASE, [T1, T2], weight=[0.5, 1.0], normalize=True, **{"lambda": 2.0}
    )
    # [0.5,1.5,4] / 1.5 * 2 + 1
    torch.testing.assert_close(out, torch.tensor([5 / 3, 3.0, 19 / 3]))


def test_zero_weight_sum_is_not_divided():
    out = run("task_arithmetic", BASE, [T1, T2], weight=[1.0, -1.0], normalize=True)
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, -3.0]))


def test_defaults_same_in_both_dialects():
    out = run("task_arithmetic", BASE, [T1, T2], ctx=MERGEKIT)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 5.0]))
