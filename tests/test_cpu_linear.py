"""realm.kernels.cpu_linear (the onednn backend's linear layers for steps of up to 64 rows: a C kernel over weights
packed in panels of 32 columns) against F.linear in float64, over row counts (a tile of 8, its remainders, size 1),
odd and real layer shapes, with and without bias; the packing (exact), each row's independence of the rows computed
with it (to the bit), the backend's choice between it and oneDNN, its checks and its fallback where no compiler works.

Tolerance: the kernel sums each output as one chain of K fused multiply-adds, whose forward error is bounded by
K * u * sum_k |x_k w_k| (u = 2^-24, the standard bound of recursive summation); a wrong index or a lost term is
off by a whole product.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from kernel_build import fresh_kernel_build
from tolerances import assert_close, assert_equal, dot_magnitude

from realm.kernels import cpu_linear as cl
from realm.runtime import Backend
from realm.runtime.ops import PackedWeight, ops_for

pytestmark = pytest.mark.skipif(cl.unavailable_reason() is not None,
                                reason=f"the CPU linear kernel cannot be built here: {cl.unavailable_reason()}")

U = 2.0**-24
ROWS = [1, 2, 3, 7, 8, 9, 11, 12, 13, 16, 17, 24, 25, 64, 77]  # around the tiles (12 rows; 8 without AVX-512), groups
# of 64 (panel_group)
# (N, K): size 1, odd, one panel exactly, one column past a panel, and SmolLM2-135M's layers (Q/K/V, gate/up, down)
SHAPES = [(1, 1), (31, 17), (32, 16), (33, 576), (960, 576), (3072, 576), (576, 1536)]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check(y, x, w, bias):
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    magnitude = dot_magnitude(x, w) + (0 if bias is None else bias.double().abs())
    assert_close(y, exact, atol=0.0, rtol=(w.shape[1] + 1) * U, magnitude=magnitude)


def test_panels_hold_the_columns_k_major_zero_padded():
    w = _randn(70, 5, seed=0)
    panels = cl.pack_panels(w)
    assert panels.shape == (3, 5, cl.PANEL) and panels.is_contiguous()
    for n in range(70):
        assert_equal(panels[n // cl.PANEL, :, n % cl.PANEL], w[n])
    assert_equal(panels[2, :, 70 - 64 :], torch.zeros(5, cl.PANEL - 6))


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_panels_against_f_linear(shape, rows, with_bias):
    n, k = shape
    w, x = _randn(n, k, seed=1), _randn(rows, k, seed=2)
    bias = _randn(n, seed=3) if with_bias else None
    _check(cl.linear_panels(x, cl.pack_panels(w), n, bias), x, w, bias)


@pytest.mark.parametrize("rows", [3, 9, 13, 17, 64, 77])
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it(rows):
    """A decode's row and the same row inside a verification chunk (or a batch) are computed alike: greedy speculation
    is then exact without relying on two summation orders agreeing."""
    w, x, bias = _randn(100, 576, seed=4), _randn(rows, 576, seed=5), _randn(100, seed=6)
    panels = cl.pack_panels(w)
    together = cl.linear_panels(x, panels, 100, bias)
    alone = torch.cat([cl.linear_panels(x[i : i + 1], panels, 100, bias) for i in range(rows)])
    assert_equal(together, alone)
    assert_equal(cl.linear_panels(x[1:], panels, 100, bias), together[1:])  # other tiles, same rows


def test_strided_and_empty_inputs():
    w, big = _randn(40, 24, seed=7), _randn(5, 50, seed=8)
    panels = cl.pack_panels(w)
    x = big[:, 10:34]  # rows 50 apart
    assert_equal(cl.linear_panels(x, panels, 40), cl.linear_panels(x.contiguous(), panels, 40))
    transposed = _randn(24, 5, seed=9).t()  # columns not adjacent: copied first
    assert_equal(cl.linear_panels(transposed, panels, 40), cl.linear_panels(transposed.contiguous(), panels, 40))
    assert cl.linear_panels(torch.empty(0, 24), panels, 40).shape == (0, 40)


def test_bad_inputs_are_named():
    w = _randn(40, 24, seed=10)
    panels = cl.pack_panels(w)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        cl.linear_panels(torch.ones(2, 24, dtype=torch.float64), panels, 40)
    with pytest.raises(ValueError, match="x has 23 columns"):
        cl.linear_panels(torch.ones(2, 23), panels, 40)
    with pytest.raises(ValueError, match="N = 70 does not fit"):
        cl.linear_panels(torch.ones(2, 24), panels, 70)
    with pytest.raises(ValueError, match="N = 20 does not fit"):  # a whole panel too many
        cl.linear_panels(torch.ones(2, 24), panels, 20)
    with pytest.raises(ValueError, match=r"bias must be a contiguous float32 \[40\]"):
        cl.linear_panels(torch.ones(2, 24), panels, 40, torch.ones(39))
    with pytest.raises(ValueError, match="contiguous panels"):
        cl.linear_panels(torch.ones(2, 24), panels.transpose(0, 1), 40)
    with pytest.raises(ValueError, match="float32 matrix"):
        cl.pack_panels(w.double())
    with pytest.raises(ValueError, match="x has 23 columns, the packed weight reads 24"):  # the forward's path
        cl.linear_panels_unchecked(torch.ones(2, 23), panels, 40)


def test_the_onednn_backend_takes_the_kernel_up_to_max_rows_then_onednn():
    w, x, bias = _randn(96, 64, seed=11), _randn(cl.MAX_ROWS + 1, 64, seed=12), _randn(96, seed=13)
    ops = ops_for(Backend.ONEDNN)
    part = ops.prepare_dense(w)
    assert isinstance(part, PackedWeight) and part.panels is not None
    small = x[: cl.MAX_ROWS]
    assert_equal(ops.matmul(small, part, bias), cl.linear_panels(small, part.panels, 96, bias))
    onednn = torch.ops.mkldnn._linear_pointwise(x, part.packed, bias, "none", [], "")
    assert_equal(ops.matmul(x, part, bias), onednn)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """library() built anew into an empty directory; the cached library restored after."""
    with fresh_kernel_build(tmp_path, monkeypatch, cl.library, cl.warn_unavailable) as path:
        yield path


def test_without_a_compiler_the_backend_keeps_onednn_and_says_why(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    w, x = _randn(48, 64, seed=14), _randn(3, 64, seed=15)
    with pytest.warns(RuntimeWarning, match=r"CPU linear kernel is unavailable \(.*no-such-cc"):
        part = ops_for(Backend.ONEDNN).prepare_dense(w)
    assert part.panels is None
    assert_equal(ops_for(Backend.ONEDNN).matmul(x, part, None),
                 torch.ops.mkldnn._linear_pointwise(x, part.packed, None, "none", [], ""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not for every weight
        ops_for(Backend.ONEDNN).prepare_dense(w)


def test_built_once_under_its_own_name(fresh_build):
    cl.library()
    built = list(fresh_build.glob("cpu_linear-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cl.library.cache_clear()
    cl.library()
    assert built[0].stat().st_mtime_ns == stamp and list(fresh_build.glob("*.so")) == built
