"""realm.kernels' per-layer kernels (rms_norm, apply_rope, silu_mul) against their references and against
HF transformers' llama formulas (tests/hf_formulas.py), on the `device` fixture (Triton's interpreter on CPU, the
same tests on CUDA).

The kernels compute in float32 and round once to the activation dtype; their references do the same, so float16 and
bfloat16 results differ from them by at most one rounding of that dtype: the dtype's TOLERANCES entry.
"""

from types import SimpleNamespace

import hf_formulas as hf
import pytest
import torch
from tolerances import assert_close, assert_equal, poison

from realm.kernels import (
    apply_rope,
    apply_rope_ref,
    gelu_tanh_mul,
    gelu_tanh_mul_ref,
    rms_norm,
    rms_norm_ref,
    rope,
    rope_cache,
    silu_mul,
    silu_mul_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 3, 64, 123]
EPS = 1e-5  # SmolLM2's and Llama's rms_eps


def _randn(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def _activations(tokens: int, hidden: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Rows whose scales span 1e-2 .. 1e2 (the residual stream's norms vary this much across tokens)."""
    scales = 10 ** torch.linspace(-2, 2, tokens)[:, None]
    return (_randn(tokens, hidden, seed=seed) * scales).to(device=device, dtype=dtype)


# ---- rms_norm ------------------------------------------------------------------------------------------------------

def _assert_stream(h: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """The fused residual add rounds the float32 sum once, as torch's add: bit-equal, except that Triton's
    interpreter converts float32 to bfloat16 by truncation (triton/runtime/interpreter.py: `_convert_float` without a
    rounding mode) where the GPU rounds to nearest even, so there bfloat16 may differ by one ulp."""
    if h.dtype == torch.bfloat16 and h.device.type == "cpu":
        assert_close(h, expected, what=what)
    else:
        assert_equal(h, expected, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(fused, tokens, hidden, dtype, device):
    x = _activations(tokens, hidden, dtype, device, seed=1)
    weight = (1 + _randn(hidden, seed=2, scale=0.2)).to(device=device, dtype=dtype)
    out = poison(torch.empty_like(x))
    what = f"rms_norm {tokens}x{hidden} {dtype}"
    if not fused:
        y = rms_norm(x, weight, EPS, out=out)
        assert y.data_ptr() == out.data_ptr()
        assert_close(y, rms_norm_ref(x, weight, EPS), what=what)
        return
    residual = _activations(tokens, hidden, dtype, device, seed=3)
    h_out = poison(torch.empty_like(x))
    y, h = rms_norm(x, weight, EPS, residual, out=out, residual_out=h_out)
    assert y.data_ptr() == out.data_ptr() and h.data_ptr() == h_out.data_ptr()
    _assert_stream(h, x + residual, what=f"{what} residual stream")
    assert_close(y, rms_norm_ref(h, weight, EPS), what=what)  # the norm of the stream the kernel wrote


def test_rms_norm_equals_hf(device):
    """SmolLM2-135M's shapes (hidden 576) in float32: the kernel is HF's LlamaRMSNorm, the fused form its
    `h = h + sublayer` followed by the next norm; the reference op is HF's bit for bit."""
    x = _activations(7, 576, torch.float32, device, seed=4)
    residual = _activations(7, 576, torch.float32, device, seed=5)
    weight = (1 + _randn(576, seed=6, scale=0.2)).to(device)
    assert_close(rms_norm(x, weight, EPS), hf.rms_norm(x, weight, EPS))
    y, h = rms_norm(x, weight, EPS, residual)
    assert_equal(h, residual + x)
    assert_close(y, hf.rms_norm(residual + x, weight, EPS))
    y_ref, h_ref = rms_norm_ref(x.cpu(), weight.cpu(), EPS, residual.cpu())
    assert_equal(h_ref, residual.cpu() + x.cpu())
    assert_equal(y_ref, hf.rms_norm(residual.cpu() + x.cpu(), weight.cpu(), EPS))


def test_rms_norm_updates_the_residual_stream_in_place_and_reads_strided_rows(device):
    wide = _activations(5, 1200, torch.float16, device, seed=7)
    x = wide[:, 100:1100]  # rows 1200 apart
    residual = _activations(5, 1000, torch.float16, device, seed=8)
    weight = _randn(1000, seed=9, device=device)  # float32 weight with float16 activations
    y_ref, h_ref = rms_norm_ref(x, weight, EPS, residual)
    y, h = rms_norm(x, weight, EPS, residual, residual_out=residual)
    assert h is residual and y.dtype == torch.float16
    assert_equal(residual, h_ref)
    assert_close(y, y_ref)


def test_rms_norm_empty(device):
    x = torch.empty(0, 64, device=device)
    assert rms_norm(x, torch.ones(64, device=device), EPS).shape == (0, 64)


def test_rms_norm_rejects_bad_inputs(device):
    x, w = torch.randn(3, 64, device=device), torch.ones(64, device=device)
    cases = [
        (dict(x=x.long()), "x must be float16, bfloat16 or float32"),
        (dict(x=x[0]), r"x must be 2-D \[tokens, hidden\]"),
        (dict(x=x.t().contiguous().t()), "x must have contiguous rows"),
        (dict(weight=torch.ones(65, device=device)), r"weight must be \[64\] \(x's hidden size\)"),
        (dict(weight=w.int()), "weight must be float16, bfloat16 or float32"),
        (dict(eps=-1.0), "eps must be a non-negative float"),
        (dict(residual=torch.randn(3, 65, device=device)), r"residual must be torch.float32 \[3, 64\]"),
        (dict(residual=x.half()), r"residual must be torch.float32 \[3, 64\]"),
        (dict(out=torch.empty(3, 64, device=device, dtype=torch.float16)), r"out must be torch.float32 \[3, 64\]"),
        (dict(residual_out=torch.empty_like(x)), "residual_out is given but residual is not"),
        (dict(weight=torch.ones(64, device="meta")), "rms_norm: tensors are on different devices"),
    ]
    for change, message in cases:
        args = dict(x=x, weight=w, eps=EPS) | change
        with pytest.raises(ValueError, match=message):
            rms_norm(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_model_sizes(hidden, dtype, device):
    x = _activations(4096, hidden, dtype, device, seed=10)
    residual = _activations(4096, hidden, dtype, device, seed=11)
    weight = (1 + _randn(hidden, seed=12, scale=0.2)).to(device=device, dtype=dtype)
    y, h = rms_norm(x, weight, EPS, residual, out=poison(torch.empty_like(x)))
    assert_equal(h, x + residual)
    assert_close(y, rms_norm_ref(h, weight, EPS))


# ---- rope ----------------------------------------------------------------------------------------------------------

MAX_POSITIONS = 4096
THETA = 100000.0  # SmolLM2's rope_theta
POSITIONS = [0, 5, 5, 4095, 17, 1, 4094, 2048, 300]  # ragged: repeats, both ends of the table, unsorted


def _qkv(tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype, device, seed: int = 0):
    """q, k as the runtime sees them: views into one fused [tokens, (n_heads + 2 * n_kv_heads) * head_dim] output."""
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype, device=device, seed=seed)
    q = qkv[:, :q_size].view(tokens, n_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, n_kv_heads, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_heads,n_kv_heads", [(9, 3), (8, 8), (32, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_reference(head_dim, n_heads, n_kv_heads, dtype, device):
    qkv, q, k = _qkv(len(POSITIONS), n_heads, n_kv_heads, head_dim, dtype, device)
    original = qkv.clone()
    positions = torch.tensor(POSITIONS, device=device)
    cos_sin = rope_cache(head_dim, MAX_POSITIONS, THETA, device)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cos_sin)
    assert apply_rope(q, k, positions, cos_sin) == (q, k)
    assert q.stride(0) == qkv.shape[1]  # still views: rotated in place
    assert_close(q, q_ref, what="q")
    assert_close(k, k_ref, what="k")
    v_start = (n_heads + n_kv_heads) * head_dim
    assert_equal(qkv[:, v_start:], original[:, v_start:], what="v (must be untouched)")


def test_rope_float32_is_bit_exact(device):
    """Compiled without multiply-add fusion, float32 rounds as the reference's separate multiplies and add."""
    _, q, k = _qkv(len(POSITIONS), 9, 3, 64, torch.float32, device, seed=1)
    positions = torch.tensor(POSITIONS, device=device, dtype=torch.int32)
    cos_sin = rope_cache(64, MAX_POSITIONS, THETA, device)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cos_sin)
    apply_rope(q, k, positions, cos_sin)
    assert_equal(q, q_ref)
    assert_equal(k, k_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_at_position_zero_is_the_identity(dtype, device):
    _, q, k = _qkv(4, 8, 2, 64, dtype, device, seed=2)
    q0, k0 = q.clone(), k.clone()
    apply_rope(q, k, torch.zeros(4, dtype=torch.int64, device=device), rope_cache(64, 16, THETA, device))
    assert_equal(q, q0)
    assert_equal(k, k0)


def test_rope_cache_is_hfs_table():
    config = SimpleNamespace(head_dim=64, rope_theta=THETA)
    cos, sin = hf.rope_tables(config, MAX_POSITIONS, "cpu")
    cos_sin = rope_cache(64, MAX_POSITIONS, THETA)
    assert cos_sin.shape == (MAX_POSITIONS, 2, 32) and cos_sin.dtype == torch.float32
    for half in (slice(0, 32), slice(32, 64)):  # both halves of HF's tables repeat the frequencies
        assert_equal(cos_sin[:, 0], cos[:, half].contiguous())
        assert_equal(cos_sin[:, 1], sin[:, half].contiguous())


def test_rope_equals_hf(device):
    """SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, head_dim 64), tokens at positions 40 .. 46 as
    HF rotates them in its [batch, heads, T, head_dim] layout; the reference op equals it bit for bit."""
    start, n = 40, 7
    config = SimpleNamespace(head_dim=64, rope_theta=THETA)
    cos, sin = hf.rope_tables(config, 256, device)
    _, q, k = _qkv(n, 9, 3, 64, torch.float32, device, seed=3)
    expected = [hf.apply_rope(t.transpose(0, 1)[None], cos[start : start + n], sin[start : start + n])
                [0].transpose(0, 1) for t in (q, k)]
    positions = torch.arange(start, start + n, device=device)
    q_ref, k_ref = apply_rope_ref(q, k, positions, rope_cache(64, 256, THETA, device))
    assert_equal(q_ref.cpu(), expected[0].cpu())  # the reference op is HF's rotation, bit for bit
    assert_equal(k_ref.cpu(), expected[1].cpu())
    apply_rope(q, k, positions, rope_cache(64, 256, THETA, device))
    assert_close(q, expected[0], what="q")
    assert_close(k, expected[1], what="k")


def test_rope_rejects_bad_inputs(device):
    _, q, k = _qkv(3, 4, 2, 64, torch.float32, device)
    positions = torch.tensor([0, 1, 2], device=device)
    cos_sin = rope_cache(64, 8, THETA, device)
    cases = [
        (dict(q=q.long()), "q must be float16, bfloat16 or float32"),
        (dict(k=k.half()), "q and k must have one dtype"),
        (dict(q=q[0]), r"q must be 3-D \[tokens, heads, head_dim\]"),
        (dict(k=k.transpose(1, 2)), "k must be contiguous along head_dim"),
        (dict(k=k[:2]), "must agree on tokens and head_dim"),
        (dict(q=q[..., :63], k=k[..., :63]), "head_dim must be even and >= 2"),
        (dict(positions=positions.float()), "positions must be int32 or int64"),
        (dict(positions=positions.to(torch.int16)), "positions must be int32 or int64"),
        (dict(positions=positions[:2]), r"positions must be \[3\]"),
        (dict(cos_sin=rope_cache(128, 8, THETA, device)), r"cos_sin must be float32 \[max_positions, 2, 32\]"),
        (dict(cos_sin=cos_sin.double()), "cos_sin must be float32"),
    ]
    if device.type == "cpu":  # on CUDA the host does not look at positions (see realm.kernels.rope)
        cases += [(dict(positions=torch.tensor(p)), r"positions must be in \[0, 8\)") for p in ([0, 8, 1], [0, -1, 1])]
    for change, message in cases:
        args = dict(q=q, k=k, positions=positions, cos_sin=cos_sin) | change
        with pytest.raises(ValueError, match=message):
            apply_rope(**args)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_cache(63, 8, THETA)


def test_rope_out_of_range_positions_give_nan_without_reading_outside_the_table(device):
    """What the kernel does where the host does not check positions (CUDA): NaN q and k for that token only."""
    _, q, k = _qkv(4, 4, 2, 64, torch.float32, device)
    cos_sin = rope_cache(64, 8, THETA, device)
    q_ref, k_ref = apply_rope_ref(q, k, torch.tensor([0, 1, 2, 3], device=device), cos_sin)
    rope._launch(q, k, torch.tensor([0, 8, 2, -1], device=device), cos_sin)
    for t in (1, 3):
        assert q[t].isnan().all() and k[t].isnan().all()
    assert_close(q[[0, 2]], q_ref[[0, 2]])
    assert_close(k[[0, 2]], k_ref[[0, 2]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rope_model_sizes(dtype, device):
    tokens = 4096
    _, q, k = _qkv(tokens, 32, 8, 128, dtype, device, seed=4)
    positions = torch.randint(0, 8192, (tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    cos_sin = rope_cache(128, 8192, 500000.0, device)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cos_sin)
    apply_rope(q, k, positions, cos_sin)
    assert_close(q, q_ref)
    assert_close(k, k_ref)


# ---- silu_mul ------------------------------------------------------------------------------------------------------

GATES = {"silu_mul": (silu_mul, silu_mul_ref), "gelu_tanh_mul": (gelu_tanh_mul, gelu_tanh_mul_ref)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ffn", [1536, 2048, 1000])  # SmolLM2-135M's ffn, Gemma 3 270M's, a non power of two
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("gate", list(GATES))
def test_gated_activation_matches_reference(gate, tokens, ffn, dtype, device):
    op, ref = GATES[gate]
    gate_up = _randn(tokens, 2 * ffn, dtype=dtype, device=device, seed=tokens, scale=3.0)
    out = poison(torch.empty(tokens, ffn, dtype=dtype, device=device))
    y = op(gate_up, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, ref(gate_up), what=f"{gate} {tokens}x{ffn} {dtype}")


def test_silu_mul_equals_hf_and_reads_strided_rows(device):
    wide = _randn(5, 2 * 1536 + 64, device=device, seed=1, scale=3.0)
    gate_up = wide[:, 64:]  # rows 3136 apart, as a slice of a wider buffer
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(silu_mul(gate_up), torch.nn.functional.silu(gate) * up)  # HF's LlamaMLP expression


# exp(-gate) overflows to inf on purpose; the interpreter's numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_silu_mul_extreme_gates(device):
    """Large |gate|: exp(-gate) overflows to inf (silu -> -0) or underflows to 0 (silu -> gate), as in torch."""
    gate = torch.tensor([[-200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, 1e30]], device=device)
    gate_up = torch.cat((gate, torch.full_like(gate, 2.0)), dim=1)
    assert_close(silu_mul(gate_up), silu_mul_ref(gate_up))


def test_silu_mul_rejects_bad_inputs(device):
    gate_up = torch.randn(3, 64, device=device)
    cases = [
        (dict(gate_up=gate_up.long()), "gate_up must be float16, bfloat16 or float32"),
        (dict(gate_up=gate_up[:, :63]), r"gate_up must be 2-D \[tokens, 2 \* ffn\] \(an even width\)"),
        (dict(gate_up=gate_up[0]), r"gate_up must be 2-D"),
        (dict(gate_up=gate_up.t().contiguous().t()), "gate_up must have contiguous rows"),
        (dict(out=torch.empty(3, 64, device=device)), r"out must be torch.float32 \[3, 32\]"),
        (dict(out=torch.empty(3, 32, device=device, dtype=torch.bfloat16)), r"out must be torch.float32 \[3, 32\]"),
        (dict(out=torch.empty(32, 3, device=device).t()), "out must have contiguous rows"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            silu_mul(**(dict(gate_up=gate_up) | change))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_gelu_tanh_mul_equals_hf_at_extreme_gates(device):
    """HF's GemmaMLP expression; tanh through exp saturates (large |gate|: exp overflows to inf, tanh to 1)."""
    gate = torch.tensor([[-200.0, -88.0, -20.0, -1.0, 0.0, 0.5, 20.0, 88.0, 200.0, 1e30]], device=device)
    up = torch.linspace(-2, 2, gate.shape[1], device=device)[None]
    want = torch.nn.functional.gelu(gate, approximate="tanh") * up
    assert_close(gelu_tanh_mul(torch.cat((gate, up), dim=1)), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_silu_mul_model_sizes(dtype, device):
    gate_up = _randn(4096, 2 * 14336, dtype=dtype, device=device, seed=2, scale=3.0)  # Llama-3-8B's ffn
    assert_close(silu_mul(gate_up, out=poison(torch.empty(4096, 14336, dtype=dtype, device=device))),
                 silu_mul_ref(gate_up))
