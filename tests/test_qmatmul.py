"""realm.kernels.qmatmul and the kernel decode: every format against the references, on the `device` fixture
(Triton's interpreter on CPU, the same tests on CUDA)."""

import math

import pytest
import torch
from quant_inputs import random_blocks, random_qtensor, weights
from tolerances import TOLERANCES, assert_close, assert_equal, dot_magnitude, poison

from realm.kernels import (
    DecodeConfig,
    PrefillConfig,
    Regime,
    autotune,
    candidate_configs,
    dequantize,
    plan_qmatmul,
    qdecode,
    qmatmul,
    qmatmul_ref,
    tuning,
)
from realm.kernels.qmatmul import PreparedWeight
from realm.quant import FORMATS, Layout, QTensor, QuantError
from realm.quant.planes import PLANE_SPECS, planes_dequantize, to_planes

ALL = list(FORMATS)
M_SWEEP = [1, 3, 16, 33]
DTYPES = [torch.float16, torch.float32]


def _k(fmt, blocks: int) -> int:
    """A K of `blocks` blocks for block formats; for float formats an odd K near 32 * blocks."""
    return blocks * fmt.block_size if fmt.block_size > 1 else 32 * blocks + 5


def _check(x, w, out, **kwargs):
    """Runs qmatmul into a poisoned `out` and compares with the reference under the dot-product error bound."""
    y = qmatmul(x, w, out=poison(out), **kwargs)
    assert y.data_ptr() == out.data_ptr()
    expected = qmatmul_ref(x, w)
    magnitude = dot_magnitude(x.reshape(-1, w.shape[1]), w.dequantize()).view(expected.shape)
    assert_close(y, expected, magnitude=magnitude, what=f"{w.fmt.name} {tuple(x.shape)} {x.dtype}")


