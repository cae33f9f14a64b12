"""ONNX graphs of one decoder layer and of the post model, with AXERA's tensor contract.

One layer graph serves every shape group: ``P``, ``T`` and ``W`` are symbolic, and the history
length ``H = W - T`` comes from the mask's shape, so the same file takes the decode feeds
(``P = kv_cache_len``, ``T = 1``) and every prefill chunk (a one-row dummy cache for chunk 0).
Attention is ONNX's ``Attention`` (opset 23) on ``(1, T, heads * head_dim)`` tensors, grouped-query
heads sharing K/V inside the operator, the mask added to every head's scores. These graphs are
the CPU twin's only (the NPU runs AXERA's compiled ``.axmodel`` files), so they use fused
operators: ONNX's and ONNX Runtime's contrib ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from npu.convert.quant4 import BLOCK, Int8Weight, IntQuantWeight, OffsetQuantWeight, QuantWeight

logger = logging.getLogger(__name__)

OPSET = 23  # RMSNormalization
IR_VERSION = 10  # ONNX Runtime >= 1.22 loads it
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
        """Hugging Face RMSNorm, ``w * x / sqrt(mean(x^2) + eps)`` over the last axis, as one op."""
        w = self.init(f"{hint}_w", weight.astype(np.float32))
        return self.op("RMSNormalization", [x, w], hint, axis=-1, epsilon=eps)

    def skip_rms_norm(self, x: str, skip: str, weight: np.ndarray, eps: float, hint: str) -> tuple[str, str]:
        """``x + skip`` and its RMSNorm in one op (ONNX Runtime's fused residual norm)."""
        self.uses_ms = True
        w = self.init(f"{hint}_w", weight.astype(np.float32))
        normed, total = self.name(hint), self.name(f"{hint}_residual")
        self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, w],
                                           [normed, "", "", total], domain="com.microsoft", epsilon=eps))
        return normed, total

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

    def linears(self, x: str, ws: list[Weight], hint: str, biases: list[np.ndarray | None]) -> list[str]:
        """Several projections of one input as one matmul and a split (fewer, larger kernels)."""
        joined = concat_weights(ws)
        bias = None
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(w.shape[0] if isinstance(w, np.ndarray)
                                   else w.n, np.float32) for w, b in zip(ws, biases, strict=True)])
        y = self.linear(x, joined, hint, bias)
        sizes = [w.shape[0] if isinstance(w, np.ndarray) else w.n for w in ws]
        outs = [self.name(f"{hint}_{i}") for i in range(len(ws))]
        self.nodes.append(helper.make_node("Split", [y, self.const_i64("split", sizes)], outs, axis=-1))
        return outs

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="npu.convert")
        model.ir_version = IR_VERSION
        return model


def concat_weights(ws: list[Weight]) -> Weight:
    """Stack ``[out, in]`` matrices of one input along ``out``, in the form they share."""
    first = ws[0]
    if isinstance(first, np.ndarray):
        return np.concatenate([np.asarray(w, np.float32) for w in ws], axis=0)
    if isinstance(first, OffsetQuantWeight):
        return OffsetQuantWeight(concat_weights([w.base for w in ws]),  # type: ignore[union-attr,arg-type]
                                 np.concatenate([w.offsets for w in ws], axis=0))  # type: ignore[union-attr]
    if isinstance(first, IntQuantWeight | Int8Weight | QuantWeight):
        if any(type(w) is not type(first) or w.k != first.k for w in ws):  # type: ignore[union-attr]
            raise ValueError("matrices of one input must share their form to be joined")
        fields = {"packed": np.concatenate([w.packed for w in ws], axis=0),  # type: ignore[union-attr]
                  "scales": np.concatenate([w.scales for w in ws]),  # type: ignore[union-attr]
                  "n": sum(w.n for w in ws), "k": first.k}  # type: ignore[union-attr]
        if not isinstance(first, Int8Weight):
            fields["zero_points"] = np.concatenate([w.zero_points for w in ws])  # type: ignore[union-attr]
        return type(first)(**fields)  # type: ignore[arg-type]
    raise TypeError(f"cannot join weights of type {type(first).__name__}")


