"""ONNX graphs of one decoder layer and of the post model, with AXERA's tensor contract.

One layer graph serves every shape group: ``P``, ``T`` and ``W`` are symbolic, and the history
length ``H = W - T`` comes from the mask's shape, so the same file takes the decode feeds
(``P = kv_cache_len``, ``T = 1``) and every prefill chunk (a one-row dummy cache for chunk 0).
Attention runs per kv head on 5-D tensors ``(1, kv_heads, group, T, S)`` so grouped-query heads
share K/V by broadcasting instead of copying them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from npu.convert.quant4 import BLOCK, Int8Weight, IntQuantWeight, OffsetQuantWeight, QuantWeight

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 9  # ONNX Runtime >= 1.16 loads it
# MatMulNBits computes with int8 activations per block on its fast kernels (as llama.cpp's
# quantized dot products do); float zero points have no such path.
FAST_ACCURACY_LEVEL = 4
Weight = np.ndarray | QuantWeight | IntQuantWeight | OffsetQuantWeight | Int8Weight


@dataclass
class LayerWeights:
    """One decoder layer, matrices ``[out, in]`` as in Hugging Face (or 4-bit packs)."""

    attn_norm: np.ndarray
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    ffn_norm: np.ndarray
    gate: Weight
    up: Weight
    down: Weight
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class _Graph:
    """Tiny builder: unique names, initializers and nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self.uses_ms = False
        self._block_sums: dict[str, str] = {}

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const_i64(self, hint: str, values: list[int]) -> str:
        return self.init(hint, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1,
           domain: str | None = None, **attrs: object) -> str:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0]

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, hint: str) -> str:
        """Hugging Face RMSNorm: ``w * x / sqrt(mean(x^2) + eps)`` over the last axis."""
        sq = self.op("Mul", [x, x], f"{hint}_sq")
        mean = self.op("ReduceMean", [sq], f"{hint}_mean", axes=[-1], keepdims=1)
        eps_c = self.init(f"{hint}_eps", np.array(eps, dtype=np.float32))
        root = self.op("Sqrt", [self.op("Add", [mean, eps_c])], f"{hint}_rms")
        normed = self.op("Div", [x, root], f"{hint}_normed")
        return self.op("Mul", [normed, self.init(f"{hint}_w", weight.astype(np.float32))], hint)

    def block_sums(self, x: str, k: int) -> str:
        """``x`` summed over each block of 32 inputs, ``(..., k / 32)``; once per input."""
        name = self._block_sums.get(x)
        if name is None:
            blocks = self.op("Reshape", [x, self.const_i64("shape", [0, 0, k // BLOCK, BLOCK])], "x_blocks")
            name = self._block_sums[x] = self.op(
                "ReduceSum", [blocks, self.const_i64("axes", [-1])], "x_block_sums", keepdims=0
            )
        return name

    def nbits(self, x: str, w: IntQuantWeight | Int8Weight, hint: str) -> str:
        self.uses_ms = True
        inputs = [x, self.init(f"{hint}_q", w.packed), self.init(f"{hint}_scales", w.scales)]
        bits = 8 if isinstance(w, Int8Weight) else 4
        if isinstance(w, IntQuantWeight):
            inputs.append(self.init(f"{hint}_zp", w.zero_points))
        return self.op("MatMulNBits", inputs, hint, domain="com.microsoft", K=w.k, N=w.n, bits=bits,
                       block_size=BLOCK, accuracy_level=FAST_ACCURACY_LEVEL)

    def linear(self, x: str, w: Weight, hint: str, bias: np.ndarray | None = None) -> str:
        if isinstance(w, IntQuantWeight | Int8Weight):
            y = self.nbits(x, w, hint)
        elif isinstance(w, OffsetQuantWeight):
            main = self.nbits(x, w.base, f"{hint}_codes")
            offsets = self.init(f"{hint}_offsetsT", np.ascontiguousarray(w.offsets.T))
            y = self.op("Add", [main, self.op("MatMul", [self.block_sums(x, w.k), offsets])], hint)
        elif isinstance(w, QuantWeight):
            self.uses_ms = True
            inputs = [
                x,
                self.init(f"{hint}_q4", w.packed),
                self.init(f"{hint}_scales", w.scales),
                self.init(f"{hint}_zp", w.zero_points),
            ]
            y = self.op("MatMulNBits", inputs, hint, domain="com.microsoft",
                        K=w.k, N=w.n, bits=4, block_size=BLOCK)
        else:
            y = self.op("MatMul", [x, self.init(f"{hint}_wT", np.asarray(w, np.float32).T)], hint)
        if bias is not None:
            y = self.op("Add", [y, self.init(f"{hint}_b", bias.astype(np.float32))], f"{hint}_biased")
        return y

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="npu.convert")
        model.ir_version = IR_VERSION
        return model


def _rope_tables(g: _Graph, indices: str, shape: LayerShape) -> tuple[str, str]:
    """cos and signed sin ``(1, T, 1, head_dim)`` so ``rot = x*cos + swap_halves(x)*sin``."""
    half = shape.head_dim // 2
    exps = np.arange(0, shape.head_dim, 2, dtype=np.float32) / np.float32(shape.head_dim)
    inv_freq = (1.0 / (np.float32(shape.rope_theta) ** exps)).astype(np.float32)
    pos = g.op("Cast", [indices], "positions", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const_i64("ax", [-1])], "positions_col")  # (1, T, 1)
    freqs = g.op("Mul", [pos, g.init("inv_freq", inv_freq.reshape(1, 1, half))], "freqs")
    cos_h = g.op("Cos", [freqs], "cos_half")
    sin_h = g.op("Sin", [freqs], "sin_half")
    cos = g.op("Concat", [cos_h, cos_h], "cos", axis=-1)
    sin = g.op("Concat", [g.op("Neg", [sin_h]), sin_h], "sin", axis=-1)
    axis2 = g.const_i64("ax", [2])
    return g.op("Unsqueeze", [cos, axis2], "cos4"), g.op("Unsqueeze", [sin, axis2], "sin4")


def _apply_rope(g: _Graph, x: str, cos: str, sin: str, head_dim: int, hint: str) -> str:
    half = head_dim // 2
    split = g.const_i64("split", [half, half])
    x1 = g.name(f"{hint}_x1")
    x2 = g.name(f"{hint}_x2")
    g.nodes.append(helper.make_node("Split", [x, split], [x1, x2], axis=-1))
    swapped = g.op("Concat", [x2, x1], f"{hint}_swap", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [swapped, sin])], f"{hint}_rope")