# ---- the kernel layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_planes_layout_is_lossless(name):
    fmt = FORMATS[name]
    rows, k = 7, _k(fmt, 9)
    data = random_blocks(fmt, rows * k // fmt.block_size, seed=1).view(rows, -1)
    planes = to_planes(data, fmt, (rows, k))
    assert_equal(planes_dequantize(planes, (rows, k)), QTensor(data, fmt, (rows, k)).dequantize(), what=name)


def test_planes_cost_at_most_half_a_bit_per_weight_more_than_gguf():
    for name, (spec, _) in PLANE_SPECS.items():
        fmt = FORMATS[name]
        assert spec.bits_per_weight <= fmt.bits_per_weight + 0.5, name
        w = random_qtensor(fmt, 4, _k(fmt, 2))
        assert w.planes().nbytes * 8 == pytest.approx(spec.bits_per_weight * 4 * w.shape[1]), name


def test_qtensor_planes_layout():
    w = random_qtensor(FORMATS["Q5_K"], 3, 512)
    p = w.repack(Layout.PLANES)
    assert p.layout is Layout.PLANES and p.repack("planes") is p
    assert_equal(p.dequantize(), w.dequantize())
    assert "layout=planes" in repr(p)
    with pytest.raises(QuantError, match="cannot give back GGUF bytes"):
        p.gguf_bytes()
    with pytest.raises(QuantError, match="another format"):
        QTensor(p.data, "Q4_K", (3, 512))
    with pytest.raises(QuantError, match="words per row"):
        QTensor(p.data, "Q5_K", (3, 256))


# ---- the in-register decode, materialised --------------------------------------------------------------------------

# Random MXFP4 exponents reach 2^127, so some weights overflow to inf (in the reference too); numpy warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("block_k", [32, 256])
def test_kernel_decode_is_bit_exact(name, block_k, device):
    fmt = FORMATS[name]
    rows, k = 5, _k(fmt, 3)
    data = random_blocks(fmt, rows * k // fmt.block_size, seed=2).view(rows, -1)
    w = QTensor(data, fmt, (rows, k)).to(device)
    out = poison(torch.empty(rows, k, device=device))
    assert_equal(dequantize(w.repack("planes"), out, block_k=block_k), w.dequantize(), what=name)


# ---- qmatmul: the sweep --------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (67, 3), (576, 6)]  # (N, blocks of K): size 1, odd, a real model width (SmolLM2 hidden 576)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("n,blocks", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qmatmul_matches_reference(name, m, n, blocks, dtype, device):
    fmt = FORMATS[name]
    k = _k(fmt, blocks)
    w = random_qtensor(fmt, n, k, seed=m).repack("planes").to(device)
    x = torch.randn(m, k, device=device).to(dtype)
    _check(x, w, torch.empty(m, n, dtype=dtype, device=device))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("m", [3, 33])
def test_qmatmul_wide_output(name, m, device):
    """N = 49152 (a vocabulary-sized projection) with one block of K."""
    fmt = FORMATS[name]
    n, k = 49152, _k(fmt, 1)
    w = random_qtensor(fmt, n, k, seed=5).repack("planes").to(device)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    _check(x, w, torch.empty(m, n, dtype=x.dtype, device=device))


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q3_K", "Q4_K", "Q6_K", "IQ4_XS"])
@pytest.mark.parametrize("k", [1536, 2048])
def test_qmatmul_on_quantized_weights(name, k, device):
    """Real quantizer output (heavy-tailed weights) rather than random codes, K of model sizes."""
    w = QTensor.from_float(weights("student_t", 48, k, seed=3) * 0.02, name).repack("planes").to(device)
    for m in (1, 16, 33):
        x = torch.randn(m, k, device=device)
        _check(x, w, torch.empty(m, 48, device=device))


@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_bfloat16(m, device):
    if device.type == "cpu" and m > 4:
        pytest.skip("Triton's interpreter returns garbage for bfloat16 tl.dot (M > 4 uses tensor-core tiles)")
    w = random_qtensor(FORMATS["Q4_K"], 67, 512).repack("planes").to(device)
    x = torch.randn(m, 512, device=device, dtype=torch.bfloat16)
    _check(x, w, torch.empty(m, 67, dtype=x.dtype, device=device))


# ---- regimes, configs and plans ------------------------------------------------------------------------------------

CONFIGS = [
    DecodeConfig(block_n=16, block_k=32, split_k=1),
    DecodeConfig(block_n=64, block_k=128, split_k=3),  # uneven split: the last slice is shorter
    DecodeConfig(block_n=32, block_k=512, split_k=8),  # more splits than K tiles: empty slices are dropped
    PrefillConfig(block_m=16, block_n=16, block_k=32),
    PrefillConfig(block_m=32, block_n=64, block_k=256, group_m=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("name", ["Q5_1", "Q2_K", "Q8_K", "MXFP4", "F16"])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_every_config_serves_every_m(config, name, m, device):
    fmt = FORMATS[name]
    k = _k(fmt, 4) if fmt.block_size > 1 else 1000
    w = random_qtensor(fmt, 45, k).repack("planes").to(device)
    x = torch.randn(m, k, device=device)
    _check(x, w, torch.empty(m, 45, device=device), config=config)


def test_leading_dimensions_and_strided_rows(device):
    w = random_qtensor(FORMATS["Q4_0"], 40, 64).repack("planes").to(device)
    x = torch.randn(2, 3, 5, 64, device=device)
    _check(x, w, torch.empty(2, 3, 5, 40, device=device))
    wide = torch.randn(6, 128, device=device)
    view = wide[:, :64]  # rows 128 apart
    assert_close(qmatmul(view, w), qmatmul_ref(view.contiguous(), w),
                 magnitude=dot_magnitude(view, w.dequantize().to(device)))


def test_gguf_layout_is_repacked_on_the_fly(device):
    w = random_qtensor(FORMATS["Q6_K"], 9, 256).to(device)
    assert w.layout is Layout.GGUF
    x = torch.randn(2, 256, device=device)
    assert_equal(qmatmul(x, w), qmatmul(x, w.repack("planes")))


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "IQ4_XS"])
def test_prepared_weight_equals_qmatmul(name, device):
    """PreparedWeight (what the model's layers call) runs qmatmul's plans: the same result bit for bit, for decode
    Ms (the launch reused on the second call), a prefill M, strided rows, and a weight given in the GGUF layout."""
    w = random_qtensor(FORMATS[name], 48, 512).to(device)
    prepared = PreparedWeight(w, device)
    assert prepared.w.layout is Layout.PLANES and prepared.shape == (48, 512) and "48, 512" in repr(prepared)
    planes = w.repack("planes")
    for m, dtype in ((1, torch.float32), (3, torch.float32), (1, torch.float16), (1, torch.float32),
                     (16, torch.float32), (3, torch.float16), (33, torch.float32)):
        x = torch.randn(m, 512, device=device, dtype=dtype)  # float16 after float32: a launch per dtype
        assert_equal(prepared(x), qmatmul(x, planes))
    wide = torch.randn(3, 640, device=device)
    assert_equal(prepared(wide[:, :512]), qmatmul(wide[:, :512].contiguous(), planes))  # rows 640 apart
    assert prepared(torch.randn(0, 512, device=device)).shape == (0, 48)
    with pytest.raises(ValueError, match=r"x must be \[M, 512\] float16/bfloat16/float32 with contiguous rows"):
        prepared(torch.randn(2, 256, device=device))


def test_empty_inputs(device):
    w = random_qtensor(FORMATS["Q4_0"], 8, 32).repack("planes").to(device)
    assert qmatmul(torch.randn(0, 32, device=device), w).shape == (0, 8)


def test_plan_picks_the_regime_by_m_and_can_be_overridden():
    w = random_qtensor(FORMATS["Q4_K"], 64, 256).repack("planes")
    assert plan_qmatmul(1, w).regime is Regime.DECODE
    assert plan_qmatmul(16, w).regime is Regime.DECODE
    assert plan_qmatmul(17, w).regime is Regime.PREFILL
    assert plan_qmatmul(1, w, regime="prefill").regime is Regime.PREFILL
    given = PrefillConfig(block_m=16)
    plan = plan_qmatmul(1, w, config=given)
    assert (plan.regime, plan.config, plan.source) == (Regime.PREFILL, given, "given")
    assert plan_qmatmul(2048, w).source == "default"
    with pytest.raises(ValueError, match="regime decode needs a DecodeConfig"):
        plan_qmatmul(1, w, regime="decode", config=given)


def test_tuned_configs_are_recorded_saved_loaded_and_used(tmp_path, device):
    w = random_qtensor(FORMATS["Q4_K"], 64, 512).repack("planes").to(device)
    x = torch.randn(5, 512, device=device)
    candidates = [DecodeConfig(block_n=16, block_k=32), DecodeConfig(block_n=64, block_k=256, split_k=2)]
    fake_ms = {candidates[0]: 2.0, candidates[1]: 1.0}
    runs = []

    def timer(call):
        call()
        runs.append(1)
        return fake_ms[config_of[-1]]

    config_of = []

    def run(config):
        config_of.append(config)
        return qmatmul(x, w, config=config)

    best, timings = tuning.tune(run, candidates, timer)
    assert best == candidates[1] and [ms for _, ms in timings] == [2.0, 1.0] and len(runs) == 2
    tuning.clear()
    try:
        tuning.record("qmatmul", "Q4_K", "decode", 5, 64, 512, best, device)
        assert plan_qmatmul(7, w, device=device).source == "tuned"  # 5 and 7 share the bucket of 8
        assert plan_qmatmul(3, w, device=device).source == "default"
        path = tuning.save(tmp_path / "gpu.json", device=device)
        tuning.clear()
        assert plan_qmatmul(7, w, device=device).source == "default"
        assert tuning.load(path) == 1
        plan = plan_qmatmul(8, w, device=device)
        assert (plan.source, plan.config) == ("tuned", best)
        assert tuning.load(tmp_path / "missing.json") == 0
    finally:
        tuning.clear()


def test_tuner_skips_failing_candidates():
    def run(config):
        if config == "bad":
            raise RuntimeError("out of shared memory")
    best, timings = tuning.tune(run, ["bad", "good"], lambda call: call() or 1.0)
    assert best == "good" and timings[0] == ("bad", math.inf)
    with pytest.raises(RuntimeError, match="every candidate config failed"):
        tuning.tune(run, ["bad"], lambda call: call() or 1.0)


def test_bucket_m():
    assert [tuning.bucket_m(m) for m in (1, 2, 3, 5, 16, 17, 2048)] == [1, 2, 4, 8, 16, 32, 2048]


# ---- errors --------------------------------------------------------------------------------------------------------

def _w():
    return random_qtensor(FORMATS["Q4_K"], 8, 256).repack("planes")


@pytest.mark.parametrize("x,message", [
    (torch.randn(2, 100), "K = 100, not a multiple of the Q4_K block size 256"),
    (torch.randn(2, 512), r"x has K = 512 but w is \[8, 256\]"),
    (torch.randn(2, 256, dtype=torch.float64), "x must be float16, bfloat16 or float32, got torch.float64"),
    (torch.ones(2, 256, dtype=torch.int32), "got torch.int32"),
    (torch.randn(2, 256, device="meta"), "x is on meta but w is on cpu"),
    (torch.randn(2, 256, requires_grad=True), "qmatmul has no backward: x requires grad"),
])
def test_bad_activations_get_a_clear_error(x, message):
    with pytest.raises(ValueError, match=message):
        qmatmul(x, _w())


@pytest.mark.parametrize("out,message", [
    (torch.empty(2, 9), r"out must be torch.float32 \[2, 8\]"),
    (torch.empty(2, 8, dtype=torch.float16), "got torch.float16"),
    (torch.empty(8, 2).t(), "out must be contiguous"),
])
def test_bad_output_gets_a_clear_error(out, message):
    with pytest.raises(ValueError, match=message):
        qmatmul(torch.randn(2, 256), _w(), out=out)


def test_bad_weight_and_config_get_a_clear_error():
    with pytest.raises(TypeError, match=r"w must be a realm\.quant\.QTensor"):
        qmatmul(torch.randn(2, 256), torch.randn(8, 256))
    with pytest.raises(ValueError, match="block_k must be >= 32"):
        qmatmul(torch.randn(2, 256), _w(), config=DecodeConfig(block_k=16))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        DecodeConfig(block_n=48)
    with pytest.raises(ValueError, match=r"block_m must be >= 16 \(tl\.dot\), got 8"):
        PrefillConfig(block_m=8)
    with pytest.raises(ValueError, match="num_stages must be an int >= 1, got 0"):
        DecodeConfig(num_stages=0)
    with pytest.raises(ValueError, match="'fast' is not a valid Regime"):
        qmatmul(torch.randn(2, 256), _w(), regime="fast")


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(qdecode, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"Triton kernels need CUDA tensors, got cpu.*TRITON_INTERPRET=1"):
        qmatmul(torch.randn(2, 256), _w())


def test_tolerance_bound_can_fail():
    """An error of 1% of the dot-product bound's scale fails: the bound is not so loose that anything passes."""
    w = random_qtensor(FORMATS["Q4_K"], 8, 256)
    x = torch.randn(4, 256)
    good = qmatmul_ref(x, w)
    bad = good + 0.01 * dot_magnitude(x, w.dequantize()).float()
    with pytest.raises(AssertionError, match="elements differ"):
        assert_close(bad, good, magnitude=dot_magnitude(x, w.dequantize()))
    assert TOLERANCES[torch.float32].rtol < 0.01


def test_autotune_records_the_fastest_candidate(device):
    w = random_qtensor(FORMATS["Q4_0"], 40, 128).repack("planes").to(device)
    x = torch.randn(3, 128, device=device)
    configs = [DecodeConfig(block_n=16, block_k=32), DecodeConfig(block_n=64, block_k=128, split_k=2)]
    seen = []

    def timer(call):
        call()
        seen.append(1)
        return 5.0 - len(seen)  # the later candidate is "faster"

    tuning.clear()
    try:
        plan = autotune(x, w, configs=configs, timer=timer)
        assert (plan.regime, plan.config, plan.source) == (Regime.DECODE, configs[1], "tuned")
        assert plan_qmatmul(4, w, device=device) == plan  # 3 and 4 share a bucket
    finally:
        tuning.clear()
    assert all(isinstance(c, DecodeConfig) for c in candidate_configs("decode"))
    assert all(isinstance(c, PrefillConfig) for c in candidate_configs(Regime.PREFILL))


@pytest.fixture(scope="module")
def default_model():
    from realm.gguf_io import open_gguf
    from realm.models import resolve_model

    return open_gguf(resolve_model("smollm2"))


@pytest.mark.parametrize("tensor", ["blk.0.attn_k.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight",
                                    "token_embd.weight"])
def test_default_model_weights(tensor, default_model, device):
    """SmolLM2's own Q4_1 and Q8_0 tensors, 576..49152 wide (token_embd is also the tied output head)."""
    from realm.gguf_io import find_tensor, tensor_to_qtensor

    w = tensor_to_qtensor(find_tensor(default_model, tensor)).repack("planes").to(device)
    for m in (1, 5):
        x = torch.randn(m, w.shape[1], device=device, dtype=torch.float16)
        _check(x, w, torch.empty(m, w.shape[0], dtype=x.dtype, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.storage])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_llama_sizes_on_gpu(name, n, k, device):
    """Llama-3-8B projection shapes at decode and prefill batch sizes (too slow for the interpreter)."""
    w = random_qtensor(FORMATS[name], n, k).repack("planes").to(device)
    for m in (1, 16, 2048):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k, device=device, dtype=dtype)
            _check(x, w, torch.empty(m, n, dtype=dtype, device=device))


def test_the_repacking_fallback_is_logged(caplog, device):
    w = random_qtensor(FORMATS["Q4_0"], 8, 32).to(device)
    with caplog.at_level("DEBUG", logger="realm.kernels"):
        qmatmul(torch.randn(1, 32, device=device), w)
    assert "in the gguf layout: repacking it to planes" in caplog.text
    assert "Plan(regime=<Regime.DECODE" in caplog.text
