"""SparseGPT on one weight matrix (Frantar & Alistarh 2023, section 3).

Pure functions over tensors: ``sparsify(W, H, spec) -> PruneResult``. The math runs on the CPU or on CUDA;
the column sweep inside a block is either torch (the reference, and the CUDA path) or the numba kernel in
``cpu_sweep.py``. Both compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sparse_deploy.config import QuantSpec, SolverConfig, SparsitySpec, check_blocking
from sparse_deploy.errors import ConfigError, InvalidInputError, SolverError
from sparse_deploy.machine import resolve_device
from sparse_deploy.pruning.masks import choose_nm
from sparse_deploy.pruning.quant import group_params, sweep_quant_torch


@dataclass(frozen=True)
class PruneResult:
    """Outcome of pruning one matrix.

    ``weight``: [rows, cols] in the input's dtype and device, pruned entries exactly 0.
    ``mask``: [rows, cols] bool, True where a weight was pruned.
    ``loss``: [rows] float32, the reconstruction loss ½·ΔwᵢHΔwᵢᵀ of each row (H as damped by the solver).
    ``damp``: the damping λ that was added to diag(H) (0 for methods that do not invert H).
    ``scales``, ``zero_points``: with joint quantization, [rows, groups] float32 (groups = 1 per output channel
    for int8); every kept weight is (q - zero point)·scale for an integer q in the grid's range. Else None.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor
    damp: float = 0.0
    scales: torch.Tensor | None = None
    zero_points: torch.Tensor | None = None

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean())


