import torch
from merge_test_util import run

from splice.merge.methods.emr import agree_masks, elect_sign, unified_vector

T1 = [2.0, -1.0, 0.0, 3.0]
T2 = [-1.0, -2.0, 1.0, 0.0]
T3 = [1.0, 0.5, -1.0, 0.0]
# sum [2, -2.5, 0, 3] -> elected sign [+1, -1, -1 (a zero sum elects -1), +1]
# M1 = T1*s > 0: [T,T,F,T];  M2: [F,T,F,F];  M3: [T,F,T,F]
# max agreeing |tau|: [max(2,1), max(1,2), 1, 3] -> tau_uni = [2, -2, -1, 3]


def test_parts():
    deltas = [torch.tensor(t) for t in (T1, T2, T3)]
    sign = elect_sign(deltas)
    assert sign.tolist() == [1.0, -1.0, -1.0, 1.0]
    masks = agree_masks(deltas, sign)
    assert all(m.dtype == torch.bool for m in masks)
    assert [m.tolist() for m in masks] == [
        [True, True, False, True],
        [False, True, False, False],
        [True, False, True, False],
    ]
    assert unified_vector(deltas, sign, masks).tolist() == [2.0, -2.0, -1.0, 3.0]


def test_merge_is_base_plus_unified_vector():
    base = [1.0, 1.0, 1.0, 1.0]
    out = run("emr", base, [[1 + x for x in t] for t in (T1, T2, T3)])
    torch.testing.assert_close(out, torch.tensor([3.0, -1.0, 0.0, 4.0]))


def test_zero_sum_elects_minus_and_no_agreement_gives_zero():
    # sum 0 elects -1: only the model with -1 agrees, tau_uni = -1 (a +1 election gives +1)
    torch.testing.assert_close(run("emr", [0.0], [[1.0], [-1.0]]), torch.tensor([-1.0]))
    # all task vectors 0: no task agrees, tau_uni = 0
    torch.testing.assert_close(run("emr", [0.0], [[0.0], [0.0]]), torch.tensor([0.0]))
