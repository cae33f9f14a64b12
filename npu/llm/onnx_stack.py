"""The CPU twin's layer stack: dynamic shapes, so each step computes only what it uses.

The NPU runs static shape groups: a decode token attends over the whole ``kv_cache_len`` cache
(unused rows masked) and every prefill chunk is padded to 128 tokens. The ONNX graphs derive
the history from the mask's width, so on the CPU a decode token is fed a mask of
``rows in use + 1`` columns and attends over those rows only, and a prompt's last chunk runs
with its real tokens only. Results are the same; the work per token grows with the sequence
instead of being fixed at the largest capacity.

Decode runs through ONNX Runtime's IO binding: each layer's cache buffers, position, hidden
states and new K/V rows are bound once per cache, so a token rebinds only the mask (its width
changes) and copies one K/V row per layer into the cache.
"""

from __future__ import annotations

import weakref

import numpy as np

from npu.llm.kv_cache import SequenceCache, prefill_feeds
from npu.llm.layer_stack import LayerStack
from npu.llm.model_args import ModelArgs
from npu.llm.shape_groups import GroupPlan
from npu.runtime import Session


class _DecodeBinding:
    """One cache's decode bindings: per layer, its K/V buffers, a new row each, ping-pong hidden."""

    def __init__(self, layers: list[Session], cache: SequenceCache, hidden: int, kv_dim: int,
                 dtype: np.dtype, indices_dtype: np.dtype) -> None:
        self.indices = np.zeros((1, 1), dtype=indices_dtype)
        self.hidden = [np.zeros((1, 1, hidden), dtype=dtype) for _ in range(2)]
        self.rows = [(np.zeros((1, 1, kv_dim), dtype=dtype), np.zeros((1, 1, kv_dim), dtype=dtype))
                     for _ in layers]
        self.zeros_mask = np.zeros((1, 1, cache.capacity + 1), dtype=cache.dtype)
        self.bindings = []
        pairs = zip(layers, cache.layers, self.rows, strict=True)
        for i, (layer, layer_cache, (k_row, v_row)) in enumerate(pairs):
            b = layer.binding()  # type: ignore[attr-defined]
            k_all, v_all = layer_cache.full()
            b.input("K_cache", k_all)
            b.input("V_cache", v_all)
            b.input("indices", self.indices)
            b.input("input", self.hidden[i % 2])
            b.output("K_cache_out", k_row)
            b.output("V_cache_out", v_row)
            b.output("output", self.hidden[(i + 1) % 2])
            self.bindings.append(b)

    @property
    def result(self) -> np.ndarray:
        return self.hidden[len(self.bindings) % 2]


class OnnxLayerStack(LayerStack):
    """``LayerStack`` for ONNX Runtime sessions with dynamic shapes (``plan.static`` false)."""

    def __init__(self, layers: list[Session], post: Session, args: ModelArgs, plan: GroupPlan) -> None:
        if plan.static:
            raise ValueError("OnnxLayerStack needs a dynamic-shape plan")
        super().__init__(layers, post, args, plan)
        self._bound: weakref.WeakKeyDictionary[SequenceCache, _DecodeBinding] = weakref.WeakKeyDictionary()

    def prefill_chunk(self, cache: SequenceCache, token_ids: list[int], embeds: np.ndarray) -> np.ndarray:
        """Up to ``chunk`` tokens at ``cache.offset``, unpadded, against exactly the stored rows."""
        start, n, size = cache.offset, len(token_ids), self.chunk
        if start % size or not 0 < n <= size:
            raise ValueError(f"prefill chunk must start on a multiple of {size} and hold 1..{size} tokens")
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: {start + n} rows needed, {cache.capacity} available")
        group = self.plan.prefill_for(start)
        x = np.ascontiguousarray(embeds, dtype=self.dtype).reshape(1, n, -1)
        indices, mask = prefill_feeds(start, n, n, start, self.mask_dtype, self.indices_dtype)
        k_out, v_out, h_out = self._out_index
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            if start:
                k_hist, v_hist = layer_cache.history(start)
            else:
                k_hist = v_hist = self._placeholder(group)
            feeds = {"K_cache": k_hist, "V_cache": v_hist, "indices": indices, "input": x, "mask": mask}
            outs = layer.run(None, feeds, shape_group=group.gid)
            layer_cache.write(start, outs[k_out], outs[v_out])
            x = outs[h_out]
        cache.commit(start, token_ids)
        return x[:, n - 1 : n]

    def decode(self, cache: SequenceCache, token_id: int, embed: np.ndarray) -> np.ndarray:
        """One token at ``cache.offset``, attending over the ``offset`` stored rows and itself."""
        pos = cache.offset
        if pos >= self.kv_cache_len:
            raise ValueError(f"KV cache full ({self.kv_cache_len} rows)")
        bound = self._binding(cache)
        bound.indices[0, 0] = pos
        bound.hidden[0][...] = embed.reshape(1, 1, -1)
        mask = bound.zeros_mask[:, :, : pos + 1]
        first = bound.bindings[0]
        mask_value = first.value(mask)
        for b, layer_cache, (k_row, v_row) in zip(bound.bindings, cache.layers, bound.rows, strict=True):
            b.input("mask", mask, mask_value)
            b.run()
            layer_cache.write_row(pos, k_row, v_row)
        cache.commit(pos, [token_id])
        return bound.result.copy()

    def _binding(self, cache: SequenceCache) -> _DecodeBinding:
        """The decode bindings of ``cache``, made on its first token and kept while it lives."""
        bound = self._bound.get(cache)
        if bound is None:
            bound = self._bound[cache] = _DecodeBinding(
                self.layers, cache, self.args.hidden_size, self.args.kv_dim, self.dtype, self.indices_dtype
            )
        return bound
