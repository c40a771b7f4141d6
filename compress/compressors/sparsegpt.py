"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update its remaining weights so its
outputs on the calibration inputs change as little as possible.

Optimal Brain Surgeon, column by column: with ``H = X X^T`` (plus ``damp`` times its mean
diagonal) and ``U`` the upper Cholesky factor of ``H^-1``, the columns are visited left to
right in blocks of ``blocksize``. At the start of a block the mask of that block is chosen by
the OBS saliency ``w^2 / U_jj^2`` (lowest first, over the whole block), or for N:M per group of
M columns when the group starts; each pruned weight's error ``(w - 0) / U_jj`` is then
propagated to the not yet visited columns through row ``j`` of ``U``, first inside the block,
then, once per block, onto every later column. Follows the authors' reference
``SparseGPT.fasterprune``; counts are exact per layer (see :mod:`compress.compressors.masks`).
"""

from __future__ import annotations

import torch

from compress.compressors.masks import lowest, n_of_m, running_count


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; inputs never seen
    (zero diagonal) get a diagonal of 1 so the factorization exists."""
    H = H.to(torch.float32).clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += damp * float(diag.mean())
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The pruned and updated float32 weight (out, in) of ``weight`` given ``H = sum x x^T``.

    Unstructured: exactly ``round(sparsity * out * in)`` zeros. ``pattern=(n, m)``: exactly
    ``n`` nonzeros in every ``m`` consecutive columns of each row.
    """
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    U = inverse_hessian_factor(H, damp)
    if pattern is not None:  # a block holds whole groups of M columns
        blocksize = max(pattern[1], blocksize - blocksize % pattern[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)  # (b,)
        Err1 = torch.zeros_like(W1)
        if pattern is None:
            k = running_count(sparsity, rows * i2) - running_count(sparsity, rows * i1)
            mask1 = lowest(W1**2 / d.unsqueeze(0) ** 2, k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                m = pattern[1]
                group = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                mask1[:, i : i + m] = n_of_m(group, pattern[0], m)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W
