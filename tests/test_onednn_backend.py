"""The onednn backend: the reference model with its linear layers through oneDNN on weights packed once.

It is not bit-exact with HF (another summation order), so it is held to the rounding of a dot product per matmul
and to the model tolerance against the torch reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import PARAGRAPH
from tiny_gguf import StubTokenizer, write_tiny_llama
from tolerances import assert_close, assert_same_predictions, dot_magnitude

import realm
from realm.runtime import Backend, Model, backends_for, load_weights
from realm.runtime.engine import Engine, EngineConfig
from realm.runtime.ops import PackedWeight, check_onednn, ops_for
from realm.runtime.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

# (out, in): tiny, odd, and SmolLM2-135M's layers (Q/O, K/V, gate/up, down)
SHAPES = [(48, 64), (96, 64), (33, 160), (576, 576), (192, 576), (1536, 576), (576, 1536)]


def packed(w: torch.Tensor) -> PackedWeight:
    part = ops_for(Backend.ONEDNN).prepare_dense(w)
    assert isinstance(part, PackedWeight) and part.shape == tuple(w.shape)
    return part


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 64, 65])  # 65: past cpu_linear.MAX_ROWS, oneDNN
def test_packed_matmul_equals_f_linear_to_rounding(shape, rows):
    torch.manual_seed(1)
    w, x, bias = torch.randn(*shape), torch.randn(rows, shape[1]), torch.randn(shape[0])
    y = ops_for(Backend.ONEDNN).matmul(x, packed(w), bias)
    # two summation orders of K products: a few roundings of the sum of |x_k w_k| apart (float32's rtol per K/64)
    assert_close(y, F.linear(x, w, bias), rtol=1.3e-6 * max(1, shape[1] // 64),
                 magnitude=dot_magnitude(x, w) + bias.abs())


def test_smollm2_predicts_as_the_reference(smollm2):
    """Every position of a paragraph: the same argmax as the torch reference and a KL within float32 reordering."""
    fast = realm.load("smollm2", device="cpu", backend="onednn")
    assert fast.transformer.ops.backend is Backend.ONEDNN and isinstance(fast.transformer.head.parts[0], PackedWeight)
    ids = torch.tensor([smollm2.encode(PARAGRAPH, add_bos=False)])
    assert_same_predictions(fast.forward(ids), smollm2.forward(ids))
    prompt = "The capital of France is"
    assert fast.generate(prompt, max_tokens=8).text == smollm2.generate(prompt, max_tokens=8).text


def test_adapters_take_the_reference_path(tmp_path):
    """LoRA on onednn is the reference's PEFT-order delta after the packed matmul: a mixed batch of two adapters and
    the base model picks the torch backend's tokens."""
    from test_lora_runtime import adapters_for

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, formats={"attn_q": "Q8_0"})
    adapters = adapters_for(load_weights(path).config)
    results = {}
    for backend in (Backend.TORCH, Backend.ONEDNN):
        model = Model(load_weights(path), StubTokenizer(50), backend, torch.device("cpu"), torch.float32)
        for name in ("a", "b"):
            model.add_lora(name, adapters[name])
        engine = Engine(model, EngineConfig(kv_blocks=32, block_size=16))
        paths = []
        execute = engine.runner.execute

        def recording(plan, draft_probs=None, execute=execute, paths=paths):
            out = execute(plan, draft_probs)
            paths.append(out.lora)
            return out

        engine.runner.execute = recording
        requests = [engine.add_request([5 + i, 9, 30, 2, 11][i:], SamplingParams(max_tokens=6, ignore_eos=True,
                                                                                 adapter=a))
                    for i, a in enumerate(["a", None, "b"])]
        engine.run()
        assert set(paths) == {"reference"}
        results[backend] = [r.completion.token_ids for r in requests]
    assert results[Backend.ONEDNN] == results[Backend.TORCH]


@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("cuda", torch.float32, "the onednn backend runs on the CPU, not cuda"),
    ("cpu", torch.float16, "the onednn backend computes in float32 or bfloat16, not torch.float16"),
])
def test_onednn_refuses_what_it_cannot_run(device, dtype, message):
    with pytest.raises(ValueError, match=message):
        check_onednn(torch.device(device), dtype)


def test_load_refuses_float16_on_onednn_before_reading_weights():
    with pytest.raises(ValueError, match=r"not torch\.float16"):
        realm.load("no-such-model.gguf", device="cpu", backend="onednn", dtype=torch.float16)


def test_backends_for_a_device():
    assert Backend.ONEDNN in backends_for("cpu")
    assert backends_for("cuda") == [Backend.TORCH, Backend.TRITON]
