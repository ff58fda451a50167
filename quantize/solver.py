"""Per-group quantizers as pure tensor functions: DASH-Q and min/max round-to-nearest.

Shapes: ``w`` is (rows, groups, group_size) float32; ``h`` broadcasts against it, normally
(1, groups, group_size) because the diagonal Hessian h_j = sum_n x_nj^2 is per input channel.
Every function returns codes (uint8, same shape as ``w``) and per-group ``scale``/``zero``
(rows, groups), with ``w_hat = (codes - zero) * scale``.

DASH-Q (Kim et al., 2026) solves, independently per group,

    min_{s, z, q}  sum_j h_j (w_j - s (q_j - z))^2,   q_j in {0 .. 2^b - 1}

by coordinate descent: q by rounding for fixed (s, z) (optimal element-wise because the
objective is separable in q), then (s, z) by closed-form weighted linear regression of w on q
(w ~ a q + c with a = s, c = -s z). Each half-step cannot raise the objective; the best iterate
is kept anyway. Descent starts, per group, from the better of the exact min/max range (float
zero) and the RTN range (integer zero), so the result is never worse than RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuant:
    codes: torch.Tensor  # uint8, same shape as w
    scale: torch.Tensor  # (rows, groups) float32
    zero: torch.Tensor  # (rows, groups) float32, in the code domain
    iterations: int = 0

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-group objective sum_j h_j (w_j - w_hat_j)^2, shape (rows, groups)."""
    return (h * (w - w_hat) ** 2).sum(-1)


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, nbits: int) -> torch.Tensor:
    """Optimal codes for fixed (scale, zero): round to nearest level and clamp to the range."""
    q = torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    return q.clamp_(0, (1 << nbits) - 1)


