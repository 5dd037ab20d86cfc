"""SparseGPT on one matrix: exact sparsity, the numba and torch paths against each other and against the
published reference, reconstruction quality, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hessian_of, relative_error, solver_problem as problem
from reference_sparsegpt import reference_prune

from sparse_deploy.config import SolverConfig, SparsitySpec
from sparse_deploy.errors import ConfigError, InvalidInputError, SolverError
from sparse_deploy.pruning import magnitude, sparsify, wanda
from sparse_deploy.pruning.cpu_sweep import select_lowest
from sparse_deploy.pruning.solver import _select_lowest

NUMBA = SolverConfig(device="cpu", sweep="numba")
TORCH = SolverConfig(device="cpu", sweep="torch")
SPECS = [SparsitySpec.unstructured(0.5), SparsitySpec.unstructured(0.7), SparsitySpec.pattern("2:4"),
         SparsitySpec.pattern("4:8"), SparsitySpec.pattern("1:4")]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sparsity_is_exact(spec):
    W, _, H = problem(96, 264)
    result = sparsify(W, H, spec, NUMBA)
    assert torch.equal(result.mask, result.weight == 0)
    if spec.is_nm:
        groups = result.mask.reshape(96, -1, spec.m).sum(-1)
        assert bool((groups == spec.n).all()), "every aligned group of m must lose exactly n"
    else:
        assert abs(result.sparsity - spec.sparsity) <= 0.001


def test_zero_sparsity_leaves_weights_unchanged():
    W, _, H = problem(64, 200)
    result = sparsify(W, H, SparsitySpec.unstructured(0.0), NUMBA)
    assert not bool(result.mask.any())
    torch.testing.assert_close(result.weight, W, rtol=0, atol=0)
    assert float(result.loss.abs().max()) == 0.0


@pytest.mark.parametrize("rows,cols,blocksize", [(64, 128, 128), (130, 296, 128), (33, 200, 32), (257, 520, 64)])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_numba_sweep_equals_torch_sweep(rows, cols, blocksize, spec):
    W, _, H = problem(rows, cols, seed=rows)
    a = sparsify(W, H, spec, SolverConfig(device="cpu", sweep="numba", blocksize=blocksize, row_chunk=7))
    b = sparsify(W, H, spec, SolverConfig(device="cpu", sweep="torch", blocksize=blocksize))
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-5 * float(W.abs().max()))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=0)


def test_fixed_mask_is_used_and_both_paths_agree():
    W, _, H = problem(80, 256)
    mask = torch.rand(80, 256, generator=torch.Generator().manual_seed(3)) < 0.6
    a = sparsify(W, H, SparsitySpec.unstructured(0.5), NUMBA, mask=mask)
    b = sparsify(W, H, SparsitySpec.unstructured(0.5), TORCH, mask=mask)
    assert torch.equal(a.mask, mask) and torch.equal(b.mask, mask)
    assert bool((a.weight[mask] == 0).all())
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_matches_published_reference():
    """Same n:m mask and weights as the reference code; for unstructured, the same weights given its mask
    (its ``<=`` threshold can take one weight more per block, so the masks themselves may differ)."""
    W, _, H = problem(128, 384)
    ours = sparsify(W, H, SparsitySpec.pattern("2:4"), NUMBA)
    ref = reference_prune(W, H, 0.0, prunen=2, prunem=4)
    assert torch.equal(ours.mask, ref == 0)
    torch.testing.assert_close(ours.weight, ref, rtol=1e-4, atol=1e-5)
    ref = reference_prune(W, H, 0.5)
    ours = sparsify(W, H, SparsitySpec.unstructured(0.5), NUMBA, mask=ref == 0)
    torch.testing.assert_close(ours.weight, ref, rtol=1e-4, atol=1e-5)


def test_loss_is_the_exact_quadratic_error_under_the_damped_hessian():
    W, _, H = problem(64, 192)
    result = sparsify(W, H, SparsitySpec.unstructured(0.5), NUMBA)
    delta = (W - result.weight).double()
    damped = H.double() + result.damp * torch.eye(192, dtype=torch.float64)
    exact = ((delta @ damped) * delta).sum(1) / 2
    torch.testing.assert_close(result.loss.double(), exact, rtol=1e-3, atol=1e-6)


def least_squares_error(W: torch.Tensor, X: torch.Tensor, mask: torch.Tensor) -> float:
    """The best reconstruction with the given mask: per row, least squares over the kept columns."""
    Xd, target = X.double(), (W.double() @ X.double().T)
    W_best = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        keep = ~mask[r]
        solution = torch.linalg.lstsq(Xd[:, keep], target[r].unsqueeze(1)).solution
        W_best[r, keep] = solution.squeeze(1)
    return relative_error(W.double(), W_best, Xd)


@pytest.mark.parametrize("spec", [SparsitySpec.unstructured(0.5), SparsitySpec.pattern("2:4")], ids=str)
def test_sparsegpt_beats_baselines_and_not_the_least_squares_optimum(spec):
    W, X, H = problem(48, 160, n=4096)
    result = sparsify(W, H, spec, NUMBA)
    ours = relative_error(W, result.weight, X)
    assert ours < 0.8 * relative_error(W, magnitude(W, H, spec).weight, X)
    assert ours < 0.8 * relative_error(W, wanda(W, H, spec).weight, X)
    optimum = least_squares_error(W, X, result.mask)
    assert optimum <= ours * (1 + 1e-6)
    assert ours < 1.5 * optimum, "the OBS updates should land close to the optimum for their mask"


@pytest.mark.parametrize("sweep", ["numba", "torch"])
def test_dead_inputs_zero_their_column(sweep):
    W, X, _ = problem(40, 128)
    X[:, [3, 50, 51]] = 0.0
    H = hessian_of(X)
    result = sparsify(W, H, SparsitySpec.pattern("2:4"), SolverConfig(device="cpu", sweep=sweep))
    assert bool(torch.isfinite(result.weight).all())
    assert bool((result.weight[:, [3, 50, 51]] == 0).all())
    assert bool((result.mask.reshape(40, -1, 4).sum(-1) == 2).all())


def test_inputs_are_not_modified_and_dtype_is_kept():
    W, _, H = problem(32, 128)
    W16, H0 = W.half(), H.clone()
    W0 = W16.clone()
    result = sparsify(W16, H, SparsitySpec.unstructured(0.5), NUMBA)
    assert torch.equal(W16, W0) and torch.equal(H, H0)
    assert result.weight.dtype == torch.float16 and result.mask.dtype == torch.bool
    assert bool((result.weight[result.mask] == 0).all())


def test_indefinite_hessian_is_damped_more_or_named_in_the_error():
    W = torch.randn(4, 2)
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(SolverError, match=r"layers\.0\.fc1.*--percdamp"):
        sparsify(W, H, SparsitySpec.unstructured(0.5), SolverConfig(damp_retries=0), name="layers.0.fc1")
    result = sparsify(W, H, SparsitySpec.unstructured(0.5), SolverConfig(damp_retries=4))
    assert result.damp >= 1.0 and bool(torch.isfinite(result.weight).all())  # needs λ >= 1


@pytest.mark.parametrize(
    "W,H,match",
    [
        (torch.randn(4, 8), torch.eye(6), "does not match"),
        (torch.randn(4, 8, 2), torch.eye(8), "2-D"),
        (torch.tensor([[1.0, float("nan")]]), torch.eye(2), "NaN or inf"),
        (torch.tensor([[1.0, float("inf")]]), torch.eye(2), "NaN or inf"),
        (torch.randn(2, 2), torch.tensor([[1.0, 0.0], [0.0, float("nan")]]), "NaN or inf"),
        (torch.randn(2, 6), torch.eye(6), "multiple of m=4"),
    ],
)
def test_bad_input_raises_clear_errors(W, H, match):
    spec = SparsitySpec.pattern("2:4") if "m=4" in match else SparsitySpec.unstructured(0.5)
    with pytest.raises(InvalidInputError, match=match):
        sparsify(W, H, spec)


def test_bad_settings_raise_config_errors():
    W, _, H = problem(8, 64)
    with pytest.raises(ConfigError, match="multiple of m=8"):
        sparsify(W, H, SparsitySpec.pattern("4:8"), SolverConfig(blocksize=12))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            sparsify(W, H, SparsitySpec.unstructured(0.5), SolverConfig(device="cuda"))
    with pytest.raises(InvalidInputError, match="mask shape"):
        sparsify(W, H, SparsitySpec.unstructured(0.5), mask=torch.zeros(8, 63, dtype=torch.bool))


def test_numba_selection_equals_torch_selection_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(60):
        rows, cols = int(rng.integers(1, 40)), int(rng.integers(1, 50))
        W = rng.standard_normal((rows, cols)).astype(np.float32)
        if trial % 2:
            W = np.round(W).astype(np.float32)  # many equal scores, zeros among them
        d = (rng.random(cols) + 0.5).astype(np.float32)
        k = int(rng.integers(0, W.size + 1))
        mask = np.zeros_like(W, dtype=bool)
        select_lowest(W, d, k, mask, np.empty(W.size, dtype=np.float32))
        expected = _select_lowest(torch.from_numpy((W * W) / (d * d)), k).numpy()
        assert mask.sum() == k and (mask == expected).all()


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [SparsitySpec.unstructured(0.5), SparsitySpec.pattern("2:4")], ids=str)
def test_cuda_path_equals_cpu_path(spec):
    W, _, H = problem(512, 1024)
    cpu = sparsify(W, H, spec, NUMBA)
    gpu = sparsify(W.cuda(), H.cuda(), spec, SolverConfig(device="cuda"))
    assert gpu.weight.is_cuda
    agree = float((gpu.mask.cpu() == cpu.mask).float().mean())
    assert agree > 0.999, "CUDA GEMMs round differently, so near-ties may flip; nearly all must agree"
    rows_same = (gpu.mask.cpu() == cpu.mask).all(1)
    torch.testing.assert_close(gpu.weight.cpu()[rows_same], cpu.weight[rows_same], rtol=1e-3, atol=1e-4)


def test_overwrite_h_damps_the_callers_hessian_in_place_and_gives_the_same_result():
    W, _, H = problem(64, 128)
    kept = H.clone()
    plain = sparsify(W, H, SparsitySpec.unstructured(0.5), NUMBA)
    assert torch.equal(H, kept)  # inputs are not modified by default
    in_place = sparsify(W, H, SparsitySpec.unstructured(0.5), NUMBA, overwrite_h=True)
    assert torch.equal(plain.weight, in_place.weight) and torch.equal(plain.mask, in_place.mask)
    assert not torch.equal(H, kept)  # no copy was made: the damping went into H
