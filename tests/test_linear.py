"""The linear layer's epilogue contract (realm.runtime.linear): y = x @ W.T + bias, then the per-row deltas (where a
LoRA delta goes), then the reduce (where a tensor-parallel all-reduce goes), in that order, on both backends, and
the one model definition calling every layer through it."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_llama
from tolerances import assert_close, assert_same_predictions, dot_magnitude

from realm.runtime import Backend, Transformer, load_weights
from realm.runtime.linear import Linear
from realm.runtime.ops import ops_for

IDS = [3, 17, 42, 8, 8, 0, 49, 21, 5, 30, 11]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, arch="qwen2", dims=dict(hidden=64, ffn=96), formats={"attn_q": "Q8_0", "attn_k": "Q8_0",
                                                                               "attn_v": "Q4_0"}, context_length=32)
    return load_weights(path)


@pytest.mark.parametrize("backend", list(Backend))
def test_epilogue_order_bias_then_deltas_then_reduce(tiny_weights, backend):
    w = tiny_weights.layers[0]
    lin = Linear.build("qkv", [w.wq, w.wk, w.wv], w.qkv_bias(), ops_for(backend), torch.device("cpu"), torch.float32)
    assert len(lin.parts) == (2 if backend is Backend.TRITON else 1)  # Q8_0 rows, Q4_0 rows: two launches
    x = torch.randn(5, 64)
    dense = torch.cat([w.wq.dequantize(), w.wk.dequantize(), w.wv.dequantize()])
    plain = x @ dense.T + w.qkv_bias()
    assert_close(lin(x), plain, magnitude=dot_magnitude(x, dense) + w.qkv_bias().abs())
    seen = []
    a, b = torch.randn(2, 64), torch.randn(lin.out_features, 2)  # a rank-2 "adapter" on rows 1 and 3 only

    def lora(x_, y, batch):
        seen.append(("delta", y.clone(), batch))
        rows = torch.tensor(batch["rows"])
        y[rows] += (x_[rows] @ a.T) @ b.T

    def reduce(y):
        seen.append(("reduce", y.clone(), None))
        return y * 2  # a stand-in for the sum over 2 ranks holding the same partial result

    lin.deltas.append(lora)
    lin.reduce = reduce
    out = lin(x, {"rows": [1, 3]})
    assert [s[0] for s in seen] == ["delta", "reduce"]
    assert_close(seen[0][1], plain, magnitude=dot_magnitude(x, dense) + w.qkv_bias().abs())  # bias before the delta
    expected = plain.clone()
    expected[[1, 3]] += (x[[1, 3]] @ a.T) @ b.T
    # the delta before the reduce; the loose bound covers the quantized matmul's other summation order (seen[0] is
    # checked against the dot-product bound above) and the delta's two float32 products: an order error is O(1)
    assert_close(seen[1][1], expected, atol=1e-4, rtol=1e-4)
    assert_close(out, 2 * expected, atol=2e-4, rtol=1e-4)


def test_linear_checks_its_weights(tiny_weights):
    w = tiny_weights.layers[0]
    ops = ops_for(Backend.TORCH)
    with pytest.raises(ValueError, match=r"qkv: bias has shape \[3\], expected \[128\]"):
        Linear.build("qkv", [w.wq, w.wk, w.wv], torch.zeros(3), ops, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="o: weights read inputs of different sizes"):
        Linear.build("o", [w.wq, w.w_down], None, ops, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", list(Backend))
def test_a_delta_on_every_layer_changes_both_backends_alike(tiny_weights, backend):
    """The model calls every linear layer through the contract: a delta hooked on each (here: one that scales the
    rows of the batch's first sequence) moves the Triton forward as it moves the reference."""
    nets = {b: Transformer(tiny_weights, b, "cpu") for b in Backend}
    for net in nets.values():
        assert len(net.linears()) == 4 * len(net.layers) + 1
    before = {b: net.forward_tokens([IDS, IDS[::-1]]) for b, net in nets.items()}
    calls = []

    def nudge(x, y, batch):
        calls.append(batch.num_tokens)
        first = batch.query_lens[0]
        y[:first] *= 1.05

    for net in nets.values():
        for lin in net.linears():
            lin.deltas.append(nudge)
    after = {b: net.forward_tokens([IDS, IDS[::-1]]) for b, net in nets.items()}
    assert calls and all(n == 2 * len(IDS) for n in calls[:-2])  # the head sees only the logits rows
    assert_same_predictions(after[backend], after[Backend.TORCH])
    assert not torch.allclose(after[backend][0], before[backend][0], atol=1e-3)  # the first sequence moved
    assert_same_predictions(after[backend][1:], before[backend][1:])  # the second did not
