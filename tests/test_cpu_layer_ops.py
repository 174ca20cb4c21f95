"""realm.kernels.cpu_layer_ops (the onednn backend's RMSNorm, RoPE and SiLU * up: one C loop each) against their
formulas in float64, over row counts (size 1, odd, a prompt chunk that splits among threads) and real and odd widths;
each row's independence of the rows with it (to the bit), strided views, NaN staying in its row, named errors, and
the fallback to the references (other dtypes, no compiler).

Tolerances: RMSNorm's sum of squares is a dim-term float32 sum (relative error <= dim * u, u = 2^-24, in any order),
then a square root, a division and two products; RoPE's outputs are two products and a sum (<= 3 roundings of
|x cos| + |y sin|); SiLU * up is glibc's expf (a few ulp), an add, a division and a product. A wrong index or a lost
term is off by a whole term, far beyond these.
"""

import warnings

import pytest
import torch
from kernel_build import fresh_kernel_build
from tolerances import assert_close, assert_equal

from realm.kernels import cpu_layer_ops as lo
from realm.kernels.rms_norm import rms_norm_ref
from realm.kernels.rope import apply_rope_ref, rope_cache
from realm.kernels.silu_mul import silu_mul_ref
from realm.runtime import Backend
from realm.runtime.ops import ops_for

pytestmark = pytest.mark.skipif(lo.unavailable_reason() is not None,
                                reason=f"the CPU layer-op kernels cannot be built here: {lo.unavailable_reason()}")

U = 2.0**-24
ROWS = [1, 2, 7, 16, 130]  # 1 row: one thread; 2: SiLU split; 7 and more: every op past PARALLEL_FROM, split


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- RMSNorm ------------------------------------------------------------------------------------------------------

def _rms_exact(h, weight, eps):
    h = h.double()
    return weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dim", [1, 5, 64, 576, 960])
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_with_and_without_residual(rows, dim):
    x, res, w = _randn(rows, dim, seed=1), _randn(rows, dim, seed=2), _randn(dim, seed=3)
    y = lo.rms_norm_cpu(x, w, 1e-5)
    assert_close(y, _rms_exact(x, w, 1e-5), atol=0.0, rtol=(dim + 8) * U)
    y, h = lo.rms_norm_cpu(x, w, 1e-5, residual=res)
    assert_equal(h, x + res)  # one rounding, as torch's add
    assert_close(y, _rms_exact(h, w, 1e-5), atol=0.0, rtol=(dim + 8) * U)


def test_rms_norm_of_strided_rows_and_into_out():
    wide, w = _randn(9, 700, seed=4), _randn(576, seed=5)
    x = wide[:, 50:626]  # rows 700 apart
    out = torch.full((9, 576), float("nan"))
    assert lo.rms_norm_cpu(x, w, 1e-6, out=out) is out
    assert_equal(out, lo.rms_norm_cpu(x.contiguous(), w, 1e-6))


# ---- RoPE ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [(9, 3, 64), (1, 1, 2), (4, 2, 6), (32, 8, 128)], ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_rope_rotates_views_of_a_fused_qkv_in_place(rows, heads):
    n_heads, n_kv, head_dim = heads
    table = rope_cache(head_dim, 4096, 10000.0, "cpu")
    qkv = _randn(rows, (n_heads + 2 * n_kv) * head_dim, seed=6)
    q = qkv[:, : n_heads * head_dim].view(rows, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv) * head_dim].view(rows, n_kv, head_dim)
    v_before = qkv[:, (n_heads + n_kv) * head_dim :].clone()
    positions = torch.randint(0, 4096, (rows,), generator=torch.Generator().manual_seed(7), dtype=torch.int32)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = lo.apply_rope_cpu(q, k, positions, table)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert_equal(qkv[:, (n_heads + n_kv) * head_dim :], v_before)  # v untouched
    cos, sin = table[positions.long()].double().unbind(1)
    half = head_dim // 2
    for before, after in ((q0, got_q), (k0, got_k)):
        a, b = before[..., :half].double(), before[..., half:].double()
        c, s = cos[:, None, :], sin[:, None, :]
        exact = torch.cat((a * c - b * s, b * c + a * s), -1)
        magnitude = torch.cat((a.abs() * c.abs() + b.abs() * s.abs(), b.abs() * c.abs() + a.abs() * s.abs()), -1)
        assert_close(after, exact, atol=0.0, rtol=3 * U, magnitude=magnitude)


def test_rope_takes_int64_positions_and_refuses_one_outside_the_table():
    table = rope_cache(8, 16, 10000.0, "cpu")
    q, k = _randn(3, 2, 8, seed=8), _randn(3, 1, 8, seed=9)
    want = apply_rope_ref(q, k, torch.tensor([0, 5, 15]), table)
    got = lo.apply_rope_cpu(q.clone(), k.clone(), torch.tensor([0, 5, 15]), table)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    before = q.clone()
    with pytest.raises(ValueError, match=r"token 2 has position 16, outside the RoPE table's \[0, 16\)"):
        lo.apply_rope_cpu(q, k, torch.tensor([0, 5, 16], dtype=torch.int32), table)
    assert_equal(q, before)  # checked before any row turned


# ---- SiLU * up ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ffn", [1, 3, 1536])
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(rows, ffn):
    gate_up = _randn(rows, 2 * ffn, seed=10) * 3
    g, u = gate_up.double().chunk(2, dim=-1)
    assert_close(lo.silu_mul_cpu(gate_up), g / (1 + torch.exp(-g)) * u, atol=0.0, rtol=8 * U)


