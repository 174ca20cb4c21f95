"""The Triton forward (the one model definition, realm.runtime.transformer, on Triton ops) against the torch
reference, on a tiny quantized model of mixed formats (fast, under the interpreter on CPU) and on the default model
(`slow` on CPU; float16 on CUDA).

Both backends dequantize the same quantized weights; the torch reference multiplies dequantized float32 matrices,
the Triton forward decodes them in registers, so in float32 the logits differ by accumulation order only: the same
argmax and KL under tolerances.MODEL_KL.
"""

from __future__ import annotations

import pytest
import torch
from test_model import PARAGRAPH
from tiny_gguf import StubTokenizer, write_tiny_llama
from tolerances import MODEL_KL, assert_same_predictions, kl_per_position

import realm
from realm.kernels import qdecode
from realm.kernels.qmatmul import PreparedWeight
from realm.runtime import Backend, ChunkPlan, ForwardBatch, Model, PagedKVCache, StepPlan, Transformer, load_weights
from realm.runtime.linear import Linear
from realm.runtime.ops import ops_for
from realm.runtime.torch_model import TorchModel
from realm.runtime.triton_model import TritonModel

# SmolLM2-like attention (head_dim 64, 3 query heads per KV head) at toy width, every matrix in a block format;
# Q/K and V differ in format, so the fused QKV projection is two launches.
DIMS = dict(hidden=256, n_heads=6, n_kv_heads=2, head_dim=64, ffn=512, vocab=96)
FORMATS = {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q6_K", "attn_output": "Q4_0", "ffn_gate": "Q4_K",
           "ffn_up": "Q4_K", "ffn_down": "Q5_0", "token_embd": "Q8_0", "output": "Q6_K"}
IDS = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11, 60, 70, 1, 2, 3, 4, 5, 90]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny_q.gguf"
    write_tiny_llama(path, dims=DIMS, formats=FORMATS, context_length=64)
    return load_weights(path)


@pytest.fixture(scope="module")
def backends(tiny_weights):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchModel(tiny_weights, device), TritonModel(tiny_weights, device, torch.float32)


def test_fused_projections_group_by_format(tiny_weights, backends):
    tri = backends[1]
    layer = tri.layers[0]
    assert [p.w.fmt.name for p in layer.qkv.parts] == ["Q8_0", "Q6_K"] and layer.qkv.sizes == (384, 128, 128)
    assert [p.shape for p in layer.qkv.parts] == [(512, 256), (128, 256)]
    assert [p.w.fmt.name for p in layer.gate_up.parts] == ["Q4_K"] and layer.gate_up.parts[0].shape == (1024, 256)
    assert all(p.w.layout.value == "planes" for p in layer.qkv.parts + layer.down.parts)
    x = torch.randn(3, 256, device=tri.device)
    w = tiny_weights.layers[0]
    expected = x.cpu() @ torch.cat([w.wq.dequantize(), w.wk.dequantize(), w.wv.dequantize()]).T
    torch.testing.assert_close(layer.qkv(x).cpu(), expected, rtol=1e-5, atol=1e-4)


def test_whole_prompt_matches_the_torch_reference(backends):
    ref, tri = backends
    assert_same_predictions(tri.forward_tokens([IDS]).cpu(), ref.forward_tokens([IDS]).cpu())


def test_chunked_prefill_and_decode_match_the_whole_prompt(backends):
    """Pieces exercise all three attention paths: flash on a fresh prompt, paged flash after cached tokens, paged
    decode for single tokens."""
    ref, tri = backends
    whole = ref.forward_tokens([IDS]).cpu()
    cache = tri.new_cache(1, 32, block_size=4)
    pieces = [tri.forward_tokens([IDS[a:b]], cache, start=a) for a, b in ((0, 7), (7, 8), (8, 13), (13, 14),
                                                                              (14, 19))]
    assert cache.length == len(IDS)
    assert_same_predictions(torch.cat(pieces, dim=1).cpu(), whole)