def minmax_params(w: torch.Tensor, nbits: int, integer_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scale and zero per group (the RTN / GPTQ / DASH-Q initialisation).

    A constant group gets scale 1 and reproduces its value exactly. ``integer_zero`` rounds the
    zero point as GPTQ-style quantizers do."""
    maxq = (1 << nbits) - 1
    lo = w.amin(-1).clamp(max=0) if integer_zero else w.amin(-1)
    hi = w.amax(-1).clamp(min=0) if integer_zero else w.amax(-1)
    rng = hi - lo
    scale = torch.where(rng > 0, rng / maxq, torch.ones_like(rng))
    zero = -lo / scale
    if integer_zero:
        zero = torch.round(zero)
    return scale, zero


def rtn(w: torch.Tensor, nbits: int) -> GroupQuant:
    """Plain round-to-nearest with min/max range and an integer zero point."""
    scale, zero = minmax_params(w, nbits, integer_zero=True)
    return GroupQuant(round_codes(w, scale, zero, nbits).to(torch.uint8), scale, zero)


def damp_hessian_diag(h: torch.Tensor, damping: float) -> torch.Tensor:
    """h + damping * mean(h); an all-zero h (no calibration signal) becomes all ones."""
    h = h.float()
    mean = h.mean()
    if not torch.isfinite(mean) or float(mean) <= 0:
        return torch.ones_like(h)
    return h + damping * mean


def _moments(q: torch.Tensor, h: torch.Tensor, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group sums of the codes that the fit and the objective need: sum h q, sum h q^2, sum h w q."""
    hq = h * q
    return hq.sum(-1), (hq * q).sum(-1), (hw * q).sum(-1)


def _fit(sh, sw, sq, sqq, sqw, eps: float = 1e-12):
    det = sh * sqq - sq * sq
    ok = det > eps * sh * sh.clamp(min=eps)
    safe = torch.where(ok, det, torch.ones_like(det))
    a = (sh * sqw - sq * sw) / safe
    c = (sqq * sw - sq * sqw) / safe
    ok = ok & (a > 0) & torch.isfinite(a) & torch.isfinite(c)
    a_safe = torch.where(ok, a, torch.ones_like(a))
    return a_safe, -c / a_safe, ok


def weighted_fit(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form weighted least squares of w on q per group: w ~ s (q - z).

    Returns (scale, zero, ok); ``ok`` is False where the 2x2 system is singular (all codes equal)
    or the fitted slope is not positive, and the caller keeps its previous parameters there."""
    hw = h * w
    sq, sqq, sqw = _moments(q, h, hw)
    return _fit(h.expand_as(w).sum(-1), hw.sum(-1), sq, sqq, sqw)


def _objective_from_moments(sww, sw, sh, sq, sqq, sqw, s, z):
    """sum h (w - s (q - z))^2 expanded in the group sums (evaluated in float64)."""
    d = lambda t: t.double()  # noqa: E731
    s, z = d(s), d(z)
    return d(sww) - 2 * s * (d(sqw) - z * d(sw)) + s * s * (d(sqq) - 2 * z * d(sq) + z * z * d(sh))


def dashq(w: torch.Tensor, h: torch.Tensor, nbits: int, iters: int = 10, tol: float = 1e-4,
          storage_dtype: torch.dtype | None = torch.float16) -> GroupQuant:
    """DASH-Q coordinate descent on every group at once.

    ``h`` must be non-negative and already damped (see :func:`damp_hessian_diag`). Each iteration
    costs one rounding pass and three weighted sums over the weights; the objective of every
    iterate comes from those sums. ``storage_dtype``: scale/zero are rounded to it at the end (as
    the checkpoint stores them) and the codes rounded for the stored values."""
    out_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    # At 8 bits the errors are ~1e-5 of sum h w^2: float32 group sums would cancel badly.
    w = w.double() if nbits >= 8 or w.dtype == torch.float64 else w.float()
    h = h.to(w.dtype)
    hw = h * w
    sh = h.expand_as(w).sum(-1)
    sw = hw.sum(-1)
    sww = (hw * w).sum(-1)

    def objective(m, s, z):
        return _objective_from_moments(sww, sw, sh, *m, s, z)

    # Start, per group, from the better of the exact min/max range with a float zero (the
    # paper's) and the RTN range with an integer zero: descent from it is never worse than RTN.
    starts = []
    for integer_zero in (False, True):
        s0, z0 = minmax_params(w, nbits, integer_zero=integer_zero)
        starts.append((s0, z0, objective(_moments(round_codes(w, s0, z0, nbits), h, hw), s0, z0)))
    pick = starts[1][2] < starts[0][2]
    scale = torch.where(pick, starts[1][0], starts[0][0])
    zero = torch.where(pick, starts[1][1], starts[0][1])
    best_err = torch.where(pick, starts[1][2], starts[0][2])
    start_s, start_z = scale, zero
    best_s, best_z, prev = scale, zero, best_err
    done = 0
    for it in range(1, iters + 1):
        m = _moments(round_codes(w, scale, zero, nbits), h, hw)
        s_new, z_new, ok = _fit(sh, sw, *m)
        scale = torch.where(ok, s_new, scale)
        zero = torch.where(ok, z_new, zero)
        err = objective(m, scale, zero)  # >= the error after the next rounding
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scale, best_s)
        best_z = torch.where(better, zero, best_z)
        done = it
        rel = (prev - err).abs() / prev.abs().clamp(min=1e-30)
        if bool((rel <= tol).all()):
            break
        prev = err
    if storage_dtype is not None:
        rnd = lambda t: t.to(storage_dtype).to(w.dtype)  # noqa: E731
        best_s, best_z, start_s, start_z = rnd(best_s), rnd(best_z), rnd(start_s), rnd(start_z)
    codes = round_codes(w, best_s, best_z, nbits)
    # Guard, measured directly: where the start is still better (rounding of the stored values,
    # cancellation in the sums), keep the start.
    start_codes = round_codes(w, start_s, start_z, nbits)
    worse = _direct_error(w, h, codes, best_s, best_z) > _direct_error(w, h, start_codes, start_s, start_z)
    if bool(worse.any()):
        codes = torch.where(worse.unsqueeze(-1), start_codes, codes)
        best_s, best_z = torch.where(worse, start_s, best_s), torch.where(worse, start_z, best_z)
    return GroupQuant(codes.to(torch.uint8), best_s.to(out_dtype), best_z.to(out_dtype), done)


def _direct_error(w, h, q, s, z):
    return weighted_error(w, (q - z.unsqueeze(-1)) * s.unsqueeze(-1), h)


def group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padding in to a multiple of group_size."""
    out, k = weight.shape
    pad = (-k) % group_size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(out, -1, group_size)


def hessian_group_view(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """(in,) -> (1, groups, group_size); padded channels get weight 0 (they carry no signal)."""
    pad = (-h.numel()) % group_size
    if pad:
        h = torch.nn.functional.pad(h, (0, pad))
    return h.reshape(1, -1, group_size)
