"""Scale and min searches of ggml's reference K-quant and IQ4 quantizers, vectorised over blocks.

Each function takes a batch of sub-blocks x [B, n] (float32) and fits every sub-block at once. The per-element
arithmetic is ggml's (`ggml-quants.c`: make_qx_quants, make_q3_quants, make_qkx2_quants, quantize_row_iq4_nl_impl)
in the same operation order, and sums run left to right as C's loops do, so the results are llama.cpp's bit for bit.
All are weighted least-squares fits of a scale (and for the affine formats a min) to an integer or non-linear grid,
searched over a few grid stretches: this is what makes K-quants beat plain min/max rounding.

Internally x is transposed to [n, B] (element index first): a left-to-right sum is then n additions of contiguous
rows, and make_q3_quants' element-by-element refinement updates contiguous rows.
"""

from __future__ import annotations

import torch

from .bits import argmax_abs, best_index, f32, nearest_int, rdiv, seq_sum

GROUP_MAX_EPS = 1e-15  # ggml: a sub-block whose largest |x| is below this is all zeros


def _safe_div(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """num / den where `ok`, 0 elsewhere (the division never sees a zero denominator)."""
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous()


def _cols(t: torch.Tensor) -> torch.Tensor:
    # [1, B] -> [B, 1] by reshape: a transposed [1, B] counts as contiguous but keeps a last stride of B
    return t.reshape(-1, 1) if t.shape[0] == 1 else t.t().contiguous()


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric levels in [-nmax, nmax) with scale fitted under weights x^2 (rmse_type 1), stretch searched.

    Returns (scale [B, 1], levels + nmax [B, n] in [0, 2 nmax)); all-zero sub-blocks give scale 0, levels 0.
    """
    x = _rows(x)
    signed_max, amax = argmax_abs(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, 1.0, signed_max)
    w = x * x
    wx = w * x

    def fit(iscale):
        levels = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        return levels, seq_sum(wx * levels), seq_sum(w * levels * levels)

    levels, sumlx, suml2 = fit(rdiv(-nmax, safe_max))
    scale = _safe_div(sumlx, suml2, suml2 != 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, sumlx, suml2 = fit(rdiv(-f32(nmax + f32(f32(0.1) * step)), safe_max))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, _safe_div(sumlx, suml2, better), scale)
        best = torch.where(better, scale * sumlx, best)
    return _cols(torch.where(zero, 0.0, scale)), _cols(torch.where(zero, 0.0, levels + nmax))


def make_q3_quants(x: torch.Tensor, nmax: int, tries: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric levels in [-nmax, nmax) refined one element at a time (coordinate descent on the weighted error).

    Returns (scale [B, 1], levels + nmax [B, n]). An element moves to the level that is optimal with the others
    fixed, and the move is kept only if it lowers the weighted error; ggml stops a block after a pass with no moves,
    which needs no mask here because a pass over an unchanged block changes nothing.
    """
    x = _rows(x)
    signed_max, amax = argmax_abs(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    levels = nearest_int(rdiv(-nmax, torch.where(zero, 1.0, signed_max)) * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * levels)
    suml2 = seq_sum(w * levels * levels)
    for _ in range(tries):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            wi, xi, wxi, li = w[i : i + 1], x[i : i + 1], wx[i : i + 1], levels[i : i + 1]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            movable = slx > 0
            new = nearest_int(_safe_div(xi * sl2, slx, movable)).clamp(-nmax, nmax - 1)
            slx = slx + wxi * new
            sl2 = sl2 + wi * new * new
            accept = movable & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[i : i + 1] = torch.where(accept, new, li)
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
            changed |= accept
        if not changed.any():
            break
    scale = _safe_div(sumlx, suml2, suml2 > 0)
    return _cols(torch.where(zero, 0.0, scale)), _cols(torch.where(zero, 0.0, levels + nmax))


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine levels in [0, nmax]: x ~ scale * l - min, fitted by weighted least squares for nstep + 1 grid
    stretches (nmax + rmin + rdelta * i) and kept where the weighted error (squared, or absolute if use_mad) drops.

    Returns (scale [B, 1], min >= 0 [B, 1] to subtract, levels [B, n]).
    """
    x, weights = _rows(x), _rows(weights)
    lo = x.amin(0, keepdim=True).clamp(max=0)  # the min is only ever subtracted, so a positive block uses 0
    hi = x.amax(0, keepdim=True)
    flat = hi == lo
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)

    def error(scale, levels, offset):
        diff = scale * levels + offset - x
        return seq_sum(weights * (diff.abs() if use_mad else diff * diff))

    iscale = rdiv(nmax, torch.where(flat, 1.0, hi - lo))
    levels = nearest_int(iscale * (x - lo)).clamp(0, nmax)
    scale = rdiv(1.0, iscale)
    best = error(scale, levels, lo)
    offset = lo
    for step in range(nstep + 1):
        # ggml stretches the grid from the best min found so far, not from the block min: the search is greedy
        stretch = f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax)
        iscale = rdiv(stretch, torch.where(flat, 1.0, hi - offset))
        cand = nearest_int(iscale * (x - offset)).clamp(0, nmax)
        wl = weights * cand
        sum_l = seq_sum(wl)
        sum_l2 = seq_sum(wl * cand)
        sum_xl = seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        this_scale = _safe_div(sum_w * sum_xl - sum_x * sum_l, det, solvable)
        this_min = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, det, solvable)
        clipped = this_min > 0
        this_scale = torch.where(clipped, _safe_div(sum_xl, sum_l2, clipped & (sum_l2 != 0)), this_scale)
        this_min = torch.where(clipped, 0.0, this_min)
        err = error(this_scale, cand, this_min)
        better = solvable & (err < best)
        best = torch.where(better, err, best)
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, this_scale, scale)
        offset = torch.where(better, this_min, offset)
    scale = torch.where(flat, 0.0, scale)
    return _cols(scale), _cols(-torch.where(flat, lo, offset)), _cols(torch.where(flat, 0.0, levels))


def iq4_block_scales(x: torch.Tensor, values: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """Per-32 scale of ggml's IQ4 quantizer (quantize_row_iq4_nl_impl without an importance matrix).

    Weights x^2; starting from d = max / -values[0], 2 * ntry + 1 stretches of the non-linear grid are tried and the
    least-squares scale of the best one is kept. Returns d [B, 1] (0 for all-zero sub-blocks).
    """
    x = _rows(x)
    signed_max, amax = argmax_abs(x, dim=0)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, 1.0, signed_max)
    w = x * x
    v0 = float(values[0])

    def fit(inv_d):
        q = values[best_index(values, inv_d * x)]
        wq = w * q
        return seq_sum(wq * x), seq_sum(wq * q)

    d0 = -safe_max / v0 if ntry > 0 else safe_max / v0
    sumqx, sumq2 = fit(rdiv(1.0, d0))
    d = _safe_div(sumqx, sumq2, sumq2 > 0)
    best = d * sumqx
    for step in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit(rdiv(step + v0, safe_max))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, _safe_div(sumqx, sumq2, better), d)
        best = torch.where(better, d * sumqx, best)
    return _cols(torch.where(zero, 0.0, d))
