"""The CPU twin's own graph: every decoder layer in one ONNX model, attention on a shared cache.

The per-layer graphs (``layer_graphs.build_layer``) keep AXERA's contract: a layer takes the
history ``(1, P, kv_dim)`` and returns the new rows, so each token slices and concatenates the
whole history before attending, and a token is 30 session calls. The twin graph takes a
conversation's caches head-major, ``(1, kv_heads, capacity, head_dim)`` per layer, as ONNX
Runtime's ``GroupQueryAttention`` reads them: the cache is fed as ``past_key_<i>`` and bound
again as ``present_key_<i>`` (the same buffer, ``past_present_share_buffer``), so the operator
writes the chunk's rows in place and attends over the ``total_sequence_length`` rows in use,
rotary embedding included. ``seqlens_k`` is that total minus one; a chunk of ``T`` tokens at
``start`` gives ``start + T``. One run per token (or per prefill chunk) for the whole stack.

The residual adds and the next layer's norm are one ``SkipSimplifiedLayerNormalization``, and
q/k/v reach the attention packed when they share a form. Between the attentions the activations
are 2-D ``(T, features)``, so the exact offsets of GGUF Q4_1 weights (``quant4``) join their
matmul's result in one ``Gemm`` (``C`` input) rather than a ``MatMul`` and an ``Add``: a decode
token's cost is mostly per operator (10% less CPU per token on the demo model).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from npu.convert.layer_graphs import (
    LayerShape,
    LayerWeights,
    Weight,
    _Graph,
    _rope_cache,
    _same_form,
    concat_weights,
)
from npu.convert.quant4 import BLOCK, OffsetQuantWeight
from npu.llm.twin_names import past_names, present_names


class _FlatGraph(_Graph):
    """``_Graph`` on 2-D activations ``(T, features)``: block sums per row, offsets in a Gemm."""

    def block_sums(self, x: str, k: int) -> str:
        name = self._block_sums.get(x)
        if name is None:
            blocks = self.op("Reshape", [x, self.const_i64("shape", [-1, k // BLOCK, BLOCK])], "x_blocks")
            name = self._block_sums[x] = self.op(
                "ReduceSum", [blocks, self.const_i64("axes", [-1])], "x_block_sums", keepdims=0
            )
        return name

    def linear(self, x: str, w: Weight, hint: str, bias: np.ndarray | None = None) -> str:
        if not isinstance(w, OffsetQuantWeight):
            return super().linear(x, w, hint, bias)
        main = self.nbits(x, w.base, f"{hint}_codes")
        offsets = self.init(f"{hint}_offsetsT", np.ascontiguousarray(w.offsets.T))
        y = self.op("Gemm", [self.block_sums(x, w.k), offsets, main], hint)  # sums @ offsets + main
        if bias is not None:
            y = self.op("Add", [y, self.init(f"{hint}_b", bias.astype(np.float32))], f"{hint}_biased")
        return y

    def to_3d(self, x: str, width: int) -> str:
        """``(T, width)`` as the attention takes it, ``(1, T, width)``."""
        return self.op("Reshape", [x, self.const_i64("batch", [1, -1, width])])


def _attention(g: _FlatGraph, h: str, w: LayerWeights, shape: LayerShape, i: int, cos: str, sin: str) -> str:
    """q/k/v projections and GroupQueryAttention over layer ``i``'s shared cache; the context
    ``(T, heads * head_dim)``."""
    hd, nh, nkv = shape.head_dim, shape.n_heads, shape.n_kv_heads
    qkv = [w.q, w.k, w.v]
    biases = [w.q_bias, w.k_bias, w.v_bias]
    if _same_form(qkv) and w.q_norm is None and w.k_norm is None:
        packed = g.linear(h, concat_weights(qkv), f"l{i}_qkv_proj", _joined_bias(qkv, biases))
        q, k, v = g.to_3d(packed, (nh + 2 * nkv) * hd), "", ""
    else:
        if _same_form(qkv):
            q, k, v = g.linears(h, qkv, f"l{i}_qkv_proj", biases)
        else:
            q, k, v = (g.linear(h, m, f"l{i}_{n}_proj", b)
                       for m, n, b in zip(qkv, "qkv", biases, strict=True))
        if w.q_norm is not None:
            q = g.op("Reshape", [q, g.const_i64("shape", [-1, nh, hd])], f"l{i}_q_heads")
            q = g.rms_norm(q, w.q_norm, shape.rms_eps, f"l{i}_q_norm")
        if w.k_norm is not None:
            k = g.op("Reshape", [k, g.const_i64("shape", [-1, nkv, hd])], f"l{i}_k_heads")
            k = g.rms_norm(k, w.k_norm, shape.rms_eps, f"l{i}_k_norm")
        q, k, v = g.to_3d(q, nh * hd), g.to_3d(k, nkv * hd), g.to_3d(v, nkv * hd)
    g.uses_ms = True
    ctx = g.name(f"l{i}_ctx")
    pk, pv = past_names(i)
    outs = [ctx, *present_names(i)]
    g.nodes.append(helper.make_node(
        "GroupQueryAttention", [q, k, v, pk, pv, "seqlens_k", "total_sequence_length", cos, sin], outs,
        domain="com.microsoft", num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
    ))
    return g.op("Reshape", [ctx, g.const_i64("rows", [-1, nh * hd])], f"l{i}_ctx_rows")


def _joined_bias(ws: list[Weight], biases: list[np.ndarray | None]) -> np.ndarray | None:
    """The biases of joined projections, zeros where one has none; ``None`` if none has any."""
    if all(b is None for b in biases):
        return None
    sizes = [w.shape[0] if isinstance(w, np.ndarray) else w.n for w in ws]
    return np.concatenate([b if b is not None else np.zeros(n, np.float32)
                           for n, b in zip(sizes, biases, strict=True)])


class TwinGraph:
    """Builds the twin graph one layer at a time, so a converter holds one layer's weights at once:
    ``add`` each layer in order (its initializers are then ``g.inits[mark:]``), then ``model``."""

    def __init__(self, shape: LayerShape, max_positions: int = 2048) -> None:
        self.shape = shape
        self.g = _FlatGraph()
        cos_table, sin_table = _rope_cache(shape, max_positions)
        self._cos, self._sin = self.g.init("rope_cos", cos_table), self.g.init("rope_sin", sin_table)
        self._x = self.g.op("Reshape", ["input", self.g.const_i64("rows", [-1, shape.hidden])], "input_rows")
        self._pending = ""  # the MLP output not yet added to the residual
        self.layers = 0

    def add(self, w: LayerWeights) -> None:
        g, shape, i = self.g, self.shape, self.layers
        if not self._pending:
            h = g.rms_norm(self._x, w.attn_norm, shape.rms_eps, f"l{i}_attn_norm")
        else:
            h, self._x = g.skip_rms_norm(self._pending, self._x, w.attn_norm, shape.rms_eps,
                                         f"l{i}_attn_norm")
        ctx = _attention(g, h, w, shape, i, self._cos, self._sin)
        h, self._x = g.skip_rms_norm(g.linear(ctx, w.o, f"l{i}_o_proj"), self._x, w.ffn_norm, shape.rms_eps,
                                     f"l{i}_ffn_norm")
        if _same_form([w.gate, w.up]):
            gate, up = g.linears(h, [w.gate, w.up], f"l{i}_gate_up_proj", [None, None])
        else:
            gate, up = g.linear(h, w.gate, f"l{i}_gate_proj"), g.linear(h, w.up, f"l{i}_up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], f"l{i}_silu")
        self._pending = g.linear(g.op("Mul", [act, up], f"l{i}_gated"), w.down, f"l{i}_down_proj")
        self.layers += 1

    def model(self) -> onnx.ModelProto:
        """``input`` ``(1, T, hidden)`` in, ``output`` out; each layer's cache ``past_*_<i>`` in and
        ``present_*_<i>`` out, bound to the same buffer."""
        if not self.layers:
            raise ValueError("a twin graph needs at least one layer")
        last = self.g.op("Add", [self._x, self._pending], "residual")
        batch = self.g.const_i64("batch", [1, -1, self.shape.hidden])
        self.g.nodes.append(helper.make_node("Reshape", [last, batch], ["output"]))
        shape, f32 = self.shape, TensorProto.FLOAT
        cache: list[str | int] = [1, shape.n_kv_heads, "C", shape.head_dim]
        inputs = [
            helper.make_tensor_value_info("input", f32, [1, "T", shape.hidden]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        outputs = [helper.make_tensor_value_info("output", f32, [1, "T", shape.hidden])]
        for i in range(self.layers):
            inputs += [helper.make_tensor_value_info(n, f32, cache) for n in past_names(i)]
            outputs += [helper.make_tensor_value_info(n, f32, cache) for n in present_names(i)]
        return self.g.model("twin", inputs, outputs)


def build_twin(layers: list[LayerWeights], shape: LayerShape, max_positions: int = 2048) -> onnx.ModelProto:
    """All ``layers`` as one twin graph (see ``TwinGraph``)."""
    twin = TwinGraph(shape, max_positions)
    for w in layers:
        twin.add(w)
    return twin.model()
