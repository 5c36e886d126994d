import pytest
import torch
from merge_test_util import run

from splice.errors import MergeValidationError

BASE = [0.0, 0.0, 0.0, 0.0]
T1 = [1.0, 0.2, 3.0, -1.0]
T2 = [1.0, 0.2, -1.0, 1.0]
T3 = [0.0, 0.1, -1.0, 0.5]
# tau_MTL = [2, 0.5, 1, 0.5]
# lambda_tall 0.5: m_t = |tau_t| > 0.5 |tau_MTL - tau_t|
#   m1: |T1| [1,.2,3,1]  > .5*[1,.3,2,1.5] = [.5,.15,1,.75]  -> [T,T,T,T]
#   m2: |T2| [1,.2,1,1]  > .5*[1,.3,2,.5]  = [.5,.15,1,.25]  -> [T,T,F,T]  (1 > 1 is false)
#   m3: |T3| [0,.1,1,.5] > .5*[2,.4,2,0]   = [1,.2,1,0]      -> [F,F,F,T]
#   counts [2,2,1,3]


def merge(**params):
    return run("consensus", BASE, [T1, T2, T3], **{"lambda_tall": 0.5, **params})


def test_k2_keeps_entries_two_masks_agree_on():
    torch.testing.assert_close(merge(), torch.tensor([2.0, 0.5, 0.0, 0.5]))


def test_k_and_lambda():
    torch.testing.assert_close(merge(k=3), torch.tensor([0.0, 0.0, 0.0, 0.5]))
    # k = 0 is task arithmetic
    torch.testing.assert_close(merge(k=0), torch.tensor([2.0, 0.5, 1.0, 0.5]))
    torch.testing.assert_close(merge(k=4), torch.zeros(4))
    torch.testing.assert_close(merge(**{"lambda": 0.5}), torch.tensor([1.0, 0.25, 0.0, 0.25]))


def test_per_model_lambda_tall():
    # lambda_tall 0 for model 3: m3 = |T3| > 0 -> [F,T,T,T]; counts [2,3,2,3]: all kept
    out = merge(lambda_tall=[0.5, 0.5, 0.0])
    torch.testing.assert_close(out, torch.tensor([2.0, 0.5, 1.0, 0.5]))


def test_base_is_added():
    base = [1.0, -1.0, 0.0, 2.0]
    out = run(
        "consensus", base, [[b + t for b, t in zip(base, x)] for x in (T1, T2, T3)], lambda_tall=0.5
    )
    torch.testing.assert_close(out, torch.tensor([3.0, -0.5, 0.0, 2.5]))


def test_negative_k_rejected():
    with pytest.raises(MergeValidationError, match="'k'"):
        merge(k=-1)
