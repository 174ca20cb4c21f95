"""The test infrastructure itself: a Triton kernel runs on the `device` fixture (the interpreter on CPU), and the
comparison helpers fail loudly and say where."""

import pytest
import torch
import triton
import triton.language as tl
from tolerances import TOLERANCES, assert_close, assert_equal, poison


@triton.jit
def _axpy_kernel(out_ptr, x_ptr, y_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@pytest.mark.parametrize("n", [1, 127, 1024, 1537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_runs_on_the_device_fixture(n, dtype, device):
    x = torch.randn(n, device=device, dtype=dtype)
    y = torch.randn(n, device=device, dtype=dtype)
    out = poison(torch.empty_like(x))
    _axpy_kernel[(triton.cdiv(n, 256),)](out, x, y, 2.0, n, BLOCK=256)
    assert_close(out, (2.0 * x.float() + y.float()).to(dtype))


def test_assert_close_reports_count_and_location():
    expected = torch.zeros(4, 5)
    actual = expected.clone()
    actual[2, 3] = 1.0
    with pytest.raises(AssertionError, match=r"1 of 20 elements differ.*max abs error 1 at \(2, 3\)"):
        assert_close(actual, expected)


def test_assert_close_fails_on_unwritten_poisoned_output():
    expected = torch.ones(8)
    actual = poison(torch.empty(8))
    actual[:7] = 1.0
    with pytest.raises(AssertionError, match=r"1 of 8 elements differ"):
        assert_close(actual, expected)


def test_assert_equal_compares_bits():
    with pytest.raises(AssertionError, match="1 of 2 elements differ"):
        assert_equal(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))
    assert_equal(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


def test_tolerance_table_covers_the_kernel_dtypes():
    assert set(TOLERANCES) == {torch.float32, torch.float16, torch.bfloat16}
    assert all(t.rtol < 0.05 and t.atol <= 1e-5 for t in TOLERANCES.values())