def build_layer(w: LayerWeights, shape: LayerShape, index: int) -> onnx.ModelProto:
    """One decoder layer with inputs K_cache, V_cache, indices, input, mask."""
    g = _Graph()
    hd, nkv = shape.head_dim, shape.n_kv_heads
    group = shape.n_heads // nkv
    x = "input"

    # Attention block.
    h = g.rms_norm(x, w.attn_norm, shape.rms_eps, "attn_norm")
    q = g.linear(h, w.q, "q_proj", w.q_bias)
    k = g.linear(h, w.k, "k_proj", w.k_bias)
    v = g.linear(h, w.v, "v_proj", w.v_bias)
    q = g.op("Reshape", [q, g.const_i64("shape", [0, 0, shape.n_heads, hd])], "q_heads")
    k = g.op("Reshape", [k, g.const_i64("shape", [0, 0, nkv, hd])], "k_heads")
    if w.q_norm is not None:
        q = g.rms_norm(q, w.q_norm, shape.rms_eps, "q_norm")
    if w.k_norm is not None:
        k = g.rms_norm(k, w.k_norm, shape.rms_eps, "k_norm")
    cos, sin = _rope_tables(g, "indices", shape)
    q = _apply_rope(g, q, cos, sin, hd, "q")
    k = _apply_rope(g, k, cos, sin, hd, "k")
    kv_shape = g.const_i64("shape", [0, 0, shape.kv_dim])
    g.nodes.append(helper.make_node("Reshape", [k, kv_shape], ["K_cache_out"]))
    g.nodes.append(helper.make_node("Identity", [v], ["V_cache_out"]))

    # History rows used: H = W - T, from the mask's shape.
    width = g.op("Shape", ["mask"], "mask_w", start=2, end=3)
    steps = g.op("Shape", ["mask"], "mask_t", start=1, end=2)
    hist = g.op("Sub", [width, steps], "hist_len")
    zero, axis1 = g.const_i64("zero", [0]), g.const_i64("axis1", [1])
    k_hist = g.op("Slice", ["K_cache", zero, hist, axis1], "k_hist")
    v_hist = g.op("Slice", ["V_cache", zero, hist, axis1], "v_hist")
    k_all = g.op("Concat", [k_hist, "K_cache_out"], "k_all", axis=1)  # (1, S, kv_dim)
    v_all = g.op("Concat", [v_hist, "V_cache_out"], "v_all", axis=1)
    kv5 = g.const_i64("shape", [0, 0, nkv, 1, hd])
    k_t = g.op("Transpose", [g.op("Reshape", [k_all, kv5])], "k_t", perm=[0, 2, 3, 4, 1])  # (1,nkv,1,hd,S)
    v_5 = g.op("Transpose", [g.op("Reshape", [v_all, kv5])], "v_5", perm=[0, 2, 3, 1, 4])  # (1,nkv,1,S,hd)
    q5 = g.op("Reshape", [q, g.const_i64("shape", [0, 0, nkv, group, hd])], "q5")
    q5 = g.op("Transpose", [q5], "q_t", perm=[0, 2, 3, 1, 4])  # (1, nkv, group, T, hd)
    q5 = g.op("Mul", [q5, g.init("scale", np.array(1.0 / np.sqrt(hd), dtype=np.float32))], "q_scaled")
    scores = g.op("MatMul", [q5, k_t], "scores")  # (1, nkv, group, T, S)
    mask5 = g.op("Unsqueeze", ["mask", g.const_i64("axes", [1, 2])], "mask5")
    probs = g.op("Softmax", [g.op("Add", [scores, mask5], "masked")], "probs", axis=-1)
    ctx = g.op("MatMul", [probs, v_5], "ctx")  # (1, nkv, group, T, hd)
    ctx = g.op("Transpose", [ctx], "ctx_t", perm=[0, 3, 1, 2, 4])
    ctx = g.op("Reshape", [ctx, g.const_i64("shape", [0, 0, -1])], "ctx_flat")
    x = g.op("Add", [x, g.linear(ctx, w.o, "o_proj")], "attn_residual")

    # SwiGLU MLP.
    h = g.rms_norm(x, w.ffn_norm, shape.rms_eps, "ffn_norm")
    gate = g.linear(h, w.gate, "gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu")
    mlp = g.linear(g.op("Mul", [act, g.linear(h, w.up, "up_proj")], "gated"), w.down, "down_proj")
    g.nodes.append(helper.make_node("Add", [x, mlp], ["output"]))

    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("K_cache", f32, [1, "P", shape.kv_dim]),
        helper.make_tensor_value_info("V_cache", f32, [1, "P", shape.kv_dim]),
        helper.make_tensor_value_info("indices", TensorProto.UINT32, [1, "T"]),
        helper.make_tensor_value_info("input", f32, [1, "T", shape.hidden]),
        helper.make_tensor_value_info("mask", f32, [1, "T", "W"]),
    ]
    outputs = [
        helper.make_tensor_value_info("K_cache_out", f32, [1, "T", shape.kv_dim]),
        helper.make_tensor_value_info("V_cache_out", f32, [1, "T", shape.kv_dim]),
        helper.make_tensor_value_info("output", f32, [1, "T", shape.hidden]),
    ]
    return g.model(f"decoder_layer_{index}", inputs, outputs)


def build_post(norm: np.ndarray, lm_head: Weight, hidden: int, vocab: int, eps: float) -> onnx.ModelProto:
    """Final RMSNorm and LM head: ``input`` (1, 1, hidden) -> ``output`` (1, 1, vocab)."""
    g = _Graph()
    h = g.rms_norm("input", norm, eps, "final_norm")
    logits = g.linear(h, lm_head, "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["output"]))
    f32 = TensorProto.FLOAT
    return g.model(
        "post",
        [helper.make_tensor_value_info("input", f32, [1, 1, hidden])],
        [helper.make_tensor_value_info("output", f32, [1, 1, vocab])],
    )