def test_silu_mul_at_extreme_gates_and_into_a_strided_out():
    gate_up = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert_close(lo.silu_mul_cpu(gate_up), silu_mul_ref(gate_up), atol=1e-30)
    out = torch.full((1, 8), float("nan"))[:, :5]
    assert lo.silu_mul_cpu(gate_up, out=out) is out
    assert_equal(out, lo.silu_mul_cpu(gate_up))


# ---- every op ------------------------------------------------------------------------------------------------------

def _ops(rows, seed):
    x, res, w = _randn(rows, 576, seed=seed), _randn(rows, 576, seed=seed + 1), _randn(576, seed=seed + 2)
    gate_up = _randn(rows, 3072, seed=seed + 3)
    qkv = _randn(rows, 960, seed=seed + 4)
    positions = torch.arange(100, 100 + rows, dtype=torch.int32)
    return x, res, w, gate_up, qkv, positions


def _run_all(x, res, w, gate_up, qkv, positions, table):
    y, h = lo.rms_norm_cpu(x, w, 1e-5, residual=res)
    qkv = qkv.clone()
    n = qkv.shape[0]
    q, k = lo.apply_rope_cpu(qkv[:, :576].view(n, 9, 64), qkv[:, 576:768].view(n, 3, 64), positions, table)
    return y, h, q, k, lo.silu_mul_cpu(gate_up)


@pytest.mark.parametrize("rows", [3, 130])
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it(rows):
    """A decode's row and the same row inside a verification (or a prompt chunk, split among threads) agree."""
    table = rope_cache(64, 8192, 100000.0, "cpu")
    inputs = _ops(rows, seed=20)
    together = _run_all(*inputs, table)
    for i in (0, rows // 2, rows - 1):
        alone = _run_all(*(t[i : i + 1] if t.dim() and t.shape[0] == rows else t for t in inputs), table)
        for a, b in zip(alone, together, strict=True):
            assert_equal(a, b[i : i + 1])


def test_a_nan_stays_in_its_row():
    table = rope_cache(64, 8192, 100000.0, "cpu")
    x, res, w, gate_up, qkv, positions = _ops(4, seed=30)
    x[1, 7] = gate_up[2, 5] = qkv[3, 100] = float("nan")
    y, h, q, k, act = _run_all(x, res, w, gate_up, qkv, positions, table)
    assert h[1, 7].isnan() and h.isnan().sum() == 1
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()
    assert act[2, 5].isnan() and act.isnan().sum() == 1
    assert q[3, 1].isnan().any() and not q[:3].isnan().any() and not k.isnan().any()


def test_bad_shapes_are_named():
    w = torch.ones(8)
    with pytest.raises(ValueError, match=r"rms_norm takes x \[tokens, hidden\], weight \[hidden\]"):
        lo.rms_norm_cpu(torch.ones(2, 9), w, 1e-5)
    with pytest.raises(ValueError, match=r"a residual shaped as x"):
        lo.rms_norm_cpu(torch.ones(2, 8), w, 1e-5, residual=torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"silu_mul takes gate_up \[tokens, 2 \* ffn\] \(an even width\)"):
        lo.silu_mul_cpu(torch.ones(2, 7))
    table = rope_cache(8, 16, 10000.0, "cpu")
    with pytest.raises(ValueError, match=r"head_dim even"):
        lo.apply_rope_cpu(torch.ones(2, 2, 8), torch.ones(2, 1, 6), torch.zeros(2, dtype=torch.int32), table)
    with pytest.raises(ValueError, match=r"RoPE table must be \[max_positions, 2, 4\]"):
        lo.apply_rope_cpu(torch.ones(2, 2, 8), torch.ones(2, 1, 8), torch.zeros(2, dtype=torch.int32), table[:, :, :2])


def test_the_onednn_backend_uses_them():
    ops = ops_for(Backend.ONEDNN)
    assert (ops.rms_norm, ops.rope, ops.silu_mul) == (lo.rms_norm_cpu, lo.apply_rope_cpu, lo.silu_mul_cpu)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    with fresh_kernel_build(tmp_path, monkeypatch, lo.library, lo._warn_fallback) as path:
        yield path


def test_other_dtypes_run_the_reference_and_say_so(fresh_build):
    x, w = _randn(3, 16, seed=40).bfloat16(), _randn(16, seed=41).bfloat16()
    with pytest.warns(RuntimeWarning, match=r"CPU rms_norm kernel does not run here \(it takes float32"):
        got = lo.rms_norm_cpu(x, w, 1e-5)
    assert_equal(got, rms_norm_ref(x, w, 1e-5))


def test_no_compiler_falls_back_to_the_references_with_a_warning(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    gate_up = _randn(2, 10, seed=42)
    with pytest.warns(RuntimeWarning, match=r"CPU silu_mul kernel does not run here \(.*no-such-cc"):
        got = lo.silu_mul_cpu(gate_up)
    assert_equal(got, silu_mul_ref(gate_up))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every layer of every step
        lo.silu_mul_cpu(gate_up)
    assert "no-such-cc" in lo.unavailable_reason()


def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone(fresh_build):
    """Built with -ffast-math like cpu_attention: loading must not turn on flush-to-zero for the process."""
    subnormal = torch.tensor([1e-40])
    before = (subnormal * 3.0).item()
    lo.library()
    assert before > 0 and (subnormal * 3.0).item() == before


def test_an_out_the_kernel_cannot_write_runs_the_reference_and_says_so(fresh_build):
    gate_up = _randn(2, 10, seed=43)
    out = torch.empty(2, 10, dtype=torch.float64)[:, ::2]  # float64 and strided
    with pytest.warns(RuntimeWarning, match=r"CPU silu_mul kernel does not run here \(it writes float32 CPU rows"):
        got = lo.silu_mul_cpu(gate_up, out=out)
    assert got is out
    assert_equal(out, silu_mul_ref(gate_up).double())