def check_problem(
    W: torch.Tensor, H: torch.Tensor | None, spec: SparsitySpec, mask: torch.Tensor | None, name: str
) -> None:
    """Raise InvalidInputError / ConfigError for anything the solvers cannot take."""
    if W.dim() != 2:
        raise InvalidInputError(f"{name}: weight must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if rows == 0 or cols == 0:
        raise InvalidInputError(f"{name}: weight is empty, shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise InvalidInputError(f"{name}: weight must be floating point, got {W.dtype}")
    if not _all_finite(W):
        raise InvalidInputError(f"{name}: weight contains NaN or inf; the checkpoint is damaged")
    if H is not None:
        if tuple(H.shape) != (cols, cols):
            raise InvalidInputError(
                f"{name}: Hessian shape {tuple(H.shape)} does not match weight shape {tuple(W.shape)}; "
                f"expected ({cols}, {cols})"
            )
        if not _all_finite(H):
            raise InvalidInputError(f"{name}: Hessian contains NaN or inf; the calibration inputs overflowed")
    if mask is not None and tuple(mask.shape) != (rows, cols):
        raise InvalidInputError(f"{name}: mask shape {tuple(mask.shape)} does not match weight {tuple(W.shape)}")
    if spec.is_nm and cols % spec.m:  # type: ignore[operator]
        raise InvalidInputError(f"{name}: {cols} input columns are not a multiple of m={spec.m} for pattern {spec}")


def _upper_inverse_factor(A: torch.Tensor, leaf: int = 512) -> torch.Tensor | None:
    """Upper-triangular U with UᵀU = A⁻¹ for SPD A [n, n], or None if A is not positive definite.

    Write A = VVᵀ with V upper triangular; then U = V⁻¹. Recursively, with A = [[A11, A12], [A21, A22]]:
    U22 = factor(A22), V12 = A12·U22ᵀ, U11 = factor(A11 - V12·V12ᵀ) and U12 = -U11·V12·U22. Everything above the
    leaves is GEMM (~2n³/3 multiply-adds), and no n x n copy is made; a leaf is the Cholesky factorisation of
    the reversed block (PAP = LLᵀ gives U = PL⁻¹P).
    """
    n = A.shape[0]
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(A.flip(0, 1))
        if int(info):
            return None
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1).triu_()
    k = n - n // 2
    u22 = _upper_inverse_factor(A[k:, k:], leaf)
    if u22 is None:
        return None
    v12 = _upper_times(u22, A[:k, k:].T).T  # A12·U22ᵀ, [k, n-k]
    u11 = _upper_inverse_factor(A[:k, :k] - v12 @ v12.T, leaf)  # Schur complement
    if u11 is None:
        return None
    out = torch.zeros_like(A)
    out[:k, :k] = u11
    out[k:, k:] = u22
    out[:k, k:] = _upper_times(u11, _times_upper(v12, u22)).neg_()  # -U11·V12·U22
    return out


def _upper_times(T: torch.Tensor, X: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """T·X for upper-triangular T [n, n], X [n, k], skipping T's zero half (half the multiply-adds).

    [[T11, T12], [0, T22]]·[X1; X2] = [T11·X1 + T12·X2; T22·X2].
    """
    n = T.shape[0]
    if n <= leaf:
        return T @ X
    h = n // 2
    out = torch.empty((n, X.shape[1]), dtype=X.dtype, device=X.device)
    out[:h] = _upper_times(T[:h, :h], X[:h], leaf)
    out[:h].addmm_(T[:h, h:], X[h:])
    out[h:] = _upper_times(T[h:, h:], X[h:], leaf)
    return out


def _times_upper(X: torch.Tensor, T: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """X·T for X [k, n] and upper-triangular T [n, n]: [X1, X2]·T = [X1·T11, X1·T12 + X2·T22]."""
    n = T.shape[0]
    if n <= leaf:
        return X @ T
    h = n // 2
    out = torch.empty((X.shape[0], n), dtype=X.dtype, device=X.device)
    out[:, :h] = _times_upper(X[:, :h], T[:h, :h], leaf)
    out[:, h:] = _times_upper(X[:, h:], T[h:, h:], leaf)
    out[:, h:].addmm_(X[:, :h], T[:h, h:])
    return out


def inverse_hessian_factor(
    H: torch.Tensor, percdamp: float, retries: int, name: str = "weight"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, and λ (section 3: the sweep reads its rows).

    λ = percdamp·mean(diag H). H is damped in place (pass a copy). A failed factorisation is retried with 10x
    the damping, ``retries`` times, then raises SolverError.
    """
    cols = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    damp = percdamp * mean_diag
    H.diagonal().add_(damp)
    for _ in range(retries + 1):
        U = _upper_inverse_factor(H)
        if U is not None and _all_finite(U):
            return U, damp
        raised = damp * 10 if damp > 0 else 1e-3 * mean_diag
        H.diagonal().add_(raised - damp)
        damp = raised
    raise SolverError(
        f"{name}: the Hessian ({cols}x{cols}) is not positive definite even with damping {damp / 10:.3g} "
        f"after {retries} retries; raise --percdamp (now {percdamp}) or calibrate on more samples"
    )


def _all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or inf (min and max propagate NaN; no temporary the size of x)."""
    return bool(torch.isfinite(x.amin())) and bool(torch.isfinite(x.amax()))


def _select_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of ``scores`` over the whole tensor, ties to the lower flat index."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    mask = flat < threshold
    ties = k - int(mask.sum())
    if ties > 0:
        mask[torch.nonzero(flat == threshold).flatten()[:ties]] = True
    return mask.view(scores.shape)


def _sweep_torch(
    W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor, n: int, m: int, err: torch.Tensor, loss: torch.Tensor
) -> None:
    """Column-by-column OBS update inside one block, in place (the reference code's structure).

    W1 [rows, B] becomes the pruned block Q1; err [rows, B] receives (w - q)/[U]_ii; loss [rows] accumulates.
    With n > 0, the n:m mask is chosen when the sweep reaches each group of m columns (section 3, "adaptive").
    """
    diag = U1.diagonal()
    for i in range(W1.shape[1]):
        if n and i % m == 0:
            choose_nm(W1, diag, mask1, i, n, m)
        w = W1[:, i].clone()
        q = torch.where(mask1[:, i], torch.zeros_like(w), w)
        d = U1[i, i]
        e = (w - q) / d  # [rows]
        loss += (e * e) / 2
        W1[:, i:] -= torch.outer(e, U1[i, i:])  # OBS update of the remaining block columns
        W1[:, i] = q
        err[:, i] = e


def sparsify(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: SparsitySpec,
    config: SolverConfig = SolverConfig(),
    *,
    mask: torch.Tensor | None = None,
    name: str = "weight",
    quant: QuantSpec | None = None,
    overwrite_h: bool = False,
) -> PruneResult:
    """Prune W [rows, cols] (torch layout out x in) given its input Hessian H [cols, cols].

    ``mask`` (optional, [rows, cols] bool, True = prune) fixes the mask instead of choosing it.
    ``quant`` (optional): also round every kept weight to this grid inside the sweep (section 3.5); with
    sparsity 0 this is GPTQ. Inputs are not modified, except H with ``overwrite_h`` (damped in place: a caller
    that is done with H saves a copy of it, 0.5 GB for an 11008-wide layer).
    """
    check_problem(W, H, spec, mask, name)
    device = resolve_device(config.device)
    sweep = config.sweep if config.sweep != "auto" else ("numba" if device.type == "cpu" else "torch")
    if sweep == "numba" and device.type != "cpu":
        raise ConfigError("the numba sweep runs on the CPU only; use sweep='torch' with device='cuda'")
    n, m = (spec.n, spec.m) if spec.is_nm else (0, 1)
    blocksize = config.blocksize
    check_blocking(blocksize, spec)

    rows, cols = W.shape
    if quant is not None:
        gs = quant.group_for(cols)
        check_blocking(blocksize, spec, gs if gs < cols else None)
        scales = torch.zeros((rows, -(-cols // gs)), dtype=torch.float32, device=device)
        zeros = torch.zeros_like(scales)
        in_sweep = gs < blocksize  # groups inside a block get their scales in the sweep; others at block start
    Wf = W.detach().to(device=device, dtype=torch.float32, copy=True)
    Hd = H.detach().to(device=device, copy=not overwrite_h)
    if not Hd.is_floating_point() or Hd.dtype in (torch.float16, torch.bfloat16):
        Hd = Hd.float()
    dead = Hd.diagonal() == 0  # inputs that never fire: weight column zeroed, H_jj = 1
    Hd.diagonal()[dead] = 1.0
    Wf[:, dead] = 0.0

    U, damp = inverse_hessian_factor(Hd, config.percdamp, config.damp_retries, name)
    U = U.float()
    del Hd

    fixed = None if mask is None else mask.to(device=device, dtype=torch.bool)
    full_mask = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    loss = torch.zeros(rows, dtype=torch.float32, device=device)
    if sweep == "numba":
        from sparse_deploy.pruning import cpu_sweep

        scratch = np.empty(rows * min(blocksize, cols), dtype=np.float32)  # the mask selection's scores

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wf[:, i1:i2].contiguous()  # [rows, B]
        U1 = U[i1:i2, i1:i2].contiguous()  # [B, B]
        if fixed is not None:
            mask1 = fixed[:, i1:i2].contiguous()
        elif n:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # filled group by group in the sweep
        else:  # unstructured: the lowest w²/[H⁻¹]_jj² over the block, exact count so the matrix hits the target
            k = _round(spec.sparsity * rows * i2) - _round(spec.sparsity * rows * i1)  # type: ignore[operator]
            d = U1.diagonal()
            if sweep == "numba":
                mask1 = torch.empty_like(W1, dtype=torch.bool)
                cpu_sweep.select_lowest(W1.numpy(), d.contiguous().numpy(), k, mask1.numpy(), scratch)
            else:
                mask1 = _select_lowest((W1 * W1) / (d * d)[None, :], k)  # w²/[H⁻¹]_jj², [rows, B]
        err = torch.zeros_like(W1)  # (w - q)/[U]_ii per column, [rows, B]
        if quant is not None:
            _sweep_quant_block(W1, U1, mask1, n, m, err, loss, Wf, scales, zeros, i1, i2, gs, in_sweep, quant,
                               sweep, config.row_chunk)
        elif sweep == "numba":
            cpu_sweep.sweep_block(
                W1.numpy(), U1.numpy(), mask1.numpy(), n, m, config.row_chunk, err.numpy(), loss.numpy()
            )
        else:
            _sweep_torch(W1, U1, mask1, n, m, err, loss)
        Wf[:, i1:i2] = W1
        full_mask[:, i1:i2] = mask1
        if i2 < cols:  # lazy batch update of all columns right of the block: W -= Err·U[block, right]
            Wf[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)

    return PruneResult(
        weight=Wf.to(device=W.device, dtype=W.dtype),
        mask=full_mask.to(W.device),
        loss=loss.to(W.device),
        damp=damp,
        scales=None if quant is None else scales.to(W.device),
        zero_points=None if quant is None or quant.symmetric else zeros.to(W.device),
    )


def _sweep_quant_block(W1, U1, mask1, n, m, err, loss, Wf, scales, zeros, i1, i2, gs, in_sweep, quant, sweep,
                       row_chunk) -> None:
    """One block of the joint sweep. A group that starts at the block's first column and reaches past it gets
    its scale here, from the weights as updated so far (all earlier blocks' updates are applied); groups inside
    the block get theirs in the sweep."""
    if in_sweep:  # blocksize % gs == 0: the block holds whole groups (the last one maybe cut by cols)
        g0, g1, qgroup = i1 // gs, -(-i2 // gs), gs
        s1 = torch.zeros((W1.shape[0], g1 - g0), dtype=torch.float32, device=W1.device)
        z1 = torch.zeros_like(s1)
    else:  # gs % blocksize == 0, or one group per row: the block lies inside one group
        g0, g1, qgroup = i1 // gs, i1 // gs + 1, 0
        if i1 % gs == 0:
            scales[:, g0], zeros[:, g0] = group_params(Wf[:, i1 : i1 + gs], quant)
        s1 = scales[:, g0:g1].contiguous()
        z1 = zeros[:, g0:g1].contiguous()
    if sweep == "numba":
        from sparse_deploy.pruning import cpu_sweep

        lo, hi = quant.qrange
        cpu_sweep.sweep_block_quant(W1.numpy(), U1.numpy(), mask1.numpy(), n, m, row_chunk, err.numpy(),
                                    loss.numpy(), s1.numpy(), z1.numpy(), qgroup, quant.bits, quant.symmetric,
                                    np.float32(lo), np.float32(hi))
    else:
        sweep_quant_torch(W1, U1, mask1, n, m, err, loss, s1, z1, qgroup, quant)
    scales[:, g0:g1] = s1
    zeros[:, g0:g1] = z1


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))
