"""GPTQ baseline (Frantar et al., 2022): full Hessian, Cholesky inverse, column-by-column
error propagation, asymmetric group-wise min/max parameters taken when a group starts
(``static_groups=False``), integer zero point, no act-order. Used for comparison only."""

from __future__ import annotations

import torch

from .solver import GroupQuant, minmax_params, round_codes


def gptq(weight: torch.Tensor, H: torch.Tensor, nbits: int, group_size: int,
         damping: float = 0.01, block_size: int = 128) -> GroupQuant:
    """Quantize ``weight`` (out, k) with Gram matrix ``H`` (k, k) = sum_n x_n x_n^T.

    ``k`` must be a multiple of ``group_size`` (pad first). Returns codes of shape
    (out, k // group_size, group_size) and (out, groups) scale/zero."""
    W = weight.clone().float()
    H = H.clone().float()
    out, k = W.shape
    if k % group_size:
        raise ValueError(f"in_features {k} must be a multiple of group_size {group_size}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damping * torch.mean(torch.diag(H)))
    Hinv = _cholesky_inverse_upper(H)

    groups = k // group_size
    codes = torch.zeros(out, k, dtype=torch.float32, device=W.device)
    scale = torch.zeros(out, groups, device=W.device)
    zero = torch.zeros(out, groups, device=W.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1 = W[:, b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                g = col // group_size
                grp = torch.cat([W1[:, i:], W[:, b1:]], dim=1)[:, :group_size]
                s, z = minmax_params(grp.unsqueeze(1), nbits, integer_zero=True)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            g = col // group_size
            w = W1[:, i]
            q = round_codes(w.view(-1, 1, 1), scale[:, g:g + 1], zero[:, g:g + 1], nbits).view(-1)
            codes[:, col] = q
            wq = (q - zero[:, g]) * scale[:, g]
            d = Hinv1[i, i]
            err = (w - wq) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return GroupQuant(codes.view(out, groups, group_size).to(torch.uint8), scale, zero)


def _cholesky_inverse_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, retrying with more damping if H is not positive definite."""
    damp = 0.0
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + damp * torch.eye(H.shape[0], device=H.device) * torch.mean(torch.diag(H)))
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except RuntimeError:
            damp = 0.01 if damp == 0 else damp * 10
    raise RuntimeError("GPTQ: Hessian is not positive definite even after extra damping")
