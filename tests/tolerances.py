"""One tolerance table for every float comparison, and the comparison helpers that report where things went wrong.

Exact results (packing, quantization, dequantization) use `assert_equal`, never a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# torch.testing's defaults per dtype: one rounding of the output dtype relative, plus a small absolute floor for values
# near zero. A test that needs more (a long reduction in a low-precision type) passes its own and says why.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-5, rtol=1.3e-6),
    torch.float16: Tolerance(atol=1e-5, rtol=1e-3),
    torch.bfloat16: Tolerance(atol=1e-5, rtol=1.6e-2),
}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (floats) or an unlikely sentinel (ints) so unwritten elements fail."""
    return t.fill_(float("nan") if t.is_floating_point() else -77)


def _where(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> str:
    idx = mask.nonzero()[:limit]
    return ", ".join(f"{tuple(i.tolist())}: {actual[tuple(i)].item()!r} vs {expected[tuple(i)].item()!r}" for i in idx)


def dot_magnitude(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |w|.T in float64: the scale of a dot product's rounding error, which is bounded by
    (a few roundings) * sum_k |x_k w_k|, not by |result| (the result may cancel to ~0)."""
    return x.double().abs() @ w.double().abs().t()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float | None = None,
                 rtol: float | None = None, dtype: torch.dtype | None = None, magnitude: torch.Tensor | None = None,
                 what: str = "") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise (NaN only where expected is NaN).

    Tolerances come from TOLERANCES[dtype or actual.dtype] unless given. For results of reductions pass
    `magnitude` (e.g. `dot_magnitude(x, w)`): the relative term is then rtol * magnitude, the standard forward error
    bound of a sum. On failure the message says how many elements mismatched, the largest absolute and relative
    error with their index, and the first few mismatches.
    """
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    tol = TOLERANCES[dtype or actual.dtype]
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).abs()
    scale = e.abs() if magnitude is None else magnitude.detach().to(torch.float64).cpu()
    bad = ~(err <= atol + rtol * scale)
    bad &= ~(a.isnan() & e.isnan())
    if not bad.any():
        return
    err = torch.where(err.isnan(), torch.inf, err)
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    rel = err / e.abs().clamp_min(1e-30)
    worst_rel = tuple(int(i) for i in torch.unravel_index(rel.argmax(), rel.shape))
    raise AssertionError(
        f"{what} {int(bad.sum())} of {bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g}; "
        f"max abs error {err[worst].item():.4g} at {worst}, max rel error {rel[worst_rel].item():.4g} at {worst_rel}; "
        f"first mismatches: {_where(bad, a, e)}"
    )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (floats compared as their bit patterns, so -0.0 != 0.0 and NaNs must match exactly)."""
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what} dtype {actual.dtype} != expected {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(bits), e.view(bits)
    bad = a != e
    if bad.any():
        first = _where(bad, actual.cpu(), expected.cpu())
        raise AssertionError(f"{what} {int(bad.sum())} of {bad.numel()} elements differ; first: {first}")


# Largest KL divergence (nats, per position) allowed between two computations of one model's next-token distribution
# in a dtype: float32 reorderings (chunked vs whole prefill, another attention kernel) move logits by ~1e-4 and KL by
# ~1e-10; a real error (a wrong rope layout, a missing norm) moves it by >0.1.
# float16: the torch backend in float16 on CPU against float32 measured a KL of at most 4.8e-5 (mean 1.7e-5) over the
# 73 positions of test_model.PARAGRAPH on SmolLM2, with every argmax equal; 5e-4 leaves 10x for other kernels' orders.
MODEL_KL: dict[torch.dtype, float] = {torch.float32: 1e-6, torch.float16: 5e-4}


def kl_per_position(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in float64 for logits [..., vocab] -> [...]."""
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def assert_same_predictions(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Logits [..., vocab] that pick the same token at every position, with per-position KL under MODEL_KL."""
    a, e = actual.argmax(-1), expected.argmax(-1)
    differ = (a != e).nonzero()
    assert differ.numel() == 0, f"argmax differs at {differ.shape[0]} of {a.numel()} positions: {differ[:5].tolist()}"
    kl = kl_per_position(expected, actual)
    assert kl.max() <= MODEL_KL[dtype], f"KL up to {kl.max():.3g} (position {kl.argmax().item()}) > {MODEL_KL[dtype]}"
