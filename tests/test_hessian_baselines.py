import pytest
import torch
from conftest import correlated_inputs, hessian_of

from sparse_deploy.config import SparsitySpec
from sparse_deploy.errors import InvalidInputError
from sparse_deploy.pruning import HessianAccumulator, magnitude, wanda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_hessian_is_the_mean_over_all_rows(dtype):
    X = correlated_inputs(700, 48)
    acc = HessianAccumulator(48, dtype=dtype)
    for chunk in (X[:100], X[100:101], X[101:401].reshape(3, 100, 48), X[401:]):
        acc.add(chunk)
    assert acc.nsamples == 700 and acc.H.dtype == dtype
    torch.testing.assert_close(acc.H, hessian_of(X.to(dtype)), rtol=1e-5, atol=1e-4)


def test_hessian_rejects_wrong_width_and_dtype():
    with pytest.raises(InvalidInputError, match="expects 8"):
        HessianAccumulator(8).add(torch.randn(3, 9))
    with pytest.raises(InvalidInputError, match="float32 or float64"):
        HessianAccumulator(8, dtype=torch.float16)


@pytest.mark.parametrize("per_row", [False, True])
def test_magnitude_prunes_the_smallest(per_row):
    W = torch.randn(20, 50)
    result = magnitude(W, None, SparsitySpec.unstructured(0.3), per_row=per_row)
    if per_row:
        assert bool((result.mask.sum(1) == 15).all())
        kept_min = W.abs().masked_fill(result.mask, float("inf")).amin(1)
        pruned_max = W.abs().masked_fill(~result.mask, -1).amax(1)
        assert bool((pruned_max <= kept_min).all())
    else:
        assert int(result.mask.sum()) == 300
        assert float(W.abs()[result.mask].max()) <= float(W.abs()[~result.mask].min())
    assert bool(torch.isnan(result.loss).all()), "no Hessian, no loss"


def test_wanda_weighs_by_input_norm_and_nm_is_exact():
    X = correlated_inputs(512, 64, outliers=0)
    X[:, 7] *= 100.0  # a feature so large that its weights must survive
    W, H = torch.randn(16, 64), hessian_of(X)
    result = wanda(W, H, SparsitySpec.unstructured(0.5))
    assert not bool(result.mask[:, 7].any())
    assert bool((result.mask.sum(1) == 32).all())
    nm = wanda(W, H, SparsitySpec.pattern("2:4"))
    assert bool((nm.mask.reshape(16, -1, 4).sum(-1) == 2).all())
    delta = W - nm.weight
    torch.testing.assert_close(nm.loss, ((delta @ H) * delta).sum(1) / 2)


def test_magnitude_nm_and_bad_input():
    W = torch.randn(8, 16)
    result = magnitude(W, None, SparsitySpec.pattern("2:4"))
    groups = W.abs().reshape(8, 4, 4)
    pruned = result.mask.reshape(8, 4, 4)
    assert bool((pruned.sum(-1) == 2).all())
    assert bool((groups.masked_fill(~pruned, -1).amax(-1) <= groups.masked_fill(pruned, 1e9).amin(-1)).all())
    with pytest.raises(InvalidInputError):
        magnitude(torch.tensor([[float("nan"), 1.0]]), None, SparsitySpec.unstructured(0.5))