@pytest.mark.parametrize(("prompts", "cached", "num_decode"), [
    ([IDS[:7], IDS[:11], IDS[5:17]], [0, 10, 4], 0),  # a fresh prompt, a decode, a chunk: all paged flash attention
    ([IDS[:11], IDS[2:19], IDS[:7], IDS[5:17]], [10, 16, 0, 4], 2),  # decodes first: paged decode for those two
])
def test_ragged_batch_matches_the_torch_reference_on_the_same_batch(backends, prompts, cached, num_decode):
    """Fresh prompts, decode steps and chunks after cached tokens in one launch, each sequence's blocks scattered."""
    ref, tri = backends
    free = list(range(16))[::-1]  # blocks handed out from the top: each sequence's blocks scattered
    tables = [tuple(free.pop(0) for _ in range(-(-len(p) // 4))) for p in prompts]
    early = StepPlan(4, tuple(ChunkPlan(b, 0, tuple(p[:n]), t, (n - 1,))
                              for b, (p, n, t) in enumerate(zip(prompts, cached, tables, strict=True)) if n))
    step = StepPlan(4, tuple(ChunkPlan(b, n, tuple(p[n:]), t, tuple(range(len(p) - n)))
                             for b, (p, n, t) in enumerate(zip(prompts, cached, tables, strict=True))))
    logits = []
    for model in (ref, tri):
        cache = PagedKVCache.allocate(model.config, 16, 4, model.dtype, model.device)
        model.forward(ForwardBatch.build(early, 16, model.device), cache)
        batch = ForwardBatch.build(step, 16, model.device)
        assert not batch.is_fresh_prefill and batch.num_decode == num_decode
        logits.append(model.forward(batch, cache).cpu())
    assert_same_predictions(logits[1], logits[0])


def test_greedy_generation_matches_the_torch_backend(tiny_weights):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [Model(tiny_weights, StubTokenizer(DIMS["vocab"]), backend, device, torch.float32)
              for backend in (Backend.TORCH, Backend.TRITON)]
    outs = [m.generate(IDS[:9], max_tokens=10) for m in models]
    assert models[1].transformer.backend is Backend.TRITON and models[1].transformer.ops is ops_for("triton")
    assert outs[1].token_ids == outs[0].token_ids and len(outs[0].token_ids) == 10


def test_qwen2_biases(tmp_path):
    write_tiny_llama(tmp_path / "qwen.gguf", arch="qwen2", formats={"attn_q": "Q8_0", "ffn_down": "Q8_0"})
    w = load_weights(tmp_path / "qwen.gguf")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = TritonModel(w, device, torch.float32)
    assert tri.layers[0].qkv.bias is not None
    assert_same_predictions(tri.forward_tokens([IDS[:11]]).cpu(), TorchModel(w, device).forward_tokens([IDS[:11]]))


def test_errors(tiny_weights, backends, monkeypatch):
    tri = backends[1]
    with pytest.raises(ValueError, match=r"dtype must be float32, float16 or bfloat16, got torch\.float64"):
        TritonModel(tiny_weights, tri.device, torch.float64)
    if tri.device.type == "cpu":
        with pytest.raises(ValueError, match="cannot run bfloat16 on CPU"):
            TritonModel(tiny_weights, "cpu", torch.bfloat16)
    wrong = PagedKVCache.allocate(tri.config, 4, 4, torch.float16, tri.device)
    message = r"the KV cache is torch\.float16 on .*; this model computes in torch\.float32"
    with pytest.raises(ValueError, match=message):
        tri.forward(ForwardBatch.build(StepPlan(4, (ChunkPlan(0, 0, (1, 2, 3), (0,), (2,)),)), 4, tri.device), wrong)
    monkeypatch.setattr(qdecode, "INTERPRETED", False)
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1 before Triton is imported"):
        TritonModel(tiny_weights, "cpu", torch.float32)


def test_a_linear_of_one_weight_is_one_prepared_qmatmul(tiny_weights):
    w = tiny_weights.layers[1].w_down
    lin = Linear.build("down", [w], None, ops_for("triton"), torch.device("cpu"), torch.float32)
    assert len(lin.parts) == 1 and lin.sizes == (DIMS["hidden"],) and lin.parts[0].w.fmt == w.fmt
    assert isinstance(lin.parts[0], PreparedWeight)


# ------------------------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_smollm2_triton_backend_matches_the_torch_backend(smollm2):
    """The acceptance test: the whole model through realm's kernels (the interpreter on CPU) gives the torch
    backend's greedy tokens on a short prompt, and logits under the model tolerance at every prompt position."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri = realm.load("smollm2", device=device, backend="triton", dtype=torch.float32)
    assert isinstance(tri.transformer, Transformer) and tri.transformer.backend is Backend.TRITON
    ids = smollm2.encode("The capital of France is", add_bos=False)
    assert_same_predictions(tri.forward(torch.tensor([ids])).cpu(), smollm2.forward(torch.tensor([ids])))
    assert tri.generate(ids, max_tokens=4).token_ids == smollm2.generate(ids, max_tokens=4).token_ids


@pytest.mark.gpu
def test_smollm2_triton_float16_on_cuda(smollm2):
    """float16 activations through the kernels vs the float32 reference: most positions of a paragraph pick the same
    token (float16 rounding flips near ties), the KL stays small, and the chat answer is unchanged."""
    tri = realm.load("smollm2", device="cuda", backend="triton")
    assert tri.dtype == torch.float16
    ids = torch.tensor([smollm2.encode(PARAGRAPH, add_bos=False)])
    ours, ref = tri.forward(ids).float().cpu(), smollm2.forward(ids)
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, f"float16 agrees with float32 on {agreement:.1%} of positions"
    assert kl_per_position(ref, ours).max() <= MODEL_KL[torch.float16]
    assert "Paris" in tri.chat("What is the capital of France?", max_tokens=32).text