def _same_form(ws: list[Weight]) -> bool:
    return all(type(w) is type(ws[0]) for w in ws)


def _rope_cache(shape: LayerShape, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``(max_positions, head_dim / 2)`` as Hugging Face computes them (float32)."""
    exps = np.arange(0, shape.head_dim, 2, dtype=np.float32) / np.float32(shape.head_dim)
    inv_freq = (1.0 / (np.float32(shape.rope_theta) ** exps)).astype(np.float32)
    freqs = (np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _rope(g: _Graph, x: str, positions: str, cos: str, sin: str, heads: int, hint: str) -> str:
    """Hugging Face's rotate-half RoPE on ``(1, T, heads * head_dim)`` in one fused op."""
    g.uses_ms = True
    return g.op("RotaryEmbedding", [x, positions, cos, sin], f"{hint}_rope", domain="com.microsoft",
                interleaved=0, num_heads=heads)


def build_layer(w: LayerWeights, shape: LayerShape, index: int, max_positions: int = 2048) -> onnx.ModelProto:
    """One decoder layer with inputs K_cache, V_cache, indices, input, mask.

    ``max_positions`` bounds the positions the rotary tables hold (the bundle's ``kv_cache_len``).
    The norms, the rotary embedding and the residual norm are ONNX Runtime's fused operators,
    and projections of one input run as one matmul: a decode token's cost is mostly per node.
    """
    g = _Graph()
    hd, nkv = shape.head_dim, shape.n_kv_heads
    x = "input"

    # Attention block.
    h = g.rms_norm(x, w.attn_norm, shape.rms_eps, "attn_norm")
    if _same_form([w.q, w.k, w.v]):
        q, k, v = g.linears(h, [w.q, w.k, w.v], "qkv_proj", [w.q_bias, w.k_bias, w.v_bias])
    else:
        q, k, v = (g.linear(h, m, f"{n}_proj", b) for m, n, b in
                   ((w.q, "q", w.q_bias), (w.k, "k", w.k_bias), (w.v, "v", w.v_bias)))
    if w.q_norm is not None:
        q4 = g.op("Reshape", [q, g.const_i64("shape", [0, 0, shape.n_heads, hd])], "q_heads")
        q4 = g.rms_norm(q4, w.q_norm, shape.rms_eps, "q_norm")
        q = g.op("Reshape", [q4, g.const_i64("flat", [0, 0, -1])])
    if w.k_norm is not None:
        k4 = g.op("Reshape", [k, g.const_i64("shape", [0, 0, nkv, hd])], "k_heads")
        k4 = g.rms_norm(k4, w.k_norm, shape.rms_eps, "k_norm")
        k = g.op("Reshape", [k4, g.const_i64("flat", [0, 0, -1])])
    cos_table, sin_table = _rope_cache(shape, max_positions)
    cos, sin = g.init("rope_cos", cos_table), g.init("rope_sin", sin_table)
    positions = g.op("Cast", ["indices"], "positions", to=TensorProto.INT64)
    q = _rope(g, q, positions, cos, sin, shape.n_heads, "q")
    k = _rope(g, k, positions, cos, sin, nkv, "k")
    g.nodes.append(helper.make_node("Identity", [k], ["K_cache_out"]))
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
    mask4 = g.op("Unsqueeze", ["mask", axis1], "mask4")  # (1, 1, T, S), every head alike
    ctx = g.op("Attention", [q, k_all, v_all, mask4], "ctx", q_num_heads=shape.n_heads, kv_num_heads=nkv)
    h, x = g.skip_rms_norm(g.linear(ctx, w.o, "o_proj"), x, w.ffn_norm, shape.rms_eps, "ffn_norm")

    # SwiGLU MLP.
    if _same_form([w.gate, w.up]):
        gate, up = g.linears(h, [w.gate, w.up], "gate_up_proj", [None, None])
    else:
        gate, up = g.linear(h, w.gate, "gate_proj"), g.linear(h, w.up, "up_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate])], "silu")
    mlp = g.linear(g.op("Mul", [act, up], "gated"), w.down, "down_proj")
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
